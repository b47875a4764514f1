"""TFExample: tf.train.Example records built with the protobuf classes decode like
tf.io.parse_single_example, in ArrayRecord files and worker processes; bad records are typed
errors naming the feature, the file and the record."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import resumax
from resumax import (
    ArrayRecordSourceConfig,
    ArrayRecordSourceModule,
    ConfigError,
    Pipeline,
    RecordDecodeError,
    TFExample,
)
from resumax.records.tfexample import Example
from tests.conftest import assert_batches_equal, take

SPEC = {
    "label": ("int64", ()),
    "pixels": ("float32", (2, 3)),
    "tokens": ("int64", None),
    "name": ("bytes", ()),
    "tags": ("bytes", None),
}


def example_bytes(i: int, *, drop: str | None = None, pixels: int = 6) -> bytes:
    """A serialized tf.train.Example with every SPEC feature (`drop` left out)."""
    example = Example()
    features = example.features.feature
    features["label"].int64_list.value.append(i)
    features["pixels"].float_list.value.extend([i + k / 4 for k in range(pixels)])
    features["tokens"].int64_list.value.extend(range(i % 3))
    features["name"].bytes_list.value.append(b"record-%d" % i)
    features["tags"].bytes_list.value.extend([b"a", b"b"][: i % 3])
    if drop is not None:
        del features[drop]
    return example.SerializeToString()


def test_fixed_var_len_bytes_and_float_features_decode_like_tensorflow():
    decoded = TFExample(SPEC)(example_bytes(4))
    assert decoded["label"].dtype == np.int64 and decoded["label"].shape == ()
    assert int(decoded["label"]) == 4
    assert decoded["pixels"].dtype == np.float32
    np.testing.assert_array_equal(decoded["pixels"], [[4, 4.25, 4.5], [4.75, 5, 5.25]])
    assert decoded["tokens"].dtype == np.int64 and decoded["tokens"].tolist() == [0]
    assert decoded["name"] == b"record-4"
    assert decoded["tags"] == [b"a"]


def test_an_absent_var_len_feature_is_empty_and_unlisted_features_are_ignored():
    decoded = TFExample({"tokens": ("int64", None), "tags": ("bytes", None)})(
        example_bytes(3, drop="tokens")
    )
    assert decoded["tokens"].dtype == np.int64 and decoded["tokens"].shape == (0,)
    assert decoded["tags"] == []
    assert set(decoded) == {"tokens", "tags"}


def test_without_a_spec_every_feature_is_variable_length():
    decoded = TFExample()(example_bytes(5))
    assert sorted(decoded) == ["label", "name", "pixels", "tags", "tokens"]
    assert decoded["label"].tolist() == [5] and decoded["label"].dtype == np.int64
    assert decoded["pixels"].shape == (6,) and decoded["pixels"].dtype == np.float32
    assert decoded["name"] == [b"record-5"]


def test_fixed_length_bytes_of_several_values_are_a_list():
    example = Example()
    example.features.feature["pair"].bytes_list.value.extend([b"x", b"y", b"z", b"w"])
    data = example.SerializeToString()
    assert TFExample({"pair": ("bytes", (4,))})(data)["pair"] == [b"x", b"y", b"z", b"w"]
    assert TFExample({"pair": ("bytes", (2, 2))})(data)["pair"] == [[b"x", b"y"], [b"z", b"w"]]


def test_decoder_pickles_and_decodes_in_worker_processes(tmp_path):
    assert pickle.loads(pickle.dumps(TFExample(SPEC))) == TFExample(SPEC)
    path = tmp_path / "examples.array_record"
    resumax.write_array_record(path, [example_bytes(i) for i in range(30)])
    spec = {"label": ("int64", ()), "pixels": ("float32", (2, 3)), "name": ("bytes", ())}
    config = ArrayRecordSourceConfig(seed=2, shuffle_files=True)

    def batches(**options):
        source = ArrayRecordSourceModule(config, path, decode=TFExample(spec))
        return take(Pipeline(source, batch_size=4, **options), 10)

    in_process = batches()
    assert in_process[0]["pixels"].shape == (4, 2, 3)
    assert in_process[0]["name"].dtype.kind == "S"
    assert_batches_equal(batches(num_workers=2), in_process)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (example_bytes(1, drop="pixels"), r"feature 'pixels' is missing"),
        (example_bytes(1, pixels=5), r"feature 'pixels' has 5 values .* shape \(2, 3\)"),
        (b"not a tf.train.Example at all", r"not a serialized tf.train.Example"),
        (b"\xff\xff\xff\xff", r"not a serialized tf.train.Example"),
    ],
    ids=["missing feature", "wrong length", "garbage text", "garbage bytes"],
)
def test_bad_records_raise_errors_naming_the_feature_file_and_record(tmp_path, record, message):
    path = tmp_path / "bad.array_record"
    resumax.write_array_record(path, [example_bytes(0), example_bytes(1), record])
    source = ArrayRecordSourceModule(ArrayRecordSourceConfig(), path, decode=TFExample(SPEC))
    assert int(source[1]["label"]) == 1
    with pytest.raises(RecordDecodeError, match=message) as raised:
        source.read_records([0, 1, 2])
    assert "record 2 of" in str(raised.value) and "bad.array_record" in str(raised.value)


def test_a_feature_of_another_dtype_is_a_decode_error():
    with pytest.raises(RecordDecodeError, match="feature 'label' holds a int64_list.*float32"):
        TFExample({"label": ("float32", ())})(example_bytes(1))


@pytest.mark.parametrize(
    "spec",
    [{"x": ("int32", ())}, {"x": ("int64", (-1,))}, {"x": "int64"}, [("x", ("int64", ()))]],
)
def test_a_bad_spec_is_a_config_error(spec):
    with pytest.raises(ConfigError, match="TFExample"):
        TFExample(spec)
