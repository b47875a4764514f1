"""Remote shards ready before the reads that need them: `ReadAhead` pins the shards of each span of
positions before the span is read (in this process or a worker) and keeps background downloads
going in the order the source will read, as far as the cache limit allows.

The shards worth holding at a position are those used soonest (Belady's MIN: the order is known),
as many as fit in the limit; a download never evicts a shard needed sooner than itself.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator

import numpy as np

from resumax.errors import DataSourceError
from resumax.sources.files.file_schedule import NEVER, FileSchedule
from resumax.sources.files.shard_cache import NoRoom, ShardCache

# Seconds a download thread sleeps when there is nothing to fetch, before it looks again.
_IDLE = 0.5


class ReadAhead:
    """Downloads ahead of a moving position with `threads` daemon threads, and pins spans."""

    def __init__(
        self,
        cache: ShardCache,
        schedule: FileSchedule,
        file_ids_of: Callable[[int, int], np.ndarray],
        delivered: Callable[[], int],
    ):
        """`file_ids_of(start, stop)`: the files the records at positions [start, stop) lie in;
        `delivered()`: the position the caller has received (pins before it are released)."""
        self.cache, self.schedule = cache, schedule
        self._file_ids_of, self._delivered = file_ids_of, delivered
        self._sizes = np.asarray(cache.shards.sizes, dtype=np.int64)
        self._position = 0
        self._in_progress: set[int] = set()
        self._changed = threading.Condition()
        self._stopped = False
        self.error: BaseException | None = None
        cache.next_use = lambda: schedule.next_use(self._position)
        self._threads = [
            threading.Thread(target=self._run, name="resumax-fetch", daemon=True)
            for _ in range(cache.settings.fetch_threads)
        ]

    def spans(self, spans: Iterator[tuple[int, int]]) -> Iterator[tuple[int, int]]:
        """`spans`, each yielded once its shards are on disk and pinned; pins are released once
        the caller has received the positions they cover, and all of them at the end."""
        pinned: deque[tuple[int, list[int]]] = deque()
        for thread in self._threads:
            thread.start()
        try:
            for start, stop in spans:
                self._advance(start)
                file_ids = self._file_ids_of(start, stop).tolist()
                for file_id in file_ids:
                    self.cache.fetch(file_id, pin=True)
                pinned.append((stop, file_ids))
                delivered = self._delivered()
                while pinned and pinned[0][0] <= delivered:
                    self.cache.unpin(pinned.popleft()[1])
                yield start, stop
        finally:
            self.stop()
            while pinned:
                self.cache.unpin(pinned.popleft()[1])

    def _advance(self, position: int) -> None:
        with self._changed:
            self._position = position
            self._changed.notify_all()

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify_all()

    def _wanted(self) -> list[int]:
        """Shards to hold from the current position: soonest used first, as many as fit (never
        one the run does not read again). The shards pinned for spans still being read take
        their room first: counting the limit for the wanted shards alone, downloads would evict
        each other's shards (fetched out of order by concurrent threads) and fetch them again."""
        next_use = self.schedule.next_use(self._position)
        by_use = np.argsort(next_use, kind="stable")
        pinned = self.cache.pinned()
        order = [*pinned, *(f for f in by_use.tolist() if next_use[f] < NEVER and f not in pinned)]
        fits = np.cumsum(self._sizes[order]) <= self.cache.settings.limit
        return [file_id for file_id, fit in zip(order, fits.tolist(), strict=True) if fit]

    def _run(self) -> None:
        """One download thread: fetch the first wanted shard that is neither cached nor being
        fetched; when none is left or there is no room, wait for the position to move."""
        while True:
            with self._changed:
                if self._stopped:
                    return
                position = self._position
                next_use = self.schedule.next_use(position)
                file_id = next(
                    (
                        f
                        for f in self._wanted()
                        if f not in self._in_progress and not self.cache.cached(f)
                    ),
                    None,
                )
                if file_id is None:
                    self._changed.wait(_IDLE)
                    continue
                self._in_progress.add(file_id)
            try:
                self.cache.fetch(file_id, evict_after=int(next_use[file_id]))
            except NoRoom:
                with self._changed:
                    if self._position == position and not self._stopped:
                        self._changed.wait(_IDLE)
            except DataSourceError as error:
                # The read that needs this shard fetches it again and raises in its own thread;
                # until the position moves, this thread does not try again.
                self.error = error
                with self._changed:
                    if self._position == position and not self._stopped:
                        self._changed.wait(_IDLE)
            finally:
                with self._changed:
                    self._in_progress.discard(file_id)
