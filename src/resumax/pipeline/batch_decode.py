"""Batch-level decode: the records of a span that share one layout, decoded and stacked in a few
numpy operations over their joined bytes instead of one `decode` and one dict per record.

Records written by `resumax.records.encode` from examples of one layout (same keys, dtypes and
shapes) have equal length and identical bytes outside the array payloads. The first record's
layout is parsed once; the span's bytes are joined into an (n, length) uint8 array, the bytes
outside the payloads are checked against the first row, and each field is a column of that
array viewed as its dtype (long records skip the join: each field is copied from each record).
Any other span returns None and takes the per-record path, which gives the same arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import numpy as np

from resumax.records import codec

# Numeric and bool dtypes: their bytes are their values, so a column of bytes is a column of
# values. Other dtypes (str, bytes, datetime) and non-native byte orders take the per-record path.
_COLUMN_DTYPE_KINDS = frozenset("biufc")
# Python values that may be shared by every record of a span (immutable, stacked exactly).
_CONSTANT_TYPES = (bool, int, float, str, bytes, type(None))
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Shorter records are joined and cut into columns by a few numpy calls per span; longer ones are
# copied field by field from each record, which saves a copy of the span's bytes.
JOIN_LIMIT = 16 * 1024

# nbytes -> a new, writable uint8 array of that many bytes, where the stacked fields are written.
Allocate = Callable[[int], np.ndarray]


def new_bytes(nbytes: int) -> np.ndarray:
    """The default `Allocate`: private memory."""
    return np.empty(nbytes, dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of a record layout.

    An array field (`constant` unused) has its payload at bytes [start, stop) of every record,
    holds `dtype` values of `shape`, and decodes per record to an array, or to a numpy scalar
    when `scalar` (a numpy scalar was encoded). A constant field holds the same Python value in
    every record; its bytes belong to the template.
    """

    key: str
    start: int = 0
    stop: int = 0
    dtype: np.dtype | None = None
    shape: tuple[int, ...] = ()
    scalar: bool = False
    constant: Any = None

    @property
    def is_array(self) -> bool:
        return self.dtype is not None


@dataclasses.dataclass(frozen=True)
class RecordLayout:
    """Where the values of a record in resumax's codec lie in its bytes.

    `template` lists the [start, stop) byte ranges outside array payloads: records of this layout
    have the first record's bytes there.
    """

    length: int
    fields: tuple[Field, ...]
    template: tuple[tuple[int, int], ...]
    first_record: np.ndarray

    def matches(self, records: np.ndarray | Sequence[bytes]) -> bool:
        """True if every record (a row of joined bytes, or bytes) has this layout's length and
        the first record's bytes outside the payloads."""
        first = self.first_record
        if isinstance(records, np.ndarray):
            return records.shape[1] == self.length and all(
                (records[:, a:b] == first[a:b]).all() for a, b in self.template
            )
        template = [(a, b, first[a:b].tobytes()) for a, b in self.template]
        return all(
            len(data) == self.length and all(data[a:b] == part for a, b, part in template)
            for data in records
        )

    def columns(
        self, records: np.ndarray | Sequence[bytes], allocate: Allocate = new_bytes
    ) -> dict[str, np.ndarray]:
        """Each field of the records (which `matches`) stacked in new memory from `allocate`
        (e.g. a worker's shared memory slot): cut from joined rows, or copied from each record
        (one copy instead of two, for long records)."""
        count = len(records)
        arrays = {}
        for field in self.fields:
            if not field.is_array:
                arrays[field.key] = np.stack([field.constant] * count)
                continue
            width = field.stop - field.start
            column = allocate(count * width).reshape(count, width)
            if isinstance(records, np.ndarray):
                np.copyto(column, records[:, field.start : field.stop])
            else:
                for row, data in enumerate(records):
                    column[row] = memoryview(data)[field.start : field.stop]
            if field.stop == field.start:
                arrays[field.key] = np.zeros((count, *field.shape), dtype=field.dtype)
            else:
                arrays[field.key] = column.view(field.dtype).reshape(count, *field.shape)
        return arrays


def _array_field(key: str, ext: msgpack.ExtType, stop: int) -> Field | None:
    """The field of an array (or numpy scalar) extension value ending at byte `stop`."""
    try:
        dtype_str, shape, raw = msgpack.unpackb(ext.data)
        dtype = np.dtype(dtype_str)
        shape = tuple(shape)
    except Exception:
        return None
    if not isinstance(raw, bytes) or not all(isinstance(size, int) for size in shape):
        return None
    if dtype.kind not in _COLUMN_DTYPE_KINDS or not dtype.isnative or min(shape, default=0) < 0:
        return None
    if len(raw) != dtype.itemsize * int(np.prod(shape)):
        return None
    scalar = ext.code == codec.NUMPY_SCALAR_EXT
    if scalar and shape:
        return None
    return Field(key, stop - len(raw), stop, dtype, shape, scalar)


def _constant_field(key: str, value: Any) -> Field | None:
    if type(value) not in _CONSTANT_TYPES:
        return None
    if type(value) is int and not _INT64_MIN <= value <= _INT64_MAX:
        return None  # stacking would give uint64 or object, or not stack at all
    return Field(key, constant=value)


def parse_layout(data: bytes) -> RecordLayout | None:
    """The layout of one record encoded by `resumax.records.encode`, or None if it has a value
    the column path does not take (see the module docstring)."""
    unpacker = msgpack.Unpacker()
    unpacker.feed(data)
    fields: list[Field] = []
    try:
        num_fields = unpacker.read_map_header()
        for _ in range(num_fields):
            key = unpacker.unpack()
            value = unpacker.unpack()
            if not isinstance(key, str):
                return None
            if isinstance(value, msgpack.ExtType):
                if value.code not in (codec.ARRAY_EXT, codec.NUMPY_SCALAR_EXT):
                    return None
                field = _array_field(key, value, unpacker.tell())
            else:
                field = _constant_field(key, value)
            if field is None:
                return None
            fields.append(field)
    except Exception:
        return None
    if unpacker.tell() != len(data) or not fields:
        return None
    if len({field.key for field in fields}) != len(fields):
        return None
    template, start = [], 0
    for field in fields:
        if field.is_array:
            template.append((start, field.start))
            start = field.stop
    template.append((start, len(data)))
    template = tuple((a, b) for a, b in template if b > a)
    first_record = np.frombuffer(data, dtype=np.uint8)
    return RecordLayout(len(data), tuple(fields), template, first_record)


@dataclasses.dataclass(frozen=True)
class StackedSpan:
    """The fields of a span's records stacked (`arrays`), with the layout they share."""

    arrays: dict[str, np.ndarray]
    layout: RecordLayout

    def examples(self) -> list[dict[str, Any]]:
        """Per-record examples, as `resumax.records.decode` gives them: arrays are read-only
        views of the stacked arrays (decoded arrays are read-only), numpy scalars stay numpy
        scalars and constant fields are the first record's Python values."""
        getters = []
        for field in self.layout.fields:
            if field.is_array:
                values = self.arrays[field.key]
                values.flags.writeable = False
                getters.append((field.key, values, field.scalar))
            else:
                getters.append((field.key, None, field.constant))
        examples = []
        for row in range(len(next(iter(self.arrays.values())))):
            example = {}
            for key, values, extra in getters:
                if values is None:
                    example[key] = extra
                elif extra:
                    example[key] = values[row]
                else:
                    example[key] = values[row, ...]
            examples.append(example)
        return examples


class SpanDecoder:
    """Decodes spans of records at once (`__call__`), keeping the last layout seen: the spans of
    a dataset written by one program then parse no record at all."""

    def __init__(self) -> None:
        self._layout: RecordLayout | None = None

    def __call__(self, raw: Sequence[bytes], allocate: Allocate = new_bytes) -> StackedSpan | None:
        """The stacked fields of records in resumax's codec if they share one layout, else None.

        The arrays equal what decoding each record and stacking them gives (`stack_if_uniform`
        of the decoded records), in new writable memory from `allocate`.
        """
        if not raw:
            return None
        length = len(raw[0])
        if set(map(len, raw)) != {length}:
            return None
        records: np.ndarray | Sequence[bytes] = raw
        if length < JOIN_LIMIT:
            records = np.frombuffer(b"".join(raw), dtype=np.uint8).reshape(len(raw), length)
        layout = self._layout
        if layout is None or not layout.matches(records):
            layout = parse_layout(raw[0])
            if layout is None or not layout.matches(records):
                return None
            self._layout = layout
        return StackedSpan(layout.columns(records, allocate), layout)
