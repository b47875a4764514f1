"""Which record comes at which position: pure, vectorised functions of (seed, epoch, position).

The shuffled order is a keyed bijection on [0, num_records) (a Feistel network with cycle walking),
computed on demand for a block of positions. Nothing of size O(num_records) is ever allocated.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

_FEISTEL_ROUNDS = 4
_MASK64 = (1 << 64) - 1
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of an epoch. Epoch e uses `seed + e` (epoch 0 -> 42, epoch 1 -> 43, ...)."""
    return seed + epoch


def _splitmix64(value: int) -> int:
    """One step of SplitMix64 on a Python int: a cheap, well-mixed 64-bit hash."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


@functools.lru_cache(maxsize=64)
def round_keys(shuffle_seed: int, rounds: int = _FEISTEL_ROUNDS) -> tuple[np.uint64, ...]:
    """The per-round keys of the Feistel network for one shuffle seed."""
    keys = []
    state = shuffle_seed & _MASK64
    for _ in range(rounds):
        state = _splitmix64(state)
        keys.append(state)
    return tuple(np.uint64(key) for key in keys)


def _round_function(right: np.ndarray, key: np.uint64, top_shift: np.uint64) -> np.ndarray:
    """Multiply-shift hash of (right xor key): the top bits of an odd 64-bit product."""
    mixed = right ^ key
    mixed *= _MULTIPLIER
    mixed >>= top_shift
    return mixed


def _half_bits(num_records: int) -> int:
    """Bits of each Feistel half: the smallest even-split domain 4**h covering num_records."""
    bits = max(2, (num_records - 1).bit_length())
    return (bits + 1) // 2


def _feistel(values: np.ndarray, keys: tuple[np.uint64, ...], half_bits: int) -> np.ndarray:
    """A balanced Feistel network: a bijection on [0, 4**half_bits) for any keys."""
    shift = np.uint64(half_bits)
    top_shift = np.uint64(64 - half_bits)
    left = values >> shift
    right = values & np.uint64((1 << half_bits) - 1)
    for key in keys:
        mixed = _round_function(right, key, top_shift)
        mixed ^= left
        left, right = right, mixed
    return (left << shift) | right


def permute(positions: np.ndarray, num_records: int, shuffle_seed: int) -> np.ndarray:
    """Maps positions in [0, num_records) to record indices through a seeded bijection.

    The Feistel domain is at most 4x num_records; cycle walking re-applies the network to values
    that land outside [0, num_records) until they fall inside, which keeps it a bijection.
    """
    positions = np.asarray(positions)
    if positions.size and (positions.min() < 0 or positions.max() >= num_records):
        raise ValueError(
            f"positions must lie in [0, {num_records}), got values from {positions.min()} to "
            f"{positions.max()}; cycle walking would never end outside the record range"
        )
    keys = round_keys(shuffle_seed)
    half_bits = _half_bits(num_records)
    limit = np.uint64(num_records)
    values = _feistel(np.asarray(positions, dtype=np.uint64), keys, half_bits)
    outside = values >= limit
    while outside.any():
        values[outside] = _feistel(values[outside], keys, half_bits)
        outside = values >= limit
    return values.astype(np.int64)


def record_indices(
    positions: np.ndarray, *, num_records: int, seed: int, epoch: int, shuffle: bool
) -> np.ndarray:
    """The record index read at each position of an epoch: identity, or the epoch's permutation."""
    positions = np.asarray(positions, dtype=np.int64)
    if not shuffle:
        return positions
    return permute(positions, num_records, epoch_seed(seed, epoch))


def spans(start: int, span_size: int, end: int | None) -> Iterator[tuple[int, int]]:
    """Consecutive [start, stop) spans of global positions up to `end` (None: forever).

    A global position is epoch * records_per_epoch + index, so a span may cross epochs.
    """
    while end is None or start < end:
        stop = start + span_size if end is None else min(start + span_size, end)
        yield start, stop
        start = stop


def process_spans(
    start: int,
    batch_size: int,
    process_index: int,
    process_count: int,
    end: int | None,
    *,
    aligned: bool,
) -> Iterator[tuple[int, int]]:
    """This process's [first, stop) spans of global positions, one per global batch.

    Global batch w covers `batch_size * process_count` consecutive positions from its window
    start; process p reads the p-th `batch_size` of them. Windows begin at `start`, or, when
    `aligned`, at multiples of the global batch size (then `start` may lie inside this process's
    slice, where a Filter pipeline stopped). Only whole windows are read before `end`, so every
    process gets the same number of spans.
    """
    global_batch = batch_size * process_count
    window = start - start % global_batch if aligned else start
    first = max(start, window + process_index * batch_size)
    if first >= window + (process_index + 1) * batch_size:
        window += global_batch
        first = window + process_index * batch_size
    while end is None or window + global_batch <= end:
        yield first, window + (process_index + 1) * batch_size
        window += global_batch
        first = window + process_index * batch_size


def window_end(position: int, origin: int, global_batch: int) -> int:
    """The end of the global batch window (counted from `origin`) that holds `position`."""
    return origin + ((position - origin) // global_batch + 1) * global_batch
