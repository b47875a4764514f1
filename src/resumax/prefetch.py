"""`Prefetcher`: runs an iterator in a background thread, a bounded number of items ahead.

It hides read, decode and host-to-device latency behind the caller's work (the training step,
which releases the GIL while XLA runs). Items, the end and any error arrive in the same order as
without it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")
# How often a producer blocked on a full queue checks whether it should stop.
_STOP_POLL_SECONDS = 0.05


class _End:
    """Queued after the last item; carries the error that ended the iterator, if any."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


class Prefetcher(Generic[T]):
    """An iterator over `items` computed by a daemon thread, at most `depth` items ahead.

    Memory is bounded by `depth` items plus the one being computed. `stop()` and `join()` end the
    thread early; items computed but not taken are dropped.
    """

    def __init__(self, items: Iterator[T], depth: int, name: str = "resumax-prefetch"):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._items = items
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stopping = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for item in self._items:
                if not self._put(item):
                    return
        except BaseException as error:
            self._put(_End(error))
        else:
            self._put(_End())

    def _put(self, item: Any) -> bool:
        """Queues `item`; False if asked to stop while waiting for room."""
        while not self._stopping.is_set():
            try:
                self._queue.put(item, timeout=_STOP_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, _End):
            self._done = True
            if item.error is not None:
                raise item.error
            raise StopIteration
        return item

    def stop(self, timeout: float = 1.0) -> None:
        """Asks the thread to stop and waits up to `timeout` seconds for it."""
        self._done = True
        self._stopping.set()
        self.join(timeout)

    def join(self, timeout: float) -> bool:
        """Waits up to `timeout` seconds for the thread to end (after `stop`); True if it has.

        Never longer: a thread stuck in a stage's long call (a hung read) is left to finish it
        on its own. It is a daemon, so it never delays the interpreter's exit, and it drops
        what it computes. A no-op from the thread itself, where a garbage collection may close
        the iterator that owns it.
        """
        if threading.current_thread() is not self._thread:
            self._thread.join(max(timeout, 0.0))
        return not self._thread.is_alive()
