"""`PipelineIterator`: hands batches to the caller and advances the pipeline's position as it does.

It owns the worker processes and the prefetch thread of one iteration and stops them, in an
order that leaves neither waiting, when closed, exhausted, failed, garbage collected or at exit.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from resumax.pipeline.prefetch import Prefetcher
from resumax.workers.pool import WorkerPool

# Seconds `close()` takes at most (also on `set_state`, a new `iter()`, garbage collection and
# interpreter exit), whatever a stage is doing: a stage stuck in a long call is abandoned.
STOP_TIMEOUT = 2.0


@dataclasses.dataclass(frozen=True)
class Delivery:
    """A finished batch (None: a finite run ended), the position right after it (with
    PackSequences: the window start and the rows already delivered from that window) and the
    operators' Variables right after it (`resumax.stages.operators`; None without operators)."""

    batch: Any
    epoch: int
    index: int
    operators: Any = None
    packed_rows: int = 0


class PipelineIterator:
    """Hands a pipeline's batches to the caller; `receive(delivery)` advances the pipeline's
    position on the caller's thread as each is handed over.

    Owns the worker processes and the prefetch thread, if any. `close()` stops them; so do the
    end of the data, an error, garbage collection and interpreter exit, each within
    STOP_TIMEOUT seconds.
    """

    def __init__(
        self,
        receive: Callable[[Delivery], None],
        deliveries: Iterator[Delivery],
        pool: WorkerPool | None,
        prefetcher: Prefetcher | None,
        stop_reading: Callable[[], None] | None = None,
    ):
        """`stop_reading`: what the source's `spans_ready` gave to stop reading ahead (remote
        downloads), called once the workers and the prefetch thread are stopped."""
        self._receive = receive
        self._deliveries = deliveries
        self._closed = False
        self.worker_pids: tuple[int, ...] = pool.worker_pids if pool is not None else ()
        self._release = weakref.finalize(
            self, _release, pool, prefetcher, STOP_TIMEOUT, stop_reading
        )

    def __iter__(self) -> PipelineIterator:
        return self

    def __next__(self) -> Any:
        if self._closed:
            raise StopIteration
        try:
            delivery = next(self._deliveries)
        except BaseException:
            self.close()
            raise
        self._receive(delivery)
        if delivery.batch is None:
            self.close()
            raise StopIteration
        return delivery.batch

    def close(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stops the workers and the prefetch thread within `timeout` seconds; batches computed
        ahead are dropped. Workers still busy then are killed; a prefetch thread stuck in a
        stage's call is left to end on its own (a daemon thread, it never delays exit)."""
        self._closed = True
        resources = self._release.detach()
        if resources is not None:
            _, release, (pool, prefetcher, _, stop_reading), _ = resources
            release(pool, prefetcher, timeout, stop_reading)

    def __enter__(self) -> PipelineIterator:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _release(
    pool: WorkerPool | None,
    prefetcher: Prefetcher | None,
    timeout: float,
    stop_reading: Callable[[], None] | None = None,
) -> None:
    """Stops the prefetch thread and the workers, in at most about `timeout` seconds.

    The thread first (a quarter of the time: it ends at its next item unless a stage holds it),
    then the workers, which also ends a thread waiting for their results, then the thread again.
    A thread still running without workers is in a stage's call: it is left to end on its own.
    """
    deadline = time.monotonic() + timeout
    if prefetcher is not None:
        prefetcher.stop(timeout / 4)
    if pool is not None:
        pool.stop_workers(max(deadline - time.monotonic(), 0.0))
        if prefetcher is not None:
            prefetcher.join(deadline - time.monotonic())
        pool.close(0.0)
    if stop_reading is not None:
        stop_reading()


class ActiveIterator:
    """A weak reference to a pipeline's live iterator, kept off the module's nnx state."""

    def __init__(self) -> None:
        self._ref: weakref.ref[PipelineIterator] | None = None

    def set(self, iterator: PipelineIterator) -> None:
        self._ref = weakref.ref(iterator)

    def close(self) -> None:
        iterator = self._ref() if self._ref is not None else None
        if iterator is not None:
            iterator.close()
