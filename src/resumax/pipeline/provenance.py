"""Which global positions make batch n, and the skips that move a pipeline ahead without reading.

Batch n of a pipeline without a Filter starts `n * global_batch` positions into its stream, so
naming its records needs only the order. A skip, or a resume on another process layout, breaks
that line: each is kept as a `Jump` in the pipeline state (a short list), and the batches on
either side of it are counted from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from resumax.errors import ConfigError, StateMismatchError
from resumax.pipeline.packing import PackedWindows, packed_batch_rows
from resumax.pipeline.record_path import RecordPath
from resumax.sources.base import RecordSource
from resumax.sources.record_ref import RecordRef
from resumax.stages.packing import PackSequences

SKIPS_FIELD = "skips"


@dataclasses.dataclass(frozen=True)
class Jump:
    """After `batch` batches were delivered, the stream jumped from position `first` to `stop`.

    A skip of `batches` batches jumps over positions [first, stop); a resume on another process
    layout (`batches` 0) jumps nowhere but changes the layout. `batch_size` and
    `process_count` are the layout before the jump. With PackSequences, positions are window
    starts and `rows` the rows delivered from those windows (before, after).
    """

    batch: int
    batches: int
    first: int
    stop: int
    batch_size: int
    process_count: int
    rows: tuple[int, int] | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.process_count

    def to_json(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "batches": self.batches,
            "positions": [self.first, self.stop - 1],
            "batch_size": self.batch_size,
            "process_count": self.process_count,
        } | ({} if self.rows is None else {"rows": list(self.rows)})

    @staticmethod
    def from_json(entry: Any) -> Jump:
        """A Jump from its JSON form; StateMismatchError naming what is wrong."""
        fields = ("batch", "batches", "positions", "batch_size", "process_count")
        rows = entry.get("rows") if isinstance(entry, dict) else None
        if rows is not None and (
            not isinstance(rows, list)
            or len(rows) != 2
            or any(type(v) is not int or v < 0 for v in rows)
        ):
            raise StateMismatchError(
                f"pipeline state field 'skips' holds {entry!r}; its rows must be two ints >= 0"
            )
        if not isinstance(entry, dict) or sorted(set(entry) - {"rows"}) != sorted(fields):
            raise StateMismatchError(
                f"pipeline state field 'skips' holds {entry!r}; each entry is a dict with the "
                f"fields {list(fields)}"
            )
        positions = entry["positions"]
        layout = [entry["batch_size"], entry["process_count"]]
        numbers = [entry["batch"], entry["batches"], *layout]
        if isinstance(positions, list) and len(positions) == 2:
            numbers += positions
        if len(numbers) != 6 or any(type(v) is not int for v in numbers) or min(numbers[:5]) < 0:
            raise StateMismatchError(
                f"pipeline state field 'skips' holds {entry!r}; batch, batches, batch_size, "
                "process_count and the positions [first, last] must be ints, all but last >= 0"
            )
        first, last = positions
        if min(layout) < 1 or last < first - 1:
            raise StateMismatchError(f"pipeline state field 'skips' holds {entry!r}")
        jump = Jump(entry["batch"], entry["batches"], first, last + 1, *layout)
        return jump if rows is None else dataclasses.replace(jump, rows=tuple(rows))


def parse_jumps(value: Any) -> list[Jump]:
    """The jumps of a saved state's 'skips' field (absent: none), checked to be in order."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise StateMismatchError(f"pipeline state field 'skips' must be a list, got {value!r}")
    jumps = [Jump.from_json(entry) for entry in value]
    for before, after in zip(jumps, jumps[1:], strict=False):
        if after.batch < before.batch or after.first < before.stop:
            raise StateMismatchError(
                f"pipeline state field 'skips' is out of order: {before.to_json()} then "
                f"{after.to_json()}"
            )
    return jumps


def add_jump(jumps: list[Jump], jump: Jump) -> list[Jump]:
    """`jumps` with `jump` appended, merged into the last one when it continues it (a skip
    right after a skip at the same batch and layout)."""
    if jumps:
        last = jumps[-1]
        if (
            last.batch == jump.batch
            and last.stop == jump.first
            and (last.batch_size, last.process_count) == (jump.batch_size, jump.process_count)
        ):
            rows = None if last.rows is None else (last.rows[0], jump.rows[1])
            merged = dataclasses.replace(
                last, batches=last.batches + jump.batches, stop=jump.stop, rows=rows
            )
            return [*jumps[:-1], merged]
    return [*jumps, jump]


@dataclasses.dataclass(frozen=True)
class BatchLine:
    """Where a pipeline stands: `emitted` batches delivered, the next at global `position`,
    `global_batch` positions per global batch, past `jumps`."""

    emitted: int
    position: int
    global_batch: int
    jumps: Sequence[Jump]

    def start_of(self, batch_number: int) -> tuple[int, Jump | None]:
        """(the first global position of global batch `batch_number`, the jump whose layout
        (batch size, process count) it was read with; None: the current layout)."""
        if not isinstance(batch_number, int) or isinstance(batch_number, bool) or batch_number < 0:
            raise ConfigError(f"batch_number must be an int >= 0, got {batch_number!r}")
        era = None
        for jump in self.jumps:
            if batch_number < jump.batch:
                start = jump.first - (jump.batch - batch_number) * jump.global_batch
                era = jump
                break
        else:
            start = self.position - (self.emitted - batch_number) * self.global_batch
        if start < 0:
            raise ConfigError(
                f"batch {batch_number} would start at global position {start}, before the "
                "stream's start: this pipeline's state does not reach back that far (its source "
                "was moved by hand, not by delivering batches)"
            )
        return start, era


def process_rows(
    start: int, batch_size: int, process_index: int, process_count: int, all_processes: bool
) -> list[tuple[int, int]]:
    """[first, stop) positions of each process's rows of the global batch starting at `start`:
    this process's, or every process's in process order."""
    processes = range(process_count) if all_processes else [process_index]
    return [(start + p * batch_size, start + (p + 1) * batch_size) for p in processes]


def clip_to_end(
    ranges: list[tuple[int, int]], end: int | None, batch_number: int, *, keep_partial: bool
) -> list[tuple[int, int]]:
    """The ranges cut at a finite stream's `end`; ConfigError when the batch lies past it."""
    if end is None:
        return ranges
    first, stop = ranges[0][0], ranges[-1][1]
    if first >= end or (stop > end and not keep_partial):
        raise ConfigError(
            f"batch {batch_number} lies past the end of this finite stream ({end} positions): "
            "the pipeline never delivers it"
        )
    return [(a, min(b, end)) for a, b in ranges if a < end]


_FILTER_MESSAGE = (
    "a Filter stage makes which records form a batch depend on the data (each batch is filled "
    "from as many records as it takes); {what} needs a pipeline without Filter: filter the data "
    "offline (e.g. when converting it), or drop records in a BatchMap"
)


class BatchRecords:
    """Names the records of a pipeline's batches: from the order alone, or, with
    PackSequences, by re-packing the windows between the pipeline's position and the batch."""

    def __init__(
        self,
        source: RecordSource,
        record_path: RecordPath,
        packing: PackSequences | None,
        batch_size: int,
        process: tuple[int, int],
        *,
        drop_remainder: bool,
        has_filter: bool,
    ):
        self.source = source
        self.record_path = record_path
        self.packing = packing
        self.batch_size = batch_size
        self.process_index, self.process_count = process
        self.keep_last = self.process_count == 1 and not drop_remainder
        self.has_filter = has_filter

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.process_count

    def end(self) -> int | None:
        """The stream's end (global positions) for a finite source, else None."""
        num_epochs = self.source.config.num_epochs
        return None if num_epochs == -1 else num_epochs * self.source.records_per_epoch

    def check_no_filter(self, what: str) -> None:
        if self.has_filter:
            raise ConfigError(_FILTER_MESSAGE.format(what=what))

    def records_of_batch(
        self, batch_number: int, all_processes: bool, line: BatchLine, packed_rows: int
    ) -> list[list[RecordRef]]:
        """One list of RecordRefs per row of batch `batch_number` (see Pipeline)."""
        self.check_no_filter("records_of_batch")
        if self.packing is not None:
            return self._packed_records(batch_number, all_processes, line, packed_rows)
        start, era = line.start_of(batch_number)
        batch_size, process_count = self.batch_size, self.process_count
        if era is not None:
            batch_size, process_count = era.batch_size, era.process_count
        if self.process_index >= process_count and not all_processes:
            return []  # this process did not exist then
        ranges = process_rows(start, batch_size, self.process_index, process_count, all_processes)
        keep_partial = process_count == 1 and self.keep_last
        ranges = clip_to_end(ranges, self.end(), batch_number, keep_partial=keep_partial)
        positions = [position for first, stop in ranges for position in range(first, stop)]
        return [[ref] for ref in self.source.record_refs(positions)]

    def _packed_records(
        self, batch_number: int, all_processes: bool, line: BatchLine, packed_rows: int
    ) -> list[list[RecordRef]]:
        if not isinstance(batch_number, int) or isinstance(batch_number, bool) or batch_number < 0:
            raise ConfigError(f"batch_number must be an int >= 0, got {batch_number!r}")
        window = self.packing.window
        # Rows are counted from the nearest point whose (window, rows) the state knows: the
        # pipeline's position, or the point where the first jump after the batch left.
        anchor = (line.position // window, packed_rows, self.global_batch)
        emitted, batch_size, process_count = line.emitted, self.batch_size, self.process_count
        for jump in line.jumps:
            if batch_number < jump.batch:
                anchor = (jump.first // window, jump.rows[0], jump.global_batch)
                emitted, batch_size, process_count = jump.batch, jump.batch_size, jump.process_count
                break
        if self.process_index >= process_count and not all_processes:
            return []  # this process did not exist then
        first_row = 0 if all_processes else self.process_index * batch_size
        stop_row = anchor[2] if all_processes else first_row + batch_size
        windows = PackedWindows(self._own_record_path(), self.packing, self.end())
        try:
            rows = packed_batch_rows(
                windows.rows,
                anchor,
                batch_number - emitted,
                (first_row, stop_row),
                windows.last_window,
                self.keep_last and process_count == 1,
            )
        except ConfigError as error:
            raise ConfigError(f"batch {batch_number}: {error}") from None
        refs = iter(self.source.record_refs([p for row in rows for p in row]))
        return [[next(refs) for _ in row] for row in rows]

    def _own_record_path(self) -> RecordPath:
        """A RecordPath of this caller's own: the pipeline's may be busy in its prefetch thread."""
        path = self.record_path
        return RecordPath(path.source, path.record_stages, path.rng_seed)

    def skip(self, num_batches: int, line: BatchLine, packed_rows: int) -> Jump:
        """The jump `num_batches` batches ahead of the pipeline (checked; not yet made).

        Without packing it is computed; with PackSequences the windows it passes over are
        packed (their records read) to count their rows."""
        self.check_no_filter("skip")
        if not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 0:
            raise ConfigError(f"num_batches must be an int >= 0, got {num_batches!r}")
        end = self.end()
        layout = (self.batch_size, self.process_count)
        if self.packing is None:
            stop = line.position + num_batches * self.global_batch
            stop = stop if end is None else min(stop, end)
            return Jump(line.emitted, num_batches, line.position, stop, *layout)
        window = self.packing.window
        windows = PackedWindows(self._own_record_path(), self.packing, end)
        first = line.position // window
        last, rows = windows.advance(first, packed_rows, num_batches * self.global_batch)
        stop = last * window if end is None else min(last * window, end)
        jump = Jump(line.emitted, num_batches, line.position, stop, *layout)
        return dataclasses.replace(jump, rows=(packed_rows, rows))
