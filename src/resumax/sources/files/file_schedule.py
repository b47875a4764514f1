"""When each file of a source is read, from the source's order alone: the positions each file is
needed at in an epoch, its next use after a position (Belady's farthest-next-use eviction), and
the bytes that must be on disk at once. Pure functions of (counts, seed, shuffle settings).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from resumax.sources.base import ArrayRecordSourceConfig
from resumax.sources.window_order import WindowOrder

# The next use of a file the run never reads again (past its last epoch).
NEVER = np.iinfo(np.int64).max


class FileSchedule:
    """Which files are needed when, under one source's order.

    Each file is needed on one range of positions per epoch: with `shuffle_window` W, the
    windows its records fall in (the file's span in the epoch's file order, widened to whole
    windows); in file order, its own records' positions; under the global shuffle, the whole
    epoch (every file may be read at any time, so all must fit on disk).
    """

    def __init__(self, counts: Sequence[int], config: ArrayRecordSourceConfig):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.num_records = int(self.counts.sum())
        self.config = config
        # The position the run ends at (num_epochs), None when it never ends.
        self.end = None if config.num_epochs == -1 else config.num_epochs * self.num_records
        self.window = config.shuffle_window if config.shuffle_files else None
        self._window_order = (
            WindowOrder(self.counts, config.seed, self.window) if self.window is not None else None
        )
        # ((epoch, (first, end)), ...) of the last two epochs asked for, swapped in as one tuple:
        # the reader asks for its epoch while the read-ahead asks for the next one too.
        self._ranges: tuple[tuple[int, tuple[np.ndarray, np.ndarray]], ...] = ()

    @property
    def global_shuffle(self) -> bool:
        return self.config.shuffle_files and self.window is None

    def ranges(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(first, end) position within `epoch` where each file (by file id) is needed."""
        for cached_epoch, cached in self._ranges:
            if cached_epoch == epoch:
                return cached
        total = self.num_records
        if self.global_shuffle:
            first = np.zeros(len(self.counts), np.int64)
            end = np.full(len(self.counts), total, np.int64)
        elif self._window_order is None:
            end = np.cumsum(self.counts)
            first = end - self.counts
        else:
            files, offsets = self._window_order.file_layout(epoch)
            window = self.window
            first, end = np.empty_like(offsets[:-1]), np.empty_like(offsets[:-1])
            first[files] = offsets[:-1] // window * window
            end[files] = np.minimum(-(-offsets[1:] // window) * window, total)
        self._ranges = ((epoch, (first, end)), *self._ranges[:1])
        return first, end

    def next_use(self, position: int) -> np.ndarray:
        """For every file, the first global position >= `position` at which it is needed (files
        needed at `position` itself get `position`; NEVER for none before the run's end)."""
        epoch, index = divmod(position, self.num_records)
        first, end = self.ranges(epoch)
        this_epoch = np.where(end > index, np.maximum(first, index) + epoch * self.num_records, -1)
        later_first, _ = self.ranges(epoch + 1)
        next_epoch = later_first + (epoch + 1) * self.num_records
        found = np.where(this_epoch >= 0, this_epoch, next_epoch)
        return found if self.end is None else np.where(found < self.end, found, NEVER)

    def needed_until(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(file ids needed anywhere in global positions [start, stop), each once; for each, the
        global position its range of use there ends at): a file read by a span stays needed
        until that end, however many spans after this one read it."""
        found, ends = [], []
        while start < stop:
            epoch, index = divmod(start, self.num_records)
            first, end = self.ranges(epoch)
            epoch_stop = min(stop - epoch * self.num_records, self.num_records)
            file_ids = np.flatnonzero((first < epoch_stop) & (end > index))
            found.append(file_ids)
            ends.append(end[file_ids] + epoch * self.num_records)
            start = (epoch + 1) * self.num_records
        if len(found) == 1:
            return found[0], ends[0]
        # A span across epochs: a file needed in both ends with its later epoch's range.
        file_ids, until = np.concatenate(found), np.concatenate(ends)
        latest = np.lexsort((until, file_ids))
        last_of_each = np.append(file_ids[latest][1:] != file_ids[latest][:-1], True)
        return file_ids[latest][last_of_each], until[latest][last_of_each]

    def bytes_at_once(self, sizes: Sequence[int], positions: int = 0) -> int:
        """An upper bound of the bytes of the files needed at once while `positions` positions
        are read ahead of the caller: the whole set under the global shuffle; otherwise the
        largest files that records within those positions and two windows can touch."""
        sizes = np.asarray(sizes, dtype=np.int64)
        if self.global_shuffle:
            return int(sizes.sum())
        span = positions + 2 * (self.window or 1)
        smallest = np.sort(self.counts)
        # Files whose records fit in the span, plus one partial file at each end.
        touched = int(np.searchsorted(np.cumsum(smallest), span, side="left")) + 2
        return int(np.sort(sizes)[::-1][:touched].sum())

    def positions_within(self, sizes: Sequence[int], limit: int) -> int | None:
        """The most positions that can be read ahead with `limit` bytes on disk (None: any
        number, the global shuffle holding the whole set anyway; 0: not even the windows)."""
        if self.global_shuffle:
            return None
        low, high = 0, self.num_records * 2
        if self.bytes_at_once(sizes, 0) > limit:
            return 0
        while low < high:
            middle = (low + high + 1) // 2
            if self.bytes_at_once(sizes, middle) <= limit:
                low = middle
            else:
                high = middle - 1
        return low
