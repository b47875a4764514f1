"""Putting a shard set and its index into a bucket: the shards first, the index last, since a
remote set is complete only once its index exists (an object store has no atomic rename).

Backs `write_shards` / `write_array_record` on URLs and `resumax index` on a remote set.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from resumax.errors import DataFileNotFoundError, DataSourceError
from resumax.records import shard_index, storage

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
# Where the listing info of each fsspec filesystem keeps an object's modification time:
# gcsfs and local "mtime", s3fs "LastModified", others "last_modified" or "updated".
_MTIME_KEYS = ("mtime", "LastModified", "last_modified", "updated")


def object_mtime_ns(info: Mapping[str, Any]) -> int:
    """An object's modification time in ns since the epoch, from its fsspec listing info (the
    dicts of `fs.ls(..., detail=True)` / `fs.glob(..., detail=True)` / `fs.info`); 0 when the
    info has none. A remote set's index records these, so a source that lists the set can
    compare each object's (name, size, time) with its entry without downloading it."""
    for key in _MTIME_KEYS:
        value = info.get(key)
        if isinstance(value, str):
            try:
                value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(value, datetime.datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=datetime.UTC)
            return (value - _EPOCH) // datetime.timedelta(microseconds=1) * 1000
        if isinstance(value, int | float) and not isinstance(value, bool):
            return int(value * 1_000_000_000)
    return 0


def write_error(url: str, error: BaseException) -> DataSourceError:
    """A DataSourceError for a failed upload to `url`. An upload creates its object, so a
    FileNotFoundError means the bucket is missing (gcsfs names only the request URL)."""
    if isinstance(error, FileNotFoundError) and not isinstance(error, DataSourceError):
        return DataFileNotFoundError(
            f"cannot write {url!r}: the bucket {storage.bucket_of(url)!r} does not exist "
            f"({type(error).__name__}: {error})"
        )
    return storage.storage_error(url, error, doing="write")


def upload_file(local: str, url: str, storage_options: storage.StorageOptions = None) -> None:
    """Copies the local file `local` to the object `url`; DataSourceError naming `url`."""
    fs, path = storage.filesystem(url, storage_options)
    try:
        fs.put_file(local, path)
    except Exception as error:
        raise write_error(url, error) from error


def upload_set(
    local_paths: Sequence[str],
    urls: Sequence[str],
    index_url: str,
    storage_options: storage.StorageOptions = None,
) -> None:
    """Uploads a set written locally (with its local index), then its index, last.

    The bucket's index for the set is deleted first, so the objects are never described by an
    index of another set while they are replaced. The index uploaded has the local one's names,
    record counts, sizes and content hashes, with the objects' modification times from one
    listing after the upload and no inodes. If a shard fails to upload, the set's objects are
    removed (best effort) and no index is written, so no mix of old and new shards looks like a
    complete set.
    """
    fs, index_key = storage.filesystem(index_url, storage_options)
    keys = [storage.filesystem(url, storage_options)[1] for url in urls]
    try:
        fs.rm_file(index_key)
    except FileNotFoundError:
        pass
    except Exception as error:
        raise write_error(index_url, error) from error
    try:
        fs.put(list(local_paths), keys)
    except Exception as error:
        with contextlib.suppress(Exception):
            fs.rm([key for key in keys if fs.exists(key)])
        where = urls[0] if len(urls) == 1 else f"{urls[0]} (and {len(urls) - 1} more shards)"
        raise write_error(where, error) from error
    local_index = read_local_index(shard_index.index_path(_local_stem(local_paths[0])))
    listed = _listing(fs, keys, index_url)
    entries = []
    for key, url, name, count, size, content in zip(
        keys,
        urls,
        local_index["names"],
        local_index["num_records"],
        local_index["sizes"],
        local_index["content_hashes"],
        strict=True,
    ):
        info = listed.get(key.rstrip("/"))
        if info is None or info.get("size") != size:
            raise DataSourceError(
                f"{url!r} was uploaded with {size} bytes but the bucket lists "
                f"{'no such object' if info is None else str(info.get('size')) + ' bytes'}: "
                "did another writer replace it? The set has no index; write it again"
            )
        entries.append((name, count, size, object_mtime_ns(info), content))
    upload_index(entries, index_url, storage_options, local_index.get("metadata"))


def _local_stem(shard_path: str) -> str:
    parsed = shard_index.ShardName.parse(os.path.basename(shard_path))
    assert parsed is not None, shard_path
    return os.path.join(os.path.dirname(shard_path), parsed.stem)


def read_local_index(path: str) -> dict:
    """The local shard index at `path` (one `write_shards` has just written)."""
    try:
        return shard_index.read_index(path)
    except shard_index.INDEX_ERRORS as error:
        raise DataSourceError(f"cannot read the shard index {path!r}: {error}") from error


def _listing(fs: Any, keys: Sequence[str], index_url: str) -> dict[str, Mapping[str, Any]]:
    """The listing info of the objects `keys` (one directory), by their keys as fsspec names."""
    directory = keys[0].rpartition("/")[0]
    try:
        fs.invalidate_cache(directory)
        listed = fs.ls(directory, detail=True)
    except Exception as error:
        raise storage.storage_error(index_url.rpartition("/")[0], error, doing="list") from error
    return {info["name"].rstrip("/"): info for info in listed}


def upload_index(
    entries: Sequence[tuple],
    index_url: str,
    storage_options: storage.StorageOptions = None,
    metadata: dict | None = None,
) -> None:
    """Writes the index of `entries` (`shard_index.index_entry` fields, without inodes for a
    remote set) and `metadata` to `index_url`, through a local temporary file."""
    with tempfile.TemporaryDirectory(prefix="resumax-index-") as directory:
        local = os.path.join(directory, index_url.rpartition("/")[2])
        shard_index.write_index(local, entries, metadata)
        upload_file(local, index_url, storage_options)
