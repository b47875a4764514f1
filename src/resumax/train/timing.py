"""How long the training loop waited for the input pipeline between two metrics lines
(`data_wait_s`, `data_wait_fraction`), beside the span's wall time for the task's throughput.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any


class LineTimer:
    """Measures the span since the previous metrics line.

    `next_batch(batches)` times the wait for a batch; `lap()` returns the span's wall time and
    timing fields and starts the next span. A `data_wait_fraction` near 1 means the loop is
    input-bound: the pipeline, not the model, sets the pace.
    """

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._data_wait = 0.0

    def next_batch(self, batches: Iterator[Any]) -> Any:
        """`next(batches, None)`, with the time it took added to the data wait."""
        before = time.perf_counter()
        try:
            return next(batches, None)
        finally:
            self._data_wait += time.perf_counter() - before

    def lap(self) -> tuple[float, dict[str, float]]:
        """(seconds since the previous lap, {"data_wait_s", "data_wait_fraction"})."""
        now = time.perf_counter()
        elapsed = max(now - self._start, 1e-9)
        fields = {
            "data_wait_s": self._data_wait,
            "data_wait_fraction": min(self._data_wait / elapsed, 1.0),
        }
        self._start, self._data_wait = now, 0.0
        return elapsed, fields
