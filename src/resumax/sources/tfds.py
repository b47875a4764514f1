"""`tfds_source`: a TFDS-prepared ArrayRecord dataset directory as an `ArrayRecordSourceModule`,
its `tf.train.Example` records decoded from `features.json` without TensorFlow or TFDS.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
from typing import Any

import numpy as np
from flax import nnx
from PIL import Image

from resumax.errors import ConfigError, DataFileNotFoundError, RecordDecodeError
from resumax.records import storage
from resumax.records.tfexample import TFExample
from resumax.sources.array_record import ArrayRecordSourceModule
from resumax.sources.base import ArrayRecordSourceConfig

DATASET_INFO, FEATURES = "dataset_info.json", "features.json"
# TFDS stores every integer and bool Tensor as an int64_list and floats as a float_list.
_TENSOR_DTYPES = {
    "int64": "int64",
    "int32": "int64",
    "uint8": "int64",
    "bool": "int64",
    "float32": "float32",
    "string": "bytes",
    "bytes": "bytes",
}
_IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_SHARD = re.compile(r"-(\d+)-of-(\d+)$")


def _read_json(path: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    try:
        if storage.is_url(path):
            return json.loads(storage.read_bytes(path, storage_options))
        with open(path) as file:
            return json.load(file)
    except FileNotFoundError:
        raise DataFileNotFoundError(
            f"{path!r} does not exist; pass the directory TFDS prepared (the one holding "
            f"{DATASET_INFO} and {FEATURES}, e.g. ~/tensorflow_datasets/mnist/3.0.1)"
        ) from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read {path!r} as JSON: {error}") from error


def _dimensions(shape: dict[str, Any]) -> tuple[int | None, ...]:
    """A TFDS shape proto's dimensions ("-1" is unknown: None)."""
    sizes = [int(size) for size in shape.get("dimensions", [])]
    return tuple(None if size < 0 else size for size in sizes)


def _unsupported(name: str, what: str) -> ConfigError:
    return ConfigError(
        f"TFDS feature {name!r} is {what}, which tfds_source does not decode; build "
        "ArrayRecordSourceModule(config, files, decode=...) with your own decode "
        "(resumax.TFExample parses the tf.train.Example records)"
    )


class TFDSDecode:
    """Decodes one TFDS record: a tf.train.Example, then Images through Pillow and Tensor casts.

    Picklable (plain data), so it runs in worker processes.
    """

    def __init__(self, features: dict[str, Any]):
        spec: dict[str, tuple[str, tuple[int, ...] | None]] = {}
        self.images: dict[str, tuple[int | None, ...]] = {}
        self.casts: dict[str, str] = {}
        for name, feature in features.items():
            if "image" in feature:
                image = feature["image"]
                shape = _dimensions(image.get("shape", {}))
                channels = shape[-1] if len(shape) == 3 else None
                if image.get("dtype", "uint8") != "uint8" or channels not in _IMAGE_MODES:
                    what = f"an Image of dtype {image.get('dtype')} and shape {shape}"
                    raise _unsupported(name, what)
                if image.get("encodingFormat", "png") not in ("png", "jpeg", ""):
                    raise _unsupported(name, f"an Image encoded as {image['encodingFormat']!r}")
                spec[name], self.images[name] = ("bytes", ()), shape
            elif "classLabel" in feature:
                spec[name] = ("int64", ())
            elif "tensor" in feature:
                spec[name] = self._tensor_spec(name, feature["tensor"])
            else:
                kind = feature.get("pythonClassName", "an unknown feature").rsplit(".", 1)[-1]
                raise _unsupported(name, f"a {kind}")
        self.example = TFExample(spec)

    def _tensor_spec(self, name: str, tensor: dict[str, Any]) -> tuple[str, Any]:
        dtype, shape = tensor.get("dtype"), _dimensions(tensor.get("shape", {}))
        if dtype not in _TENSOR_DTYPES or str(tensor.get("encoding", "none")).lower() != "none":
            raise _unsupported(name, f"a Tensor of dtype {dtype} ({tensor.get('encoding')})")
        if None in shape[1:] or (shape[:1] == (None,) and len(shape) > 1):
            raise _unsupported(name, f"a Tensor of variable shape {shape}")
        if _TENSOR_DTYPES[dtype] == "int64" and dtype != "int64":
            self.casts[name] = dtype
        return _TENSOR_DTYPES[dtype], None if shape[:1] == (None,) else shape

    def __call__(self, data: bytes) -> dict[str, Any]:
        example = self.example(data)
        for name, shape in self.images.items():
            example[name] = decode_image(name, example[name], shape)
        for name, dtype in self.casts.items():
            example[name] = example[name].astype(dtype)
        return example


def decode_image(name: str, data: bytes, shape: tuple[int | None, ...]) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 array of `shape` (H, W, C; None sizes take the image's)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert(_IMAGE_MODES[shape[-1]]), dtype=np.uint8)
    except Exception as error:
        raise RecordDecodeError(
            f"feature {name!r} is not a readable PNG/JPEG image: {error}"
        ) from error
    pixels = pixels.reshape(*pixels.shape[:2], shape[-1])
    if any(want is not None and want != got for want, got in zip(shape, pixels.shape, strict=True)):
        raise RecordDecodeError(
            f"feature {name!r} is an image of shape {pixels.shape}; features.json declares {shape}"
        )
    return pixels


def _remote_dataset_directory(url: str, storage_options: dict[str, Any] | None) -> str:
    """`dataset_directory` for a URL: one listing of the version folders at most."""
    url = url.rstrip("/")
    fs, path = storage.filesystem(url, storage_options)
    try:
        if fs.exists(f"{path}/{DATASET_INFO}"):
            return url
        versions = sorted(fs.glob(f"{path}/*/{DATASET_INFO}"))
    except Exception as error:
        raise storage.storage_error(url, error, doing="list") from error
    if len(versions) == 1:
        return fs.unstrip_protocol(versions[0].rpartition("/")[0])
    raise DataFileNotFoundError(
        f"{url!r} holds no {DATASET_INFO}"
        + (f" but several versions: {versions}; pass one" if versions else "")
        + "; pass the directory TFDS prepared (e.g. gs://bucket/tensorflow_datasets/mnist/3.0.1)"
    )


def dataset_directory(
    directory: str | os.PathLike, storage_options: dict[str, Any] | None = None
) -> str:
    """The directory holding dataset_info.json: `directory` itself or its one version folder."""
    if storage.is_url(os.fspath(directory)):
        return _remote_dataset_directory(os.fspath(directory), storage_options)
    directory = os.path.expanduser(storage.local_path(os.fspath(directory)))
    if os.path.exists(os.path.join(directory, DATASET_INFO)):
        return directory
    versions = sorted(glob.glob(os.path.join(glob.escape(directory), "*", DATASET_INFO)))
    if len(versions) == 1:
        return os.path.dirname(versions[0])
    if not os.path.isdir(directory):
        raise DataFileNotFoundError(f"the TFDS dataset directory {directory!r} does not exist")
    raise DataFileNotFoundError(
        f"{directory!r} holds no {DATASET_INFO}"
        + (f" but several versions: {versions}; pass one" if versions else "")
        + "; pass the directory TFDS prepared (e.g. ~/tensorflow_datasets/mnist/3.0.1)"
    )


def read_info(
    directory: str, storage_options: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(dataset_info.json, the features of features.json) of a TFDS dataset directory."""
    info = _read_json(storage.join(f"{directory}/", DATASET_INFO), storage_options)
    file_format = info.get("fileFormat", "tfrecord")
    if file_format != "array_record":
        raise ConfigError(
            f"{directory!r} was prepared with file_format={file_format!r}; resumax reads "
            "array_record: run `tfds build --file_format=array_record`"
        )
    features = _read_json(storage.join(f"{directory}/", FEATURES), storage_options)
    top = features.get("featuresDict", {}).get("features")
    if not isinstance(top, dict):
        raise _unsupported("<top level>", "not a FeaturesDict")
    return info, top


def _split_entry(directory: str, info: dict[str, Any], split: str) -> dict[str, Any]:
    """The split's entry in dataset_info.json, or ConfigError naming the splits there are."""
    splits = {entry.get("name"): entry for entry in info.get("splits", [])}
    if split not in splits:
        raise ConfigError(
            f"TFDS dataset {directory!r} has no split {split!r}; it has {sorted(splits)}"
        )
    return splits[split]


def split_files(directory: str, info: dict[str, Any], split: str) -> list[str]:
    """The split's `<name>-<split>.array_record-000NN-of-000MM` files, in shard order."""
    entry = _split_entry(directory, info, split)
    prefix = f"{info.get('name')}-{split}.array_record"
    files = sorted(
        (int(match.group(1)), path)
        for path in glob.glob(os.path.join(glob.escape(directory), glob.escape(prefix) + "-*"))
        if (match := _SHARD.search(path))
    )
    expected = len(entry.get("shardLengths", [])) or None
    if not files or (expected is not None and len(files) != expected):
        raise DataFileNotFoundError(
            f"TFDS split {split!r} of {directory!r} should have {expected or 'some'} "
            f"{prefix}-NNNNN-of-MMMMM files; found {len(files)}"
        )
    return [path for _, path in files]


def tfds_source(
    directory: str | os.PathLike,
    split: str,
    config: ArrayRecordSourceConfig = ArrayRecordSourceConfig(),  # noqa: B008 (frozen)
    *,
    rngs: nnx.Rngs | None = None,
    **remote: Any,
) -> ArrayRecordSourceModule:
    """The records of one split of a TFDS-prepared ArrayRecord dataset, decoded to numpy.

    `directory` holds dataset_info.json, features.json and the split's files (or is the dataset
    folder with one version inside). Image features arrive as uint8 H x W x C arrays, ClassLabel
    as int64, Tensor features as their dtype and shape (bytes: `bytes` or a list of them).
    Other feature types raise ConfigError naming the feature: decode those records with your own
    `decode=` over `ArrayRecordSourceModule`. No TensorFlow or tensorflow_datasets is imported.

    `directory` may be a URL (`gs://bucket/tensorflow_datasets/mnist/3.0.1`); `remote` takes
    `ArrayRecordSourceModule`'s `storage_options`, `cache_dir`, `cache_limit`, `fetch_threads`
    and `fetch_timeout`. The record counts come from dataset_info.json: no shard is downloaded
    to build the source.
    """
    options = remote.get("storage_options")
    directory = dataset_directory(directory, options)
    info, features = read_info(directory, options)
    decode = TFDSDecode(features)
    if storage.is_url(directory):
        _split_entry(directory, info, split)
        files: Any = f"{directory}/{info.get('name')}-{split}.array_record-*"
    else:
        files = split_files(directory, info, split)
    return ArrayRecordSourceModule(config, files, rngs=rngs, decode=decode, **remote)


def describe(
    directory: str | os.PathLike, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Name, version, splits (records each) and features of a TFDS dataset directory."""
    directory = dataset_directory(directory, storage_options)
    info, features = read_info(directory, storage_options)
    return {
        "tfds": info.get("name"),
        "version": info.get("version"),
        "directory": directory,
        "splits": {
            entry.get("name"): sum(int(n) for n in entry.get("shardLengths", []))
            for entry in info.get("splits", [])
        },
        "features": {
            name: {key: value for key, value in feature.items() if key != "pythonClassName"}
            | {"type": feature.get("pythonClassName", "").rsplit(".", 1)[-1]}
            for name, feature in features.items()
        },
    }
