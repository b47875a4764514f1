"""What `resumax inspect` prints: the files, records and fields of ArrayRecord files (resumax
records or tf.train.Example records) or of a TFDS dataset directory."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from resumax import records
from resumax.errors import DataSourceError, RecordDecodeError
from resumax.records import storage, tfexample
from resumax.sources import ArrayRecordSourceConfig, ArrayRecordSourceModule, tfds, tfds_source


def fields_of(example: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{field: {"dtype", "shape"}} of one decoded record."""
    return {
        key: {
            "dtype": str(getattr(value, "dtype", type(value).__name__)),
            "shape": list(getattr(value, "shape", ())),
        }
        for key, value in example.items()
    }


def describe_tfds(directory: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dataset's name, splits and features, and the fields its first record decodes to."""
    summary = tfds.describe(directory, storage_options)
    split = next(iter(summary["splits"]), None)
    if split is not None:
        with tfds_source(directory, split, storage_options=storage_options) as source:
            summary["fields"] = fields_of(source[0])
    return summary


def describe(paths: Sequence[str], storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Summary of ArrayRecord files (paths, globs or URLs) or of one TFDS dataset directory."""
    if len(paths) == 1 and _is_directory(paths[0], storage_options):
        return describe_tfds(paths[0], storage_options)
    config, options = ArrayRecordSourceConfig(), {"storage_options": storage_options}
    with ArrayRecordSourceModule(config, paths, decode=bytes, **options) as source:
        first = source[0]
        summary = {"files": len(source.paths), "records": len(source)}
        summary["fingerprint"] = source.fingerprint
        paths = source.paths
    try:
        return summary | {"format": "resumax", "fields": fields_of(records.decode(first))}
    except RecordDecodeError:
        pass
    try:
        return summary | {"format": "tf.train.Example", "features": tfexample.describe(first)}
    except RecordDecodeError:
        raise DataSourceError(
            f"record 0 of {paths[0]!r} is neither a resumax record nor a tf.train.Example; "
            "read it with ArrayRecordSourceModule(..., decode=your_decoder)"
        ) from None


def _is_directory(path: str, storage_options: dict[str, Any] | None) -> bool:
    """Whether `path` (a local path or a URL) names a directory (a TFDS dataset's)."""
    if not storage.is_url(path):
        return os.path.isdir(storage.local_path(path))
    fs, remote_path = storage.filesystem(path, storage_options)
    try:
        return fs.isdir(remote_path)
    except Exception as error:
        raise storage.storage_error(path, error, doing="list") from error
