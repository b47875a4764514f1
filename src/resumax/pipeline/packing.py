"""Packing in the pipeline: windows of positions -> packed rows (`WindowPacker`), and the
stream of rows of consecutive windows -> each process's batches (`row_batches`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from resumax.errors import ConfigError, StateMismatchError
from resumax.pipeline.record_path import RecordPath
from resumax.stages.packing import PackSequences, Rows


class WindowPacker:
    """A window of positions -> its rows: RecordPath (read, decode, per-record stages), pack."""

    def __init__(self, record_path: RecordPath, packing: PackSequences):
        self.record_path = record_path
        self.packing = packing

    def __call__(self, span: tuple[int, int]) -> Rows:
        return self.packing.pack(self.record_path(span))


def open_window_packer(
    open_record_path: Callable[[], RecordPath], packing: PackSequences
) -> WindowPacker:
    """A worker's WindowPacker over its own RecordPath."""
    return WindowPacker(open_record_path(), packing)


def split_packing(stages: Sequence[Any]) -> tuple[list[Any], PackSequences | None]:
    """(the other stages, the PackSequences stage or None); ConfigError unless it comes last."""
    stages = list(stages)
    for position, stage in enumerate(stages):
        if isinstance(stage, PackSequences) and position != len(stages) - 1:
            raise ConfigError(
                f"stage {position} (PackSequences) must be the last stage, but "
                f"{len(stages) - 1 - position} stage(s) follow it; put per-record stages before "
                "it, and apply batch-level work to the packed batches in the training step"
            )
    if stages and isinstance(stages[-1], PackSequences):
        return stages[:-1], stages[-1]
    return stages, None


# Rows -> batches ---------------------------------------------------------------------------------


def row_batches(
    windows: Iterator[Rows],
    first_window: int,
    rows_to_skip: int,
    batch_size: int,
    process_index: int,
    process_count: int,
    keep_last: bool,
) -> Iterator[tuple[Rows | None, int, int]]:
    """(this process's batch, window index, rows delivered from it) after each global batch.

    The rows of consecutive windows form one stream; every `batch_size * process_count` rows are
    a global batch and process p gets its p-th `batch_size` rows. The position after a batch is
    global (the same on every process), so any process count can continue from it. A last
    partial global batch comes as one batch only when `keep_last` (one process), else is dropped.
    """
    global_batch = batch_size * process_count
    mine = (process_index * batch_size, (process_index + 1) * batch_size)
    pieces: list[tuple[Rows, int, int]] = []  # (window rows, first, stop) of the global batch
    pending = 0
    window_index = first_window
    for rows in windows:
        num_rows = len(next(iter(rows.values())))
        taken = rows_to_skip if window_index == first_window else 0
        if taken > num_rows:
            raise StateMismatchError(
                f"pipeline state says {taken} rows of packing window {window_index} were "
                f"delivered, but it packs into {num_rows}; the data or stages changed"
            )
        while taken < num_rows:
            take = min(global_batch - pending, num_rows - taken)
            pieces.append((rows, taken, taken + take))
            pending, taken = pending + take, taken + take
            if pending == global_batch:
                after = (window_index + 1, 0) if taken == num_rows else (window_index, taken)
                yield _slice_rows(pieces, *mine), *after
                pieces, pending = [], 0
        window_index += 1
    if keep_last and pending:
        yield _slice_rows(pieces, 0, pending), window_index, 0


def _slice_rows(pieces: list[tuple[Rows, int, int]], first: int, stop: int) -> Rows:
    """Rows [first, stop) of the global batch the pieces make up, as one dict of arrays."""
    parts, offset = [], 0
    for rows, a, b in pieces:
        lo, hi = max(first, offset), min(stop, offset + b - a)
        if lo < hi:
            parts.append((rows, a + lo - offset, a + hi - offset))
        offset += b - a
    keys = parts[0][0].keys()
    if len(parts) == 1:
        rows, a, b = parts[0]
        return {key: rows[key][a:b] for key in keys}
    return {key: np.concatenate([rows[key][a:b] for rows, a, b in parts]) for key in keys}


# Rows of a batch -> their records ------------------------------------------------------------


def packed_batch_rows(
    window_rows: Callable[[int], list[list[int]]],
    anchor: tuple[int, int, int],
    batch_offset: int,
    rows: tuple[int, int],
    last_window: int | None,
    keep_last: bool,
) -> list[list[int]]:
    """The record positions of rows [first, stop) of a global batch of packed rows.

    `window_rows(w)`: each row's record positions in window w (it re-packs the window).
    `anchor`: (window, rows delivered from it, global batch size) where the pipeline stands;
    the batch starts `batch_offset` global batches after (negative: before) that point.
    Only the windows between the anchor and the batch are packed. `last_window`: past it a
    finite stream has no rows; `keep_last`: a last partial batch is delivered.
    """
    window, offset, global_batch = anchor
    offset += batch_offset * global_batch + rows[0]
    while offset < 0:  # walk back to the window holding the batch's first row
        window -= 1
        if window < 0:
            raise ConfigError("the batch would start before the stream's first packed row")
        offset += len(window_rows(window))
    found: list[list[int]] = []
    wanted = rows[1] - rows[0]
    while len(found) < wanted:
        if last_window is not None and window > last_window:
            if keep_last and found:
                break
            raise ConfigError("the batch lies past the end of this finite stream")
        window_list = window_rows(window)
        if offset < len(window_list):
            found.extend(window_list[offset : offset + wanted - len(found)])
            offset = 0
        else:
            offset -= len(window_list)
        window += 1
    return found


class PackedWindows:
    """The rows of packed windows as lists of record positions, re-packed on demand (reads the
    window's records) and kept for the life of this object: one question's worth."""

    def __init__(self, record_path: RecordPath, packing: PackSequences, end: int | None):
        self.record_path = record_path
        self.packing = packing
        self.end = end
        self.last_window = None if end is None else (end - 1) // packing.window
        self._rows: dict[int, list[list[int]]] = {}

    def rows(self, index: int) -> list[list[int]]:
        if index not in self._rows:
            first = index * self.packing.window
            stop = first + self.packing.window
            if self.end is not None:
                stop = min(stop, self.end)
            self._rows[index] = self.packing.row_positions(self.record_path((first, stop)))
        return self._rows[index]

    def advance(self, window: int, rows_delivered: int, num_rows: int) -> tuple[int, int]:
        """(window, rows delivered from it) `num_rows` rows after (window, rows_delivered);
        (the window after the last, 0) when a finite stream ends first."""
        offset = rows_delivered + num_rows
        while self.last_window is None or window <= self.last_window:
            count = len(self.rows(window))
            if offset < count:
                return window, offset
            offset -= count
            window += 1
        return window, 0
