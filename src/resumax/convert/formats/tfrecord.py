"""TFRecord files of `tf.train.Example`, without TensorFlow: the framing (length, masked CRC32C
of the length, data, masked CRC32C of the data) is checked record by record, and each record is
parsed as `resumax.TFExample` parses it. Records are named from 0.

A bad data CRC or an Example that does not parse is a bad record; a bad length CRC or a
truncated file ends the file's framing, so it fails the conversion even under --skip-bad.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import IO, Any

import google_crc32c
import numpy as np

from resumax.convert.formats.base import Item, Reader
from resumax.convert.values import BadRecord
from resumax.errors import DataSourceError, RecordDecodeError
from resumax.records.tfexample import TFExample

_HEADER = struct.Struct("<QI")
_MASK_DELTA = 0xA282EAD8


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC32C of `data`."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """`data` framed as one TFRecord record (what TensorFlow's TFRecordWriter writes)."""
    length = struct.pack("<Q", len(data))
    return b"".join(
        (length, struct.pack("<I", masked_crc(length)), data, struct.pack("<I", masked_crc(data)))
    )


def _header(file: IO, unit: str, number: int) -> int | None:
    """The length of record `number`, or None at the end of the file."""
    header = file.read(_HEADER.size)
    if not header:
        return None
    if len(header) < _HEADER.size:
        raise DataSourceError(f"{unit}, record {number}: the file ends inside a record header")
    length, stored = _HEADER.unpack(header)
    actual = masked_crc(header[:8])
    if actual != stored:
        raise DataSourceError(
            f"{unit}, record {number}: the length's CRC is {actual:#010x} where the file says "
            f"{stored:#010x}; the file is corrupt from here on (is it a TFRecord file, and not "
            "compressed?)"
        )
    return length


def _framed(file: IO, unit: str, start: int, stop: int | None) -> Iterator[bytes | BadRecord]:
    number = 0
    while (stop is None or number < stop) and (length := _header(file, unit, number)) is not None:
        if number < start:
            file.seek(length + 4, 1)
            number += 1
            continue
        data, footer = file.read(length), file.read(4)
        if len(data) < length or len(footer) < 4:
            raise DataSourceError(f"{unit}, record {number}: the file ends inside the record")
        (stored,) = struct.unpack("<I", footer)
        actual = masked_crc(data)
        if actual != stored:
            reason = f"the data's CRC is {actual:#010x} where the file says {stored:#010x}"
            yield BadRecord(f"{unit}, record {number}", reason)
        else:
            yield data
        number += 1


def _storable(name: str, value: Any) -> Any:
    """A TFExample value the record codec stores: a list of bytes as a numpy bytes array (exact
    unless a value ends with a NUL byte, which numpy would drop)."""
    if not isinstance(value, list):
        return value
    if any(item.endswith(b"\0") for item in value):
        raise RecordDecodeError(
            f"feature {name!r} holds several byte strings, one ending in a NUL byte, which a "
            "record cannot store exactly; if it has one value, declare it with --features as "
            "shape []"
        )
    return np.array(value, dtype=bytes)


class TFRecordReader(Reader):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.parse = TFExample(self.options.features)

    def count(self, unit: str) -> int:
        count = 0
        with self.open(unit) as file:
            while (length := _header(file, unit, count)) is not None:
                file.seek(length + 4, 1)
                count += 1
        return count

    def read(self, unit: str, start: int = 0, stop: int | None = None) -> Iterator[Item]:
        fields = self.options.fields
        with self.open(unit) as file:
            for number, data in enumerate(_framed(file, unit, start, stop), start=start):
                if isinstance(data, BadRecord):
                    yield data
                    continue
                try:
                    parsed = self.parse(data)
                    if fields is not None:
                        missing = [name for name in fields if name not in parsed]
                        if missing:
                            raise RecordDecodeError(f"has no feature {missing[0]!r}")
                        parsed = {name: parsed[name] for name in fields}
                    yield {name: _storable(name, value) for name, value in parsed.items()}
                except RecordDecodeError as error:
                    yield BadRecord(f"{unit}, record {number}", str(error))
