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
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclasses.dataclass(frozen=True)
class BadRecord:
    """A line, row or record that cannot be converted: where it is, and why."""

    where: str  # e.g. "data/a.jsonl, line 7"
    reason: str


class RecordError(ValueError):
    """Raised by value conversion for one record; readers turn it into a BadRecord."""


def _str(value: str) -> str:
    return value


def json_value(name: str, value: Any) -> Any:
    """A JSON value (from json.loads or a typed CSV cell) as a record value."""
    convert = _CONVERTERS.get(type(value))  # defined below, with the list converter
    if convert is None:
        if value is None:
            raise RecordError(f"field {name!r} is null; give --fill-null VALUE to replace nulls")
        raise RecordError(
            f"field {name!r} holds a {type(value).__name__} (a nested object); a record field "
            "must be a number, a string or a list of numbers: flatten it, or leave it out with "
            "--fields"
        )
    try:
        return convert(value)
    except OverflowError:
        raise RecordError(f"field {name!r} holds {value}, outside the int64 range") from None
    except ValueError as error:
        raise RecordError(f"field {name!r} {error}") from None


def _all_strings(value: list) -> bool:
    return all(
        _all_strings(item) if isinstance(item, list) else isinstance(item, str) for item in value
    )


def _list_array(value: list) -> np.ndarray:
    try:
        array = np.asarray(value)
    except ValueError as error:
        raise ValueError(f"holds a ragged list: {error}") from None
    kind = array.dtype.kind
    if kind == "i":
        return array.astype(np.int64, copy=False)
    if kind == "f":
        return array.astype(np.float64, copy=False)
    if kind == "b":
        return array
    if kind == "u":
        raise ValueError("holds integers outside the int64 range")
    if kind == "U" and _all_strings(value):
        return array
    raise ValueError(
        f"holds a list mixing types or holding nulls or objects ({str(value)[:60]}); a list "
        "must hold only numbers or only strings"
    )


# By exact type, the most common first: one dict lookup per value.
_CONVERTERS: dict[type, Callable[[Any], Any]] = {
    int: np.int64,  # OverflowError outside the int64 range
    float: np.float64,
    str: _str,
    bool: np.bool_,
    list: _list_array,
}


def csv_value(text: str) -> Any:
    """A CSV cell as a JSON-like value: int, float, str, or None for an empty cell. Only a cell
    that starts like a number (a digit, a sign or a point) is tried as one."""
    if text == "":
        return None
    if not (text[0].isdigit() or text[0] in "+-."):
        return text
    if _INT.match(text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def csv_cell(text: str) -> Any:
    """`csv_value` as a record value directly: np.int64, np.float64, str, or None (an empty
    cell, or an int outside int64, which the caller refuses). Inlined: it runs once per cell."""
    if not text:
        return None
    first = text[0]
    if not (first.isdigit() or first in "+-."):
        return text
    if len(text) < 19 and text.isdigit() and text.isascii():  # the common int, in range
        return np.int64(int(text))
    if _INT.match(text):
        value = int(text)
        return np.int64(value) if _INT64_MIN <= value <= _INT64_MAX else None
    try:
        return np.float64(float(text))
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
    if options.fields is None and options.fill_null is None and convert is json_value:
        try:  # the common case, one lookup per value; on any failure the loop below says why
            return {name: _CONVERTERS[type(value)](value) for name, value in raw.items()}
        except (KeyError, ValueError, OverflowError):
            pass
    elif options.fields is None and options.fill_null is None:
        return {name: convert(name, value) for name, value in raw.items()}
    names = options.fields if options.fields is not None else raw.keys()
    record = {}
    for name in names:
        if name not in raw:
            raise RecordError(f"has no field {name!r} (it has {sorted(raw)})")
        value = raw[name]
        if value is None and options.fill_null is not None:
            value = options.fill_value()
        record[name] = convert(name, value)
    return record
