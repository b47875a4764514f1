"""`TFExample`: a picklable `decode=` callable for serialized `tf.train.Example` records.

The message classes are built at import from a descriptor of TensorFlow's example.proto and
feature.proto, so the `protobuf` runtime parses the wire format without TensorFlow or protoc.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from resumax.errors import ConfigError, RecordDecodeError

_F = descriptor_pb2.FieldDescriptorProto
_KINDS = {"bytes": "bytes_list", "float32": "float_list", "int64": "int64_list"}
_NUMPY_DTYPES = {"float32": np.float32, "int64": np.int64}
Shape = tuple[int, ...] | None
FeatureSpec = Mapping[str, tuple[str, Shape]]


def _field(name: str, number: int, kind: int, label: int, type_name: str = "") -> _F:
    field = _F(name=name, number=number, type=kind, label=label)
    if type_name:
        field.type_name = type_name
    return field


def _example_file() -> descriptor_pb2.FileDescriptorProto:
    """tensorflow/core/example/{feature,example}.proto as one descriptor (same field numbers)."""
    repeated, optional = _F.LABEL_REPEATED, _F.LABEL_OPTIONAL
    file = descriptor_pb2.FileDescriptorProto(
        name="resumax/tf_example.proto", package="tensorflow", syntax="proto3"
    )
    for name, kind in (
        ("BytesList", _F.TYPE_BYTES),
        ("FloatList", _F.TYPE_FLOAT),
        ("Int64List", _F.TYPE_INT64),
    ):
        file.message_type.add(name=name).field.append(_field("value", 1, kind, repeated))
    feature = file.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, type_name) in enumerate(
        (("bytes_list", "BytesList"), ("float_list", "FloatList"), ("int64_list", "Int64List")),
        start=1,
    ):
        field = _field(name, number, _F.TYPE_MESSAGE, optional, f".tensorflow.{type_name}")
        field.oneof_index = 0
        feature.field.append(field)
    features = file.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.append(_field("key", 1, _F.TYPE_STRING, optional))
    entry.field.append(_field("value", 2, _F.TYPE_MESSAGE, optional, ".tensorflow.Feature"))
    features.field.append(
        _field("feature", 1, _F.TYPE_MESSAGE, repeated, ".tensorflow.Features.FeatureEntry")
    )
    example = file.message_type.add(name="Example")
    example.field.append(_field("features", 1, _F.TYPE_MESSAGE, optional, ".tensorflow.Features"))
    return file


# A private pool: a TensorFlow imported in the same process keeps its own tensorflow.Example.
_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_example_file())
Example = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("tensorflow.Example"))
Features = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("tensorflow.Features"))
Feature = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("tensorflow.Feature"))


def _check_spec(features: FeatureSpec) -> dict[str, tuple[str, Shape]]:
    """The spec as {name: (dtype, shape tuple or None)}; ConfigError naming a bad entry."""
    if not isinstance(features, Mapping):
        raise ConfigError(
            f"TFExample features must be a dict name -> (dtype, shape), got {features!r}"
        )
    spec = {}
    for name, entry in features.items():
        if not isinstance(entry, tuple | list) or len(entry) != 2:
            raise ConfigError(f"TFExample feature {name!r}: expected (dtype, shape), got {entry!r}")
        dtype, shape = entry
        if dtype not in _KINDS:
            raise ConfigError(
                f"TFExample feature {name!r} has dtype {dtype!r}; use 'int64', 'float32' or 'bytes'"
            )
        if shape is not None:
            if not isinstance(shape, tuple | list) or not all(
                isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape
            ):
                raise ConfigError(
                    f"TFExample feature {name!r} has shape {shape!r}; use a tuple of sizes >= 0 "
                    "(fixed length) or None (variable length)"
                )
            shape = tuple(shape)
        spec[str(name)] = (dtype, shape)
    return spec


class TFExample:
    """Decodes a serialized `tf.train.Example` into a dict, like `tf.io.parse_single_example`.

    Args:
      features: {name: (dtype, shape)} with dtype "int64", "float32" or "bytes". A tuple shape is
        a fixed-length feature (`tf.io.FixedLenFeature`): its values are reshaped to it, and a
        missing feature or another number of values raises `RecordDecodeError` naming it. None is
        a variable-length feature (`tf.io.VarLenFeature`, densified): a 1-D array, empty when
        the feature is absent. None for the whole spec decodes every feature of each record as
        variable-length, with the dtype the record stores. Features outside the spec are ignored.

    int64 features come out as np.int64 arrays, float32 as np.float32 arrays; a bytes feature of
    shape () as Python `bytes`, other bytes features as (nested) lists of `bytes`. Instances
    pickle, so they work in worker processes.
    """

    def __init__(self, features: FeatureSpec | None = None):
        self.features = None if features is None else _check_spec(features)

    def __repr__(self) -> str:
        return f"TFExample({self.features!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TFExample) and other.features == self.features

    __hash__ = None  # type: ignore[assignment]

    def __call__(self, data: bytes) -> dict[str, Any]:
        feature_map = parse(data).features.feature
        if self.features is None:
            return {
                name: _all_values(name, feature) for name, feature in sorted(feature_map.items())
            }
        decoded = {}
        for name, (dtype, shape) in self.features.items():
            feature = feature_map.get(name)
            decoded[name] = _decode_feature(name, feature, dtype, shape)
        return decoded


def parse(data: bytes) -> Any:
    """The `Example` message of serialized bytes; RecordDecodeError if they are not one."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RecordDecodeError(
            f"a tf.train.Example record must be bytes, got {type(data).__name__}"
        )
    example = Example()
    try:
        example.ParseFromString(bytes(data))
    except DecodeError as error:
        raise RecordDecodeError(
            f"the bytes are not a serialized tf.train.Example: {error}"
        ) from None
    # Random bytes can parse as fields of unknown numbers: an Example has none.
    if len(UnknownFieldSet(example)) or len(UnknownFieldSet(example.features)):
        raise RecordDecodeError(
            "the bytes are not a serialized tf.train.Example: they hold fields an Example does "
            "not have"
        )
    return example


def _values(name: str, feature: Any, dtype: str) -> Any:
    """The feature's value list; RecordDecodeError if it stores another dtype."""
    kind = feature.WhichOneof("kind")
    if kind is not None and kind != _KINDS[dtype]:
        raise RecordDecodeError(
            f"feature {name!r} holds a {kind} but the spec says {dtype!r} ({_KINDS[dtype]})"
        )
    return getattr(feature, _KINDS[dtype]).value


def _as_dtype(values: Any, dtype: str, shape: tuple[int, ...]) -> Any:
    if dtype == "bytes":
        values = list(values)
        if shape == ():
            return values[0]
        if len(shape) == 1:
            return values
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array.reshape(shape).tolist()
    return np.asarray(values, dtype=_NUMPY_DTYPES[dtype]).reshape(shape)


def _decode_feature(name: str, feature: Any, dtype: str, shape: Shape) -> Any:
    if shape is None:
        values = [] if feature is None else _values(name, feature, dtype)
        return _as_dtype(values, dtype, (len(values),))
    if feature is None:
        raise RecordDecodeError(
            f"feature {name!r} is missing; the spec declares it fixed-length {dtype} of shape "
            f"{shape} (use shape None if records may lack it)"
        )
    values = _values(name, feature, dtype)
    expected = math.prod(shape)
    if len(values) != expected:
        raise RecordDecodeError(
            f"feature {name!r} has {len(values)} values but the spec declares shape {shape} "
            f"({expected} values)"
        )
    return _as_dtype(values, dtype, shape)


def _all_values(name: str, feature: Any) -> Any:
    """A feature decoded as variable-length, with the dtype the record stores."""
    kind = feature.WhichOneof("kind")
    dtype = next((d for d, k in _KINDS.items() if k == kind), "float32")
    return _decode_feature(name, feature, dtype, None)


def describe(data: bytes) -> dict[str, dict[str, Any]]:
    """{name: {"dtype", "length"}} of the features of one serialized Example (for inspect)."""
    described = {}
    for name, feature in sorted(parse(data).features.feature.items()):
        kind = feature.WhichOneof("kind")
        dtype = next((d for d, k in _KINDS.items() if k == kind), None)
        length = len(getattr(feature, kind).value) if kind else 0
        described[name] = {"dtype": dtype, "length": length}
    return described
