"""The file-grouped shuffle of `ArrayRecordSourceConfig(shuffle_window=W)`: files in a seeded order,
records permuted within windows of W consecutive records of that order; pure in (seed, epoch, pos).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from resumax import order

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# Mixed into the window keys, so a window's permutation never reuses the file order's keys.
_WINDOW_SALT = np.uint64(0xD1B54A32D192ED03)


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64 of each uint64 (wrapping arithmetic on arrays)."""
    values = values + _GOLDEN
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def window_keys(shuffle_seed: int, windows: np.ndarray) -> np.ndarray:
    """Feistel round keys of each window: shape (rounds, len(windows)), a pure function of the
    epoch's shuffle seed and the window number."""
    base = order.round_keys(shuffle_seed)
    windows = np.asarray(windows, dtype=np.uint64)
    return np.stack([_splitmix64((windows * _GOLDEN) ^ key ^ _WINDOW_SALT) for key in base])


def permute_within(offsets: np.ndarray, size: int, keys: np.ndarray) -> np.ndarray:
    """Offsets in [0, size) mapped through per-element keyed bijections on [0, size) (a Feistel
    network with cycle walking, as `resumax.order.permute`); `keys` is (rounds, len(offsets))."""
    half_bits = order._half_bits(size)
    limit = np.uint64(size)
    values = order._feistel(np.asarray(offsets, dtype=np.uint64), keys, half_bits)
    outside = values >= limit
    while outside.any():
        values[outside] = order._feistel(values[outside], keys[:, outside], half_bits)
        outside = values >= limit
    return values.astype(np.int64)


class WindowOrder:
    """Record indices of positions under the file-grouped shuffle of one source.

    Epoch e orders the files by a Feistel permutation keyed by `seed + e`; the records, in that
    file order (each file's records in file order), are cut into windows of `window` consecutive
    records (the last may be shorter), and the records of window w are permuted by a Feistel
    bijection keyed by (`seed + e`, w). Every record comes once per epoch. The per-epoch file
    layout (O(number of files)) of the last two epochs asked for is cached.
    """

    def __init__(self, counts: Sequence[int], seed: int, window: int):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.num_records = int(self.starts[-1])
        self.seed, self.window = seed, window
        # ((epoch, (file order, prefix sums in that order)), ...), swapped in as one tuple.
        self._layouts: tuple[tuple[int, tuple[np.ndarray, np.ndarray]], ...] = ()

    def file_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(file ids in the epoch's order, record offsets of each in that order, plus the total)."""
        for cached_epoch, layout in self._layouts:
            if cached_epoch == epoch:
                return layout
        num_files = len(self.counts)
        files = order.permute(np.arange(num_files), num_files, order.epoch_seed(self.seed, epoch))
        offsets = np.concatenate([[0], np.cumsum(self.counts[files])]).astype(np.int64)
        layout = (files, offsets)
        self._layouts = ((epoch, layout), *self._layouts[:1])
        return layout

    def record_indices(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Dataset indices at positions [start, stop) of `epoch` (stop <= the record count)."""
        positions = np.arange(start, stop, dtype=np.int64)
        window, total = self.window, self.num_records
        windows, offsets = np.divmod(positions, window)
        shuffle_seed = order.epoch_seed(self.seed, epoch)
        slots = np.empty_like(positions)
        last = total // window  # the shorter last window, if the count is not a multiple
        full = windows < last
        for where, size in ((full, window), (~full, total - last * window)):
            if where.any():
                keys = window_keys(shuffle_seed, windows[where])
                slots[where] = windows[where] * window + permute_within(offsets[where], size, keys)
        files, file_offsets = self.file_layout(epoch)
        ranks = np.searchsorted(file_offsets, slots, side="right") - 1
        return self.starts[files[ranks]] + slots - file_offsets[ranks]
