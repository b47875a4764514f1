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
    """Downloads ahead of a moving position with `threads` daemon threads, and pins spans.

    The threads share one plan: the wanted shards not yet on disk, soonest used first. It is
    made again (by one thread, outside the caller's way) once the position has moved by about
    a shard's records; the caller only records its position.
    """

    def __init__(
        self,
        cache: ShardCache,
        schedule: FileSchedule,
        file_ids_of: Callable[[int, int], tuple[np.ndarray, np.ndarray]],
        delivered: Callable[[], int],
        spans: Iterator[tuple[int, int]],
        keep_all: bool,
    ):
        """Iterates `spans`, each once its shards are on disk and pinned (see `_ready`).
        `file_ids_of(start, stop)`: the files the records at positions [start, stop) lie in,
        and for each the position its use there ends at (NEVER: kept to the end);
        `delivered()`: the position the caller has received (pins before it are released);
        `keep_all`: whether every shard stays pinned once read (see below)."""
        self.cache, self.schedule = cache, schedule
        self._file_ids_of, self._delivered = file_ids_of, delivered
        self._sizes = np.asarray(cache.shards.sizes, dtype=np.int64)
        # Positions between plans: a shard's records, doubled after each plan that found
        # nothing to fetch (a cache holding all it wants), up to a sixteenth of an epoch.
        self._shard_records = max(1, schedule.num_records // max(1, len(self._sizes)))
        self._replan_every = self._shard_records
        self._max_replan = max(self._shard_records, schedule.num_records // 16)
        self._position = 0
        self._planned_at: int | None = None
        self._plan: deque[tuple[int, int]] = deque()  # (file id, next use)
        self._in_progress: set[int] = set()
        self._idle = 0
        self._changed = threading.Condition()
        self._stopped = False
        cache.next_use = lambda: schedule.next_use(self._position)
        self._threads = [
            threading.Thread(target=self._run, name="resumax-fetch", daemon=True)
            for _ in range(cache.settings.fetch_threads)
        ]
        # Pinned shards -> the position after which they are no longer needed: a shard stays
        # pinned over all the spans that read it. With `keep_all` (the owner's set, and those it
        # shares the cache directory with, fit in the limit, as the global shuffle requires),
        # none ever needs to be evicted: each stays pinned from its first read on, and once all
        # are, spans pass with no work and the download threads end.
        self._keep_all = keep_all
        self._all_pinned = False
        self._held: dict[int, int] = {}
        self._held_lock = threading.Lock()
        self._spans = self._ready(spans)

    def __iter__(self) -> ReadAhead:
        return self

    def __next__(self) -> tuple[int, int]:
        return next(self._spans)

    def stop_reading(self) -> None:
        """Stops the downloads and releases every pin; any thread may call it, also while the
        spans are being iterated in another (that iteration then ends)."""
        self.stop()
        with self._held_lock:
            self.cache.unpin(list(self._held))
            self._held.clear()

    def _ready(self, spans: Iterator[tuple[int, int]]) -> Iterator[tuple[int, int]]:
        """`spans`, each yielded once its shards are on disk and pinned; a shard's pin is taken
        by the first span that reads it and released once the caller has received the last
        position of its range of use (`file_ids_of`), and all of them at the end."""
        held, num_files = self._held, len(self._sizes)
        release_at = NEVER  # the earliest position a held pin may be released at
        started = False
        try:
            for start, stop in spans:
                if self._stopped:
                    return
                if self._all_pinned:
                    yield start, stop
                    continue
                self._advance(start)
                if not started:
                    for thread in self._threads:
                        thread.start()
                    started = True
                file_ids, ends = self._file_ids_of(start, stop)
                later: dict[int, int] = {}  # held shards whose use now ends later
                if self._keep_all:
                    ends = np.full(len(file_ids), NEVER)
                for file_id, end in zip(file_ids.tolist(), ends.tolist(), strict=True):
                    if file_id in held:
                        if end > held[file_id]:
                            later[file_id] = end
                        continue
                    self.cache.fetch(file_id, pin=True)
                    with self._held_lock:
                        if self._stopped:
                            self.cache.unpin([file_id])
                            return
                        held[file_id] = end
                    release_at = min(release_at, end)
                delivered = self._delivered()
                if later or delivered >= release_at:
                    with self._held_lock:
                        if self._stopped:
                            return
                        held.update(later)
                        done = [file_id for file_id, end in held.items() if end <= delivered]
                        self.cache.unpin(done)
                        for file_id in done:
                            del held[file_id]
                            # Likely evicted before its next use: closed while its file exists,
                            # the eviction's unlink (no GIL held) frees the disk.
                            if self.cache.close_reader is not None:
                                self.cache.close_reader(file_id)
                        release_at = min(held.values(), default=NEVER)
                if self._keep_all and len(held) == num_files:
                    with self._changed:
                        self._all_pinned = True  # nothing left to fetch: the threads end
                        self._changed.notify_all()
                yield start, stop
        finally:
            self.stop_reading()

    def _advance(self, position: int) -> None:
        """Records the position; wakes an idle thread only once a new plan is due."""
        self._position = position
        due = self._planned_at is None or position - self._planned_at >= self._replan_every
        if due and self._idle:
            with self._changed:
                self._changed.notify()

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify_all()

    def _make_plan(self, position: int) -> None:
        """The shards to hold from `position`, soonest used first, as many as fit in the limit
        (never one the run does not read again), less those on disk or being fetched. The shards
        pinned for spans still being read take their room first: counting the limit for the
        wanted shards alone, downloads would evict each other's shards (fetched out of order by
        concurrent threads) and fetch them again."""
        next_use = self.schedule.next_use(position)
        by_use = np.argsort(next_use, kind="stable")
        by_use = by_use[next_use[by_use] < NEVER]
        pinned = self.cache.pinned()
        pinned_bytes = int(self._sizes[list(pinned)].sum()) if pinned else 0
        if pinned:
            by_use = by_use[~np.isin(by_use, list(pinned))]
        fits = np.cumsum(self._sizes[by_use]) <= self.cache.settings.limit - pinned_bytes
        present, busy = self.cache.present, self._in_progress
        self._plan = deque(
            (file_id, int(next_use[file_id]))
            for file_id in by_use[fits].tolist()
            if file_id not in present and file_id not in busy
        )
        self._planned_at = position
        if self._plan:
            self._replan_every = self._shard_records
        else:
            self._replan_every = min(2 * self._replan_every, self._max_replan)

    def _next_task(self) -> tuple[int, int] | None:
        """The next shard to fetch (with its next use), planning again when due; None when
        stopped or when every shard is pinned for good. Call with `_changed` held."""
        while not self._stopped and not self._all_pinned:
            position = self._position
            if self._planned_at is None or position - self._planned_at >= self._replan_every:
                self._make_plan(position)
                if len(self._plan) > 1:
                    self._changed.notify(len(self._plan) - 1)  # idle threads share the work
            while self._plan:
                file_id, next_use = self._plan.popleft()
                if file_id not in self.cache.present and file_id not in self._in_progress:
                    self._in_progress.add(file_id)
                    return file_id, next_use
            self._idle += 1
            self._changed.wait(_IDLE)
            self._idle -= 1
            self._planned_at = None if self._position != position else self._planned_at
        return None

    def _run(self) -> None:
        """One download thread: fetch the plan's shards in order; when the plan is done or
        there is no room, wait for the position to move."""
        while True:
            with self._changed:
                task = self._next_task()
            if task is None:
                return
            file_id, next_use = task
            try:
                self.cache.fetch(file_id, evict_after=next_use)
            except NoRoom:
                with self._changed:
                    self._plan.clear()  # nothing later fits either, until the position moves
            except (DataSourceError, OSError):
                # The read that needs this shard fetches it again and raises in its own thread.
                with self._changed:
                    self._plan.clear()
            finally:
                with self._changed:
                    self._in_progress.discard(file_id)
