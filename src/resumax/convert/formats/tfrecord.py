"""TFRecord files of `tf.train.Example`, without TensorFlow: the framing (length, masked CRC32C
of the length, data, masked CRC32C of the data) is checked record by record, and each record is
parsed as `resumax.TFExample` parses it. Records are named from 0.

A bad data CRC or an Example that does not parse is a bad record; a bad length CRC or a
truncated file ends the file's framing, so it fails the conversion even under --skip-bad.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from typing import IO, Any

import google_crc32c
import numpy as np

from resumax.convert.formats.base import Item, Reader
from resumax.convert.values import BadRecord
from resumax.errors import DataSourceError, RecordDecodeError
from resumax.records import tfexample
from resumax.records.tfexample import TFExample

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
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


def _check_length(length: bytes, stored: int, unit: str, number: int) -> None:
    """Raises DataSourceError if the masked CRC of record `number`'s length is not `stored`."""
    actual = masked_crc(length)
    if actual != stored:
        raise DataSourceError(
            f"{unit}, record {number}: the length's CRC is {actual:#010x} where the file says "
            f"{stored:#010x}; the file is corrupt from here on (is it a TFRecord file, and not "
            "compressed?)"
        )


_BLOCK = 1 << 22  # bytes read at a time: records are framed in memory, not read one by one


def _frames(file: IO, unit: str, start: int) -> Iterator[tuple[int, bytes | BadRecord | None]]:
    """(number, data) of each record of the file, read in blocks; the data is a BadRecord if its
    CRC is bad, None before record `start` (not checked, and not read unless it was in a block)."""
    buffer, offset, number = b"", 0, 0
    while True:
        if len(buffer) - offset < _HEADER.size:
            buffer, offset = buffer[offset:] + file.read(_BLOCK), 0
            if not buffer:
                return
            if len(buffer) < _HEADER.size:
                raise DataSourceError(
                    f"{unit}, record {number}: the file ends inside a record header"
                )
        length, stored = _HEADER.unpack_from(buffer, offset)
        _check_length(buffer[offset : offset + 8], stored, unit, number)
        end = offset + _HEADER.size + length + 4
        if end > len(buffer):
            if number < start:  # move past it without reading it
                file.seek(end - len(buffer), 1)
                yield number, None
                buffer, offset, number = b"", 0, number + 1
                continue
            buffer = buffer[offset:] + file.read(max(_BLOCK, end - len(buffer)))
            offset, end = 0, end - offset
            if end > len(buffer):
                raise DataSourceError(f"{unit}, record {number}: the file ends inside the record")
        if number < start:
            yield number, None
        else:
            data = buffer[offset + _HEADER.size : end - 4]
            (stored,) = _FOOTER.unpack_from(buffer, end - 4)
            actual = masked_crc(data)
            if actual == stored:
                yield number, data
            else:
                reason = f"the data's CRC is {actual:#010x} where the file says {stored:#010x}"
                yield number, BadRecord(f"{unit}, record {number}", reason)
        offset, number = end, number + 1


def _bytes_array(name: str, values: list[bytes]) -> np.ndarray:
    """A TFExample list of bytes as the numpy bytes array the record codec stores (exact unless
    a value ends with a NUL byte, which numpy would drop)."""
    if any(item.endswith(b"\0") for item in values):
        raise RecordDecodeError(
            f"feature {name!r} holds several byte strings, one ending in a NUL byte, which a "
            "record cannot store exactly; if it has one value, declare it with --features as "
            "shape []"
        )
    return np.array(values, dtype=bytes)


_ARRAY_DTYPES = {"int64_list": np.int64, "float_list": np.float32}


def _record(data: bytes) -> dict[str, Any]:
    """The record of one Example without a feature spec: what `TFExample()` parses, each list of
    bytes as a numpy bytes array, made directly from the message (the local engine's hot path).
    """
    record = {}
    for name, feature in sorted(tfexample.parse(data).features.feature.items()):
        kind = feature.WhichOneof("kind") or "float_list"  # an empty feature: float32, as TFExample
        if kind == "bytes_list":
            record[name] = _bytes_array(name, list(feature.bytes_list.value))
        else:
            record[name] = np.array(getattr(feature, kind).value, _ARRAY_DTYPES[kind])
    return record


class TFRecordReader(Reader):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.parse = TFExample(self.options.features)

    def count(self, unit: str) -> int:
        with self.open(unit) as file:
            return sum(1 for _ in _frames(file, unit, start=sys.maxsize))

    def read(self, unit: str, start: int = 0, stop: int | None = None) -> Iterator[Item]:
        parse = _record if self.options.features is None else self.parse
        fields = self.options.fields
        with self.open(unit) as file:
            for number, data in _frames(file, unit, start):
                if stop is not None and number >= stop:
                    return
                if data is None:
                    continue
                if type(data) is BadRecord:
                    yield data
                    continue
                try:
                    parsed = parse(data)
                    if fields is not None:
                        missing = [name for name in fields if name not in parsed]
                        if missing:
                            raise RecordDecodeError(f"has no feature {missing[0]!r}")
                        parsed = {name: parsed[name] for name in fields}
                    if parse is not _record:
                        parsed = {
                            name: _bytes_array(name, value) if type(value) is list else value
                            for name, value in parsed.items()
                        }
                    yield parsed
                except RecordDecodeError as error:
                    yield BadRecord(f"{unit}, record {number}", str(error))
