"""`Prefetcher`: runs an iterator in a background thread, a bounded number of items ahead.

It hides read, decode and host-to-device latency behind the caller's work (the training step,
which releases the GIL while XLA runs). Items, the end and any error arrive in the same order as
without it.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")
# How often a thread waiting for room, or a caller waiting for an item, checks for a stop.
_STOP_POLL_SECONDS = 0.05


class _End:
    """Queued after the last item; carries the error that ended the iterator, if any."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


class Prefetcher(Generic[T]):
    """An iterator over `items` computed by a daemon thread, at most `depth` items ahead.

    Memory is bounded by `depth` items plus the one being computed. `stop()` and `join()` end the
    thread early; items computed but not taken are dropped.

    Taking an item that is ready is one `deque.popleft`: no lock and no wake-up of the thread.
    The thread, once `depth` items wait, sleeps until the caller has taken half of them and then
    refills in one go, so the caller's thread is interrupted once per depth / 2 items rather
    than once per item (a training step runs while the thread computes; a lock hand-over per
    batch cost ~13 us of the step loop's time per batch).
    """

    def __init__(self, items: Iterator[T], depth: int, name: str = "resumax-prefetch"):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._items = items
        self._depth = depth
        self._refill_at = depth // 2  # the thread resumes once this few items wait
        self._ready: collections.deque[Any] = collections.deque()
        # Guards the two flags below; the consumer and the thread each wait on it, never both.
        self._changed = threading.Condition()
        self._consumer_waits = False
        self._producer_waits = False
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
        """Queues `item`, first waiting for room if `depth` items wait; False if asked to stop."""
        ready = self._ready
        if len(ready) >= self._depth:
            with self._changed:
                self._producer_waits = True
                while len(ready) > self._refill_at and not self._stopping.is_set():
                    self._changed.wait(_STOP_POLL_SECONDS)
                self._producer_waits = False
        if self._stopping.is_set():
            return False
        ready.append(item)
        with self._changed:
            if self._consumer_waits:
                self._changed.notify()
        return True

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        ready = self._ready
        try:
            item = ready.popleft()
        except IndexError:
            with self._changed:
                self._consumer_waits = True
                while not ready and not self._stopping.is_set():
                    self._changed.wait(_STOP_POLL_SECONDS)
                self._consumer_waits = False
            if not ready:  # stopped (closed from another thread) while waiting
                self._done = True
                raise StopIteration from None
            item = ready.popleft()
        if self._producer_waits and len(ready) <= self._refill_at:
            with self._changed:
                self._changed.notify()
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
