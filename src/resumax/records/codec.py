"""The record codec: a dict of numpy arrays and scalars <-> msgpack bytes.

Arrays are stored as (dtype string, shape, raw bytes): exact for every fixed-size dtype, and
never pickled.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    if not isinstance(example, Mapping):
        raise RecordEncodeError(f"an example must be a dict, got {type(example).__name__}")
    packed = {}
    for key, value in example.items():
        if not isinstance(key, str):
            raise RecordEncodeError(f"field names must be str, got {key!r}")
        packed[key] = _encode_value(key, value)
    return msgpack.packb(packed)


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
