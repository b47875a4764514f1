"""Input values as record values: JSON and CSV values as numpy scalars and arrays, fields kept
and ordered as `--fields` says, nulls filled or refused; and the bad record a reader reports.

JSON and CSV: integers become np.int64, floats np.float64, booleans np.bool_, strings str, and
lists of numbers (or of strings, or nested rectangular lists) numpy arrays.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from resumax.convert.options import ConvertOptions

_INT = re.compile(r"^[+-]?\d+$")
_INT64 = (-(2**63), 2**63 - 1)


@dataclasses.dataclass(frozen=True)
class BadRecord:
    """A line, row or record that cannot be converted: where it is, and why."""

    where: str  # e.g. "data/a.jsonl, line 7"
    reason: str


class RecordError(ValueError):
    """Raised by value conversion for one record; readers turn it into a BadRecord."""


def json_value(name: str, value: Any) -> Any:
    """A JSON value (from json.loads or a typed CSV cell) as a record value."""
    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise RecordError(f"field {name!r} holds {value}, outside the int64 range")
        return np.int64(value)
    if isinstance(value, float):
        return np.float64(value)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _list_array(name, value)
    if value is None:
        raise RecordError(f"field {name!r} is null")
    raise RecordError(
        f"field {name!r} holds a {type(value).__name__} (a nested object); a record field "
        "must be a number, a string or a list of numbers: flatten it, or leave it out with "
        "--fields"
    )


def _list_array(name: str, value: list) -> np.ndarray:
    try:
        array = np.asarray(value)
    except ValueError as error:
        raise RecordError(f"field {name!r} holds a ragged list: {error}") from None
    kind = array.dtype.kind
    if kind == "i":
        return array.astype(np.int64)
    if kind == "u":
        raise RecordError(f"field {name!r} holds integers outside the int64 range")
    if kind in "fb":
        return array.astype(np.float64) if kind == "f" else array
    if kind == "U" and all(isinstance(item, str) for item in array.flat):
        return array
    raise RecordError(
        f"field {name!r} holds a list mixing types or holding nulls or objects "
        f"({str(value)[:60]}); a list must hold only numbers or only strings"
    )


def csv_value(text: str) -> Any:
    """A CSV cell as a JSON-like value: int, float, str, or None for an empty cell."""
    if text == "":
        return None
    if _INT.match(text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def make_record(
    raw: Mapping[str, Any],
    options: ConvertOptions,
    convert: Callable[[str, Any], Any],
) -> dict[str, Any]:
    """The record of one input row: `options.fields` (all fields, in input order, when None),
    each converted by `convert(name, value)`; nulls replaced by `options.fill_null` or refused.
    RecordError names a missing field or a null."""
    names = options.fields if options.fields is not None else raw.keys()
    record = {}
    for name in names:
        if name not in raw:
            raise RecordError(f"has no field {name!r} (it has {sorted(raw)})")
        value = raw[name]
        if value is None:
            if options.fill_null is None:
                raise RecordError(
                    f"field {name!r} is null; give --fill-null VALUE to replace nulls"
                )
            value = options.fill_value()
        record[name] = convert(name, value)
    return record
