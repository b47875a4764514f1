"""Chunks and batches: the kept records of a span stacked into arrays, and batches cut from them.

A batch cut from chunks holds exactly the arrays that stacking its own records would give, so
batches do not depend on where spans start (resume) or which process computed them (workers).
Stacking never changes a value: fields whose records disagree (a missing field, another shape,
another type, an int beyond int64) raise an error that names the field and the records.
"""

from __future__ import annotations

import collections
import dataclasses
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from resumax.errors import ConfigError, StageError

_dtype_of = operator.attrgetter("dtype")
_shape_of = operator.attrgetter("shape")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Python scalar types numpy turns into one dtype without losing anything (ints are range checked).
_EXACT_SCALARS = {bool: np.bool_, int: np.int64, float: np.float64, complex: np.complex128}
# Records named in an error message; the rest are counted.
_NAMED_RECORDS = 5

Describe = Callable[[Sequence[int]], str]


def describe_positions(positions: Sequence[int]) -> str:
    """Names up to a few global positions (epoch * records_per_epoch + index) for a message."""
    shown = ", ".join(str(int(position)) for position in positions[:_NAMED_RECORDS])
    more = len(positions) - _NAMED_RECORDS
    noun = "position" if len(positions) == 1 else "positions"
    return f"{noun} {shown}" + (f" and {more} more" if more > 0 else "")


@dataclasses.dataclass
class Chunk:
    """The records of one span that every stage kept, with their global positions.

    `examples` holds stacked fields when all records share fields and per-field types (a few
    arrays travel cheaply from a worker), else the list of examples. `span` is the [start, stop)
    of positions the chunk was read from, kept or not.
    """

    examples: dict[str, np.ndarray] | list[Any]
    positions: np.ndarray
    span: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.positions)

    def examples_between(self, start: int, stop: int) -> list[Any]:
        """Examples [start, stop) as a list (rows of the stacked fields, if stacked)."""
        if isinstance(self.examples, list):
            return self.examples[start:stop]
        fields = self.examples.items()
        return [{key: values[row] for key, values in fields} for row in range(start, stop)]


# One field of many records -> one array, exactly ---------------------------------------------


class _Mismatch(Exception):
    """The values of one field cannot be stacked exactly; `rows` are the records at fault."""

    def __init__(self, kind: str, detail: str, rows: list[int]):
        super().__init__(detail)
        self.kind, self.detail, self.rows = kind, detail, rows


def _dtype_key(dtype: np.dtype, exact_width: bool) -> Any:
    """What must agree between records: the dtype (strings: the kind, unless `exact_width`)."""
    if exact_width or dtype.kind not in "US":
        return dtype
    return "str" if dtype.kind == "U" else "bytes"


def _check_strings(values: list[Any]) -> None:
    """numpy drops trailing NUL characters of str/bytes values: refuse rather than change them."""
    rows = [row for row, value in enumerate(values) if value[-1:] in ("\x00", b"\x00")]
    if rows:
        raise _Mismatch("lossy", "a string ends with a NUL character, which numpy drops", rows)


def _check_int_range(values: list[int]) -> None:
    if min(values) >= _INT64_MIN and max(values) <= _INT64_MAX:
        return
    rows = [row for row, value in enumerate(values) if not _INT64_MIN <= value <= _INT64_MAX]
    raise _Mismatch("lossy", "an int lies beyond int64 (numpy would make it uint64 or float)", rows)


def _exact_array(value: Any, row: int) -> np.ndarray:
    """One record's value as an array holding exactly that value."""
    if isinstance(value, (str, bytes)):  # numpy's str_ and bytes_ too
        _check_strings([value])
        return np.asarray(value)
    if isinstance(value, (np.ndarray, np.generic)):
        return np.asarray(value)
    kind = type(value)
    if kind in _EXACT_SCALARS:
        if kind is int:
            _check_int_range([value])
        return np.asarray(value, dtype=_EXACT_SCALARS[kind])
    if isinstance(value, (list, tuple)):
        return _exact_nested(value, row)
    return np.asarray(value)


def _exact_nested(value: list | tuple, row: int) -> np.ndarray:
    """A (nested) list as an array, if its leaves are of one type that converts exactly."""
    try:
        leaves = np.asarray(value, dtype=object).ravel().tolist()
        array = np.asarray(value)
    except ValueError as error:
        raise _Mismatch("shape", f"a nested list is ragged ({error})", [row]) from error
    leaf_types = set(map(type, leaves))
    if len(leaf_types) > 1:
        names = ", ".join(sorted(kind.__name__ for kind in leaf_types))
        raise _Mismatch("type", f"a list mixes {names} values", [row])
    if leaf_types == {int} and array.dtype != np.int64:
        raise _Mismatch("lossy", "a list holds ints beyond int64", [row])
    if array.dtype.kind in "US":
        _check_strings(leaves)
    return array


def _require_one(keys: list[Any], kind: str, name: str) -> None:
    """Raises _Mismatch naming the records of the rarest key unless all `keys` are equal."""
    distinct = dict.fromkeys(keys)
    if len(distinct) <= 1:
        return
    counts = collections.Counter(keys)
    rarest = min(distinct, key=counts.__getitem__)
    rows = [row for row, key in enumerate(keys) if key == rarest]
    listed = ", ".join(map(str, distinct))
    raise _Mismatch(kind, f"records disagree on its {name}: {listed}; {rarest} is rarest", rows)


def exact_stack(values: list[Any], *, exact_width: bool = False) -> np.ndarray:
    """`np.stack` of one field's values when that changes no value, else raises _Mismatch.

    Every record must give the same shape and dtype (Python ints: int64, floats: float64,
    bools: bool); strings may differ in length unless `exact_width`. Common cases (numpy values
    of one dtype, Python scalars of one type) take C-level paths.
    """
    types = set(map(type, values))
    if len(types) == 1:
        (kind,) = types
        numpy_value = issubclass(kind, np.generic) and not issubclass(kind, (str, bytes))
        if kind is np.ndarray or numpy_value:
            shapes = list(map(_shape_of, values))
            _require_one(shapes, "shape", "shape")
            dtypes = [_dtype_key(dtype, exact_width) for dtype in map(_dtype_of, values)]
            _require_one(dtypes, "type", "dtype")
            if shapes[0]:
                return np.concatenate(values).reshape(len(values), *shapes[0])
            return np.array(values)
        if kind in _EXACT_SCALARS:
            if kind is int:
                _check_int_range(values)
            return np.array(values, dtype=_EXACT_SCALARS[kind])
    arrays = [_exact_array(value, row) for row, value in enumerate(values)]
    _require_one([array.shape for array in arrays], "shape", "shape")
    _require_one([_dtype_key(array.dtype, exact_width) for array in arrays], "type", "dtype")
    return np.stack(arrays)


# Chunks (in worker processes) and batches (in the pipeline's process) ------------------------


def stack_if_uniform(examples: list[Any]) -> dict[str, np.ndarray] | list[Any]:
    """Stacked fields if every example is a dict with the same fields that stack exactly.

    Strings must also share their length: a batch cut from several chunks then holds the same
    arrays as one stacked from its own records, whatever the chunk boundaries. Anything else
    stays a list, and `stack` names the problem if it reaches a batch.
    """
    if not examples or set(map(type, examples)) != {dict}:
        return examples
    keys = examples[0].keys()
    if set(map(len, examples)) != {len(keys)}:  # with every key of the first: the same keys
        return examples
    stacked = {}
    for key in keys:
        try:
            values = list(map(operator.itemgetter(key), examples))
            stacked[key] = exact_stack(values, exact_width=True)
        except (KeyError, _Mismatch):
            return examples
    return stacked


Piece = tuple[Chunk, int, int]


def _field_error(key: str, mismatch: _Mismatch, rows_described: str) -> Exception:
    if mismatch.kind == "shape":
        return StageError(
            f"cannot batch field {key!r}: its shape differs between the records of a batch "
            f"({mismatch.detail}, at {rows_described}). Give it one shape per record: "
            "pad it with resumax.Pad (per record, adds a mask) or pack token sequences into "
            "fixed-length rows with resumax.PackSequences"
        )
    if mismatch.kind == "type":
        remedy = (
            "give the field one type in every record (cast it in a Map stage, e.g. np.float32(x))"
        )
    else:
        remedy = "convert it in a Map stage to a value numpy holds exactly (e.g. np.uint64, bytes)"
    return ConfigError(
        f"cannot batch field {key!r} without changing values: {mismatch.detail}, at "
        f"{rows_described}. resumax never promotes or truncates a value; {remedy}"
    )


def _check_fields(examples: list[Any], positions: Sequence[int], describe: Describe) -> list:
    """The batch's field names; StageError naming a record that is not a dict or lacks a field."""
    for example, position in zip(examples, positions, strict=True):
        if not isinstance(example, Mapping):
            raise StageError(
                f"the record at {describe([position])} is a {type(example).__name__}, not a dict "
                "of fields; every per-record stage must return a dict"
            )
    keys = list(examples[0])
    key_sets = set(map(frozenset, examples))
    if len(key_sets) == 1:
        return keys
    every = [key for example in examples for key in example]
    for key in dict.fromkeys(every):
        lacking = [p for e, p in zip(examples, positions, strict=True) if key not in e]
        if lacking:
            raise StageError(
                f"field {key!r} is in some records of a batch but {describe(lacking)} lack it; "
                "every record must have the same fields (whatever the shuffle puts in a batch). "
                "Add the field to every record in a Map stage (with a default value), or remove it"
            )
    return keys


def stack(
    examples: list[Any],
    positions: Sequence[int] | None = None,
    describe: Describe = describe_positions,
) -> dict[str, np.ndarray]:
    """Stacks each field of the examples into one array, exactly.

    A missing field, a non-dict record or a shape that differs raises StageError; values that
    would be promoted or truncated raise ConfigError; each names the field and the records.
    """
    positions = list(range(len(examples))) if positions is None else list(positions)
    batch = {}
    for key in _check_fields(examples, positions, describe):
        try:
            batch[key] = exact_stack([example[key] for example in examples])
        except _Mismatch as mismatch:
            described = describe([positions[row] for row in mismatch.rows])
            raise _field_error(key, mismatch, described) from None
    return batch


def _concatenable(chunks: list[dict[str, np.ndarray]]) -> bool:
    """True if concatenating the chunks' arrays promotes no dtype and meets no other shape.

    Strings may differ in width: each chunk holds strings of one length (`stack_if_uniform`),
    so the concatenation has the width of the batch's longest, as stacking its records would.
    """
    first = chunks[0]
    for examples in chunks[1:]:
        if examples.keys() != first.keys():
            return False
        for key, values in examples.items():
            dtype, other = _dtype_key(values.dtype, False), _dtype_key(first[key].dtype, False)
            if dtype != other or values.shape[1:] != first[key].shape[1:]:
                return False
    return True


def combine(pieces: list[Piece], describe: Describe = describe_positions) -> dict[str, np.ndarray]:
    """One batch from [start, stop) slices of chunks: the same arrays as stacking its records.

    A batch that is one whole stacked chunk (no Filter, no epoch edge inside) is used as is.
    """
    chunks = [chunk.examples for chunk, _, _ in pieces]
    if all(isinstance(examples, dict) for examples in chunks):
        chunk, start, stop = pieces[0]
        if len(pieces) == 1 and (start, stop) == (0, len(chunk)):
            return chunk.examples
        if _concatenable(chunks):
            return {
                key: np.concatenate([c.examples[key][a:b] for c, a, b in pieces])
                for key in chunks[0]
            }
    examples = [example for c, a, b in pieces for example in c.examples_between(a, b)]
    positions = [p for c, a, b in pieces for p in c.positions[a:b].tolist()]
    return stack(examples, positions, describe)


def batch_positions(pieces: list[Piece]) -> list[int]:
    """The global positions of a batch's records."""
    return [p for chunk, start, stop in pieces for p in chunk.positions[start:stop].tolist()]


class BatchFields:
    """Holds every batch of one iteration to the fields and dtypes of its first batch.

    Within a batch, `stack` finds records that disagree; this finds whole batches that do (a
    field every record of one batch lacks), so the policy does not depend on the shuffle.
    """

    def __init__(self, describe: Describe = describe_positions):
        self._describe = describe
        self._first: dict[str, Any] | None = None

    def check(self, batch: dict[str, np.ndarray], pieces: list[Piece]) -> None:
        """Raises StageError (fields) or ConfigError (dtypes) if `batch`, combined from
        `pieces`, differs from the first."""
        fields = {key: _dtype_key(np.asarray(value).dtype, False) for key, value in batch.items()}
        if self._first is None:
            self._first = fields
            return
        if fields == self._first:
            return
        records = self._describe(batch_positions(pieces))
        for key in self._first.keys() ^ fields.keys():
            which = "lack" if key in self._first else "have"
            raise StageError(
                f"field {key!r}: every record of the batch of {records} {which}s it, unlike "
                "the records of earlier batches; every record must have the same fields. Add "
                "the field to every record in a Map stage (with a default value), or remove it"
            )
        for key, dtype in fields.items():
            if dtype != self._first[key]:
                raise ConfigError(
                    f"cannot batch field {key!r} without changing values: it is {dtype} in the "
                    f"batch of {records} but {self._first[key]} in earlier batches. resumax "
                    "never promotes a value; give the field one type in every record (cast it "
                    "in a Map stage)"
                )
