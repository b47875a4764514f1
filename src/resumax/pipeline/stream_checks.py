"""What a pipeline checks between its steps, so that a bad value or an empty stream is an error
that names the stage and the records, never a raw traceback, a silent end or a hang."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from resumax.errors import StageError
from resumax.pipeline.batching import Chunk, describe_positions
from resumax.sources.base import RecordSource
from resumax.stages.transforms import Filter, Stage
from resumax.workers.worker import pickling_error

_NAMED_RECORDS = 5


def describe_records(source: RecordSource, positions: Sequence[int]) -> str:
    """Names records by dataset index (what `source[i]` reads) and epoch position."""
    records_per_epoch = source.records_per_epoch
    named = []
    try:
        for position in list(positions)[:_NAMED_RECORDS]:
            epoch, index = divmod(int(position), records_per_epoch)
            record = int(source.record_indices(epoch, index, index + 1)[0])
            named.append(f"{record} (epoch {epoch}, position {index})")
    except Exception:  # a source whose order cannot say: global positions still name them
        return describe_positions(positions)
    more = len(positions) - len(named)
    noun = "record" if len(positions) == 1 else "records"
    return f"{noun} {', '.join(named)}" + (f" and {more} more" if more > 0 else "")


def _non_array_leaf(value: Any, path: str = "") -> tuple[str, Any] | None:
    """(path, leaf) of the first leaf of nested dicts that is not an array, or None."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            found = _non_array_leaf(item, f"{path}[{key!r}]")
            if found is not None:
                return found
        return None
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return None
    return path, value


def require_batch(value: Any, stage_name: str, records: Callable[[], str]) -> None:
    """Raises StageError unless a batch stage returned a batch: a dict (nested dicts allowed)
    whose leaves are arrays (numpy or jax). `records()` names the batch's records."""
    expected = "a batch stage must return the batch, a dict of arrays"
    if not isinstance(value, Mapping):
        raise StageError(
            f"batch stage ({stage_name}) returned {type(value).__name__} {_short(value)} for the "
            f"batch of {records()}; {expected} (did it forget to return the batch?)"
        )
    found = _non_array_leaf(value)
    if found is not None:
        path, leaf = found
        raise StageError(
            f"batch stage ({stage_name}) returned a batch whose field {path} is "
            f"{type(leaf).__name__} {_short(leaf)}, not an array, for the batch of {records()}; "
            f"{expected} (wrap values with np.asarray)"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class FilterStarvation:
    """Notices a stream whose Filter stages keep nothing, which would otherwise never end.

    Fed the span and kept positions of each chunk of an infinite run; raises StageError once
    every position of a whole epoch that this process reads has passed without a record kept.
    A whole epoch, not any `records_per_epoch` consecutive positions: a Filter that keeps one
    record per epoch keeps it somewhere in every epoch, wherever the shuffle puts it. A finite
    run (`end` set) ends on its own, with whatever it kept: never an error.
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        records_per_epoch: int,
        start: int,
        end: int | None,
    ):
        filters = [
            f"stage {position} ({stage.name})"
            for position, stage in enumerate(stages)
            if isinstance(stage, Filter)
        ]
        self._culprit = "the Filter " + " / ".join(filters) if filters else "the per-record stages"
        self._records_per_epoch = records_per_epoch
        self._end = end
        self._empty_since = start

    def observe(self, span: tuple[int, int] | None, kept: Sequence[int]) -> None:
        """Records one chunk: `span` [start, stop) read, `kept` its positions kept."""
        if len(kept):
            self._empty_since = int(kept[-1]) + 1
            return
        if span is None or self._end is not None:
            return
        per_epoch = self._records_per_epoch
        first_whole_epoch = -(-self._empty_since // per_epoch)
        if (first_whole_epoch + 1) * per_epoch <= span[1]:
            raise StageError(
                f"{self._culprit} kept no record of a whole epoch (epoch {first_whole_epoch}, "
                f"{per_epoch} records per epoch, positions {self._empty_since} to {span[1]} "
                "read on this process): the pipeline would read forever without making a "
                "batch. Check the predicate: it must return True for the records to keep"
            )


def watch_windows(
    windows: Iterator[Mapping[str, Any]],
    starvation: FilterStarvation,
    first_window: int,
    window: int,
) -> Iterator[Mapping[str, Any]]:
    """The packed rows of consecutive windows (from `first_window`, `window` positions each),
    telling `starvation` which windows produced no row, so that a packed stream whose stages
    keep nothing raises StageError too instead of reading forever."""
    for index, rows in enumerate(windows, start=first_window):
        span = (index * window, (index + 1) * window)
        produced = len(next(iter(rows.values()), ()))
        starvation.observe(span, [span[1] - 1] if produced else [])
        yield rows


def record_producer(stages: Sequence[Stage]) -> str:
    """Names what made the records that reach batching: the last per-record map, or decode."""
    for position in reversed(range(len(stages))):
        if not isinstance(stages[position], Filter):
            return f"stage {position} ({stages[position].name})"
    return "the source's decode"


def require_records(
    examples: list[Any],
    producer: str,
    epoch: int,
    record_indices: Sequence[int],
    positions: Sequence[int],
) -> None:
    """Raises StageError naming `producer` and the record unless every example is a dict."""
    if set(map(type, examples)) <= {dict}:
        return
    for example, record, position in zip(examples, record_indices, positions, strict=True):
        if not isinstance(example, Mapping):
            raise StageError(
                f"{producer} returned {type(example).__name__} {_short(example)} for record "
                f"{record} (epoch {epoch}, position {position}); a per-record stage must return "
                "the record, a dict of fields (did it forget to return it?)"
            )


def unsendable_error(
    chunk: Chunk, producer: str, source: RecordSource, error: Exception
) -> StageError:
    """The StageError for a chunk a worker cannot pickle: names the first field and record whose
    value cannot be pickled, and `producer`, the stage that made it."""
    for row, example in enumerate(chunk.examples_between(0, len(chunk))):
        for key, value in example.items():
            field_error = pickling_error(value)
            if field_error is not None:
                record = describe_records(source, [int(chunk.positions[row])])
                return StageError(
                    f"{producer} returned a value that cannot be sent from a worker process to "
                    f"the pipeline: field {key!r} of {record} is {type(value).__name__} "
                    f"{_short(value)} ({field_error}). Return numpy arrays and plain Python "
                    "values, or use num_workers=0"
                )
    return StageError(
        f"the records {producer} returned at {describe_positions(chunk.positions.tolist())} "
        f"cannot be sent from a worker process to the pipeline: {error!r}"
    )
