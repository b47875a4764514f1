"""tfds_source: a TFDS-prepared ArrayRecord directory (dataset_info.json, features.json and
tf.train.Example records with PNG images, laid out as TFDS writes them) read without TensorFlow."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image

import resumax
from resumax import (
    ArrayRecordSourceConfig,
    ConfigError,
    DataFileNotFoundError,
    Pipeline,
    StateMismatchError,
    cli,
    tfds_source,
)
from resumax.records.tfexample import Example
from resumax.sources.tfds import TFDSDecode
from tests.conftest import assert_batches_equal, batches_and_state

FEATURES = "tensorflow_datasets.core.features"
SHARD_LENGTHS = {"train": [24, 16], "test": [10]}


def pixels_of(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, size=(8, 8, 1), dtype=np.uint8)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0]).save(buffer, format="PNG")
    return buffer.getvalue()


def record(i: int) -> bytes:
    """One record as TFDS serializes it: a tf.train.Example of the features below."""
    example = Example()
    features = example.features.feature
    features["image"].bytes_list.value.append(png(pixels_of(i)))
    features["label"].int64_list.value.append(i % 10)
    features["id"].int64_list.value.append(i)
    features["position"].float_list.value.extend([i / 2, -i])
    features["filename"].bytes_list.value.append(b"digit_%03d.png" % i)
    return example.SerializeToString()


def features_json(**extra: dict) -> dict:
    tensor = f"{FEATURES}.tensor_feature.Tensor"
    features = {
        "image": {
            "pythonClassName": f"{FEATURES}.image_feature.Image",
            "image": {"shape": {"dimensions": ["8", "8", "1"]}, "dtype": "uint8",
                      "encodingFormat": "png"},
        },  # fmt: skip
        "label": {
            "pythonClassName": f"{FEATURES}.class_label_feature.ClassLabel",
            "classLabel": {"numClasses": "10"},
        },
        "id": {"pythonClassName": tensor, "tensor": {"shape": {}, "dtype": "int64",
                                                     "encoding": "none"}},
        "position": {"pythonClassName": tensor, "tensor": {
            "shape": {"dimensions": ["2"]}, "dtype": "float32", "encoding": "none"}},
        "filename": {"pythonClassName": tensor, "tensor": {"shape": {}, "dtype": "string",
                                                           "encoding": "none"}},
    } | extra  # fmt: skip
    return {
        "pythonClassName": f"{FEATURES}.features_dict.FeaturesDict",
        "featuresDict": {"features": features},
    }


def write_tfds_directory(root, **extra_features: dict) -> str:
    """<root>/digits/1.0.0 as `tfds build --file_format=array_record` lays it out."""
    directory = root / "digits" / "1.0.0"
    directory.mkdir(parents=True)
    splits, first = [], 0
    for split, lengths in SHARD_LENGTHS.items():
        for shard, length in enumerate(lengths):
            name = f"digits-{split}.array_record-{shard:05d}-of-{len(lengths):05d}"
            resumax.write_array_record(directory / name, map(record, range(first, first + length)))
            first += length
        splits.append(
            {
                "name": split,
                "numBytes": "1234",
                "shardLengths": [str(length) for length in lengths],
                "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
            }
        )
    info = {
        "name": "digits",
        "version": "1.0.0",
        "fileFormat": "array_record",
        "moduleName": "digits.digits_dataset_builder",
        "releaseNotes": {"1.0.0": "Initial release."},
        "splits": splits,
    }
    (directory / "dataset_info.json").write_text(json.dumps(info, indent=2))
    (directory / "features.json").write_text(json.dumps(features_json(**extra_features)))
    return str(directory)


@pytest.fixture
def tfds_directory(tmp_path):
    return write_tfds_directory(tmp_path)


def test_records_arrive_decoded_as_tfds_would_give_them(tfds_directory):
    source = tfds_source(tfds_directory, "train")
    assert len(source) == 40
    example = source[27]
    assert example["image"].dtype == np.uint8 and example["image"].shape == (8, 8, 1)
    np.testing.assert_array_equal(example["image"], pixels_of(27))
    assert example["label"].dtype == np.int64 and int(example["label"]) == 7
    assert int(example["id"]) == 27
    np.testing.assert_array_equal(example["position"], np.array([13.5, -27], np.float32))
    assert example["filename"] == b"digit_027.png"
    assert int(tfds_source(tfds_directory, "test")[0]["id"]) == 40


def test_the_dataset_folder_with_one_version_inside_also_opens(tmp_path):
    write_tfds_directory(tmp_path)
    assert len(tfds_source(tmp_path / "digits", "test")) == 10


def shuffled_batches(directory, count, *, state=None, **options):
    source = tfds_source(directory, "train", ArrayRecordSourceConfig(seed=9, shuffle_files=True))
    pipeline = Pipeline(source, batch_size=6, rngs=0, **options)
    return batches_and_state(pipeline, count, state)


def test_workers_and_resume_give_the_same_batches(tfds_directory):
    reference, _ = shuffled_batches(tfds_directory, 9)
    assert reference[0]["image"].shape == (6, 8, 8, 1)
    assert reference[0]["label"].dtype == np.int64
    with_workers, _ = shuffled_batches(tfds_directory, 9, num_workers=2)
    assert_batches_equal(with_workers, reference)
    first, state = shuffled_batches(tfds_directory, 4)
    rest, _ = shuffled_batches(tfds_directory, 5, state=state)
    assert_batches_equal(first + rest, reference)


def test_a_state_of_another_split_is_refused(tfds_directory):
    _, state = shuffled_batches(tfds_directory, 1)
    test_split = Pipeline(tfds_source(tfds_directory, "test"), batch_size=6)
    with pytest.raises(StateMismatchError):
        test_split.set_state(state)


def test_an_unsupported_feature_is_named_and_decode_suggested(tmp_path):
    text = {"pythonClassName": f"{FEATURES}.text_feature.Text", "text": {}}
    directory = write_tfds_directory(tmp_path, caption=text)
    with pytest.raises(ConfigError, match=r"'caption' is a Text.*decode="):
        tfds_source(directory, "train")


def test_a_missing_directory_or_split_is_reported(tmp_path, tfds_directory):
    with pytest.raises(DataFileNotFoundError, match="nowhere"):
        tfds_source(tmp_path / "nowhere", "train")
    with pytest.raises(ConfigError, match=r"no split 'validation'.*\['test', 'train'\]"):
        tfds_source(tfds_directory, "validation")


def test_inspect_prints_the_features_of_a_tfds_directory_and_of_example_files(
    tfds_directory, capsys
):
    assert cli.main(["inspect", tfds_directory]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tfds"] == "digits"
    assert summary["splits"] == {"train": 40, "test": 10}
    assert summary["features"]["label"]["type"] == "ClassLabel"
    assert summary["fields"]["image"] == {"dtype": "uint8", "shape": [8, 8, 1]}
    assert cli.main(["inspect", f"{tfds_directory}/digits-test.array_record-*"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "tf.train.Example"
    assert summary["records"] == 10
    assert summary["features"]["position"] == {"dtype": "float32", "length": 2}
    assert summary["features"]["image"] == {"dtype": "bytes", "length": 1}


def test_rgb_jpeg_images_and_bool_tensors_decode_to_their_declared_types():
    smooth = np.broadcast_to(np.arange(0, 240, 30, dtype=np.uint8)[:, None, None], (8, 6, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(smooth)).save(buffer, format="JPEG", quality=95)
    example = Example()
    example.features.feature["photo"].bytes_list.value.append(buffer.getvalue())
    example.features.feature["flags"].int64_list.value.extend([1, 0])
    decode = TFDSDecode(
        {
            "photo": {"image": {"shape": {"dimensions": ["-1", "-1", "3"]}, "dtype": "uint8",
                                "encodingFormat": "jpeg"}},
            "flags": {"tensor": {"shape": {"dimensions": ["2"]}, "dtype": "bool"}},
        }
    )  # fmt: skip
    decoded = pickle.loads(pickle.dumps(decode))(example.SerializeToString())
    assert decoded["photo"].shape == (8, 6, 3) and decoded["photo"].dtype == np.uint8
    assert np.abs(decoded["photo"].astype(int) - smooth).max() <= 8
    assert decoded["flags"].dtype == np.bool_ and decoded["flags"].tolist() == [True, False]
