"""The timing loop the benchmarks share: items per second a pipeline delivers after its first
batch, which pays for start-up (worker processes, opening readers)."""

from __future__ import annotations

import time

from resumax import Pipeline


def items_per_second(pipeline: Pipeline, batches: int) -> float:
    """Records (or packed rows) per second over `batches` batches after the first; the
    iterator is closed afterwards."""
    iterator = iter(pipeline)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    iterator.close()
    return batches * pipeline.batch_size / elapsed
