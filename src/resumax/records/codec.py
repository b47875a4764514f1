"""The record codec: a dict of numpy arrays and scalars <-> msgpack bytes.

Arrays are stored as (dtype string, shape, raw bytes): exact for every fixed-size dtype, and
never pickled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgpack
import numpy as np

from resumax.errors import RecordDecodeError, RecordEncodeError

ARRAY_EXT = 1
NUMPY_SCALAR_EXT = 2
# Object and structured (void) dtypes cannot be described by a dtype string without pickle.
_UNSUPPORTED_DTYPE_KINDS = frozenset("OV")
_PYTHON_SCALARS = (bool, int, float, str, bytes, type(None))


def _pack_array(key: str, array: np.ndarray) -> bytes:
    if array.dtype.kind in _UNSUPPORTED_DTYPE_KINDS:
        raise RecordEncodeError(
            f"field {key!r} has dtype {array.dtype}, which cannot be stored without pickle; "
            "convert it to a numeric, bool, bytes or str dtype"
        )
    contiguous = np.ascontiguousarray(array)
    return msgpack.packb((array.dtype.str, list(array.shape), contiguous.tobytes()))


def _encode_value(key: str, value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return msgpack.ExtType(ARRAY_EXT, _pack_array(key, value))
    if isinstance(value, np.generic):
        return msgpack.ExtType(NUMPY_SCALAR_EXT, _pack_array(key, np.asarray(value)))
    if isinstance(value, _PYTHON_SCALARS):
        if isinstance(value, int) and not -(2**63) <= value < 2**64:
            raise RecordEncodeError(f"field {key!r} holds {value}, outside the 64-bit range")
        return value
    raise RecordEncodeError(
        f"field {key!r} has type {type(value).__name__}; a record field must be a numpy array, "
        "a numpy scalar or a Python bool/int/float/str/bytes/None"
    )


def encode(example: Mapping[str, Any]) -> bytes:
    """Serialises one example (a dict of str -> array or scalar) to bytes.

    numpy arrays of any fixed-size dtype and shape, numpy scalars and Python scalars round-trip
    exactly through `decode`.
    """
    try:
        packed = {}
        for key, value in example.items():
            if type(key) is not str:
                raise TypeError
            packed[key] = _FAST_PACKERS[type(value)](value)
    except (KeyError, TypeError, AttributeError):
        return _encode_checked(example)
    return msgpack.packb(packed)


def _encode_checked(example: Mapping[str, Any]) -> bytes:
    """`encode` for any example: every value checked, a RecordEncodeError naming the field."""
    if not isinstance(example, Mapping):
        raise RecordEncodeError(f"an example must be a dict, got {type(example).__name__}")
    packed = {}
    for key, value in example.items():
        if not isinstance(key, str):
            raise RecordEncodeError(f"field names must be str, got {key!r}")
        packed[key] = _encode_value(key, value)
    return msgpack.packb(packed)


# The fast path: values of these exact types (what readers and converters make) packed from a
# prefix per type and their raw bytes, the very bytes `_encode_checked` writes (about 40% less
# time per record). A subclass (np.str_, ...) or any other type takes the checked path, which
# also raises the errors.


def _scalar_packer(scalar_type: type) -> Callable[[Any], msgpack.ExtType]:
    """Packs a numpy scalar of `scalar_type`: (dtype string, [], raw bytes) as the checked path."""
    dtype = np.dtype(scalar_type)
    prefix = msgpack.packb((dtype.str, [], b"\0" * dtype.itemsize))[: -dtype.itemsize]

    def pack(value: Any) -> msgpack.ExtType:
        return msgpack.ExtType(NUMPY_SCALAR_EXT, prefix + value.tobytes())

    return pack


_ARRAY_PREFIXES: dict[tuple[str, tuple[int, ...]], bytes] = {}
_MAX_PREFIXES = 4096  # (dtype, shape) pairs remembered; others are packed each time


def _fast_pack_array(array: np.ndarray) -> msgpack.ExtType:
    """(dtype string, shape, raw bytes in C order) as the checked path packs it."""
    dtype = array.dtype
    if dtype.kind in _UNSUPPORTED_DTYPE_KINDS:
        raise TypeError  # the checked path names the field
    key = (dtype.str, array.shape)
    prefix = _ARRAY_PREFIXES.get(key)
    if prefix is None:
        prefix = b"\x93" + msgpack.packb(dtype.str) + msgpack.packb(list(array.shape))
        if len(_ARRAY_PREFIXES) < _MAX_PREFIXES:
            _ARRAY_PREFIXES[key] = prefix
    raw = array.tobytes()
    return msgpack.ExtType(ARRAY_EXT, prefix + _bin_header(len(raw)) + raw)


def _bin_header(size: int) -> bytes:
    """msgpack's header of a bin of `size` bytes."""
    if size < 0x100:
        return b"\xc4" + size.to_bytes(1, "big")
    if size < 0x10000:
        return b"\xc5" + size.to_bytes(2, "big")
    if size < 0x100000000:
        return b"\xc6" + size.to_bytes(4, "big")
    raise TypeError  # too large for msgpack: the checked path raises its error


def _as_is(value: Any) -> Any:
    return value


def _int(value: int) -> int:
    if not -(2**63) <= value < 2**64:
        raise TypeError  # the checked path names the field
    return value


_SCALAR_TYPES = (
    *(np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32),
    *(np.uint64, np.float16, np.float32, np.float64),
)
_FAST_PACKERS: dict[type, Callable[[Any], Any]] = {
    str: _as_is,
    bytes: _as_is,
    float: _as_is,
    bool: _as_is,
    int: _int,
    type(None): _as_is,
    np.ndarray: _fast_pack_array,
    **{scalar_type: _scalar_packer(scalar_type) for scalar_type in _SCALAR_TYPES},
}


def _decode_ext(code: int, data: bytes) -> Any:
    dtype, shape, raw = msgpack.unpackb(data)
    array = np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape)
    if code == ARRAY_EXT:
        return array
    if code == NUMPY_SCALAR_EXT:
        return array[()]
    raise ValueError(f"unknown msgpack extension type {code}")


def decode(data: bytes) -> dict[str, Any]:
    """Inverse of `encode`. Arrays are read-only views of `data`; copy one to modify it in place."""
    try:
        example = msgpack.unpackb(data, ext_hook=_decode_ext)
    except Exception as error:
        raise RecordDecodeError(f"bytes are not a resumax record ({error})") from error
    if not isinstance(example, dict):
        raise RecordDecodeError(f"bytes decode to {type(example).__name__}, not a record dict")
    return example
