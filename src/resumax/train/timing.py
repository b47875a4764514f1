"""Where the training loop's wall time goes between two metrics lines: records per second and the
time it waited for the input pipeline (`data_wait_s`, `data_wait_fraction`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any


class LineTimer:
    """Measures the span since the previous metrics line.

    `next_batch(batches)` times the wait for a batch; `fields(step)` returns the timing fields
    of a line ending at `step` and starts the next span. A `data_wait_fraction` near 1 means the
    loop is input-bound: the pipeline, not the model, sets the pace.
    """

    def __init__(self, step: int, records_per_step: int):
        self.records_per_step = records_per_step
        self._start, self._start_step = time.perf_counter(), step
        self._data_wait = 0.0

    def next_batch(self, batches: Iterator[Any]) -> Any:
        """`next(batches, None)`, with the time it took added to the data wait."""
        before = time.perf_counter()
        try:
            return next(batches, None)
        finally:
            self._data_wait += time.perf_counter() - before

    def fields(self, step: int) -> dict[str, float]:
        """{"records_per_s", "data_wait_s", "data_wait_fraction"} since the previous line."""
        now = time.perf_counter()
        elapsed = max(now - self._start, 1e-9)
        fields = {
            "records_per_s": (step - self._start_step) * self.records_per_step / elapsed,
            "data_wait_s": self._data_wait,
            "data_wait_fraction": min(self._data_wait / elapsed, 1.0),
        }
        self._start, self._start_step, self._data_wait = now, step, 0.0
        return fields
