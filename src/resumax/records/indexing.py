"""The shard index of a set made by other tools (TFDS, Grain, Beam, ...): `resumax index`.

A source reads a set's `<stem>.index.json` (record counts, sizes, content hashes) instead of
opening every file to count its records; for a set in a bucket that means downloading every
shard before the first batch. `index_set` writes that index once, locally or in the bucket.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import tempfile
from collections.abc import Mapping
from typing import Any

from array_record.python import array_record_module

from resumax.errors import DataFileNotFoundError, DataSourceError
from resumax.records import remote, shard_index, storage


@dataclasses.dataclass(frozen=True)
class IndexedSet:
    """What `index_set` wrote: the index's path or URL, and the set it describes."""

    index: str
    num_files: int
    num_records: int


def index_set(pattern: str, storage_options: storage.StorageOptions = None) -> IndexedSet:
    """Writes the shard index of the one complete `-NNNNN-of-MMMMM` set that `pattern` (a path,
    a glob, or a URL / glob of URLs) matches, beside it as `<stem>.index.json`.

    Each file is opened with ArrayRecord to count its records and hashed
    (`shard_index.content_hash`); an index already there is replaced. A local index is written
    to a `.partial` file and renamed, with each file's size, modification time and inode, as
    `write_shards` writes it. For a URL each shard is downloaded in turn into a temporary
    directory (one at a time: the local disk needs room for one shard), and the index, with the
    objects' sizes and modification times from the listing and no inodes, is uploaded once all
    are counted.

    One index per call: a pattern matching several sets (e.g. a TFDS directory's train and test
    splits), files not named as shards, or an incomplete set raise DataSourceError; index each
    set with a glob of its own. `storage_options` go to fsspec as they are.
    """
    storage.check_storage_options(storage_options)
    pattern = os.fsdecode(pattern)
    if storage.is_url(pattern):
        return _index_remote(pattern, storage_options)
    pattern = storage.local_path(pattern)
    paths = sorted(path for path in glob.glob(pattern) if not shard_index.is_index_file(path))
    if not paths:
        raise DataFileNotFoundError(f"no file matches {pattern!r}")
    stem_path = _one_set(paths, pattern)
    entries = [
        shard_index.index_entry(path, os.path.basename(path), count_records(path)) for path in paths
    ]
    index = shard_index.index_path(stem_path)
    partial = f"{index}.partial"
    try:
        shard_index.write_index(partial, entries)
        os.replace(partial, index)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise DataSourceError(f"cannot write the shard index {index!r}: {error}") from error
    return IndexedSet(index, len(entries), sum(entry[1] for entry in entries))


def _one_set(paths: list[str], pattern: str) -> str:
    """The stem path (`<directory>/<stem>`) of the one complete shard set `paths` are, or
    DataSourceError naming what else the pattern matched."""
    shard_index.check_complete_sets(paths, pattern)
    sets = shard_index.shard_sets(paths)
    in_sets = sum(len(members) for members in sets.values())
    if in_sets < len(paths):
        named = {position for members in sets.values() for position, _ in members}
        others = [path for position, path in enumerate(paths) if position not in named]
        raise DataSourceError(
            f"{pattern!r} matches files not named as shards of a set "
            f"(<stem>-NNNNN-of-MMMMM<suffix>), e.g. {others[:3]}: an index describes one such "
            "set; use a glob that matches only its files"
        )
    if len(sets) > 1:
        names = [os.path.join(directory, f"{stem}-*{suffix}") for directory, stem, suffix in sets]
        raise DataSourceError(
            f"{pattern!r} matches {len(sets)} shard sets {names}: `resumax index` writes the "
            "index of one set; run it once per set with a glob of its own"
        )
    ((directory, stem, _),) = sets
    return os.path.join(directory, stem) if directory else stem


def count_records(path: str, name: str | None = None) -> int:
    """The number of records in the local ArrayRecord file `path`; DataSourceError naming
    `name` (default: the path) when it cannot be read as one."""
    name = name or path
    try:
        reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
    except (RuntimeError, OSError, ValueError) as error:
        raise DataSourceError(f"cannot open {name!r} as an ArrayRecord file: {error}") from error
    try:
        if not reader.ok():
            raise DataSourceError(
                f"cannot open {name!r} as an ArrayRecord file (missing, unreadable, or not "
                "ArrayRecord)"
            )
        return int(reader.num_records())
    finally:
        with contextlib.suppress(RuntimeError, OSError, ValueError):
            reader.close()


def _index_remote(pattern: str, storage_options: storage.StorageOptions) -> IndexedSet:
    fs, path_pattern = storage.filesystem(pattern, storage_options)
    scheme = pattern.split("://", 1)[0]
    try:
        listed: Mapping[str, Mapping[str, Any]] = fs.glob(path_pattern, detail=True)
    except Exception as error:
        raise storage.storage_error(pattern, error, doing="list") from error
    # URL -> (the object's path within fs, its listing info)
    objects = {
        f"{scheme}://{key}": (key, info)
        for key, info in listed.items()
        if info.get("type", "file") == "file" and not shard_index.is_index_file(key)
    }
    urls = sorted(objects)
    if not urls:
        _raise_if_no_bucket(fs, pattern)
        raise DataFileNotFoundError(f"no object matches {pattern!r}")
    stem_url = _one_set(urls, pattern)
    entries = []
    with tempfile.TemporaryDirectory(prefix="resumax-index-") as directory:
        for url in urls:
            key, info = objects[url]
            name = url.rpartition("/")[2]
            local = os.path.join(directory, name)
            try:
                fs.get_file(key, local)
            except Exception as error:
                raise storage.storage_error(url, error) from error
            size = os.path.getsize(local)
            if info.get("size") not in (None, size):
                raise DataSourceError(
                    f"{url!r} downloaded as {size} bytes where its listing says "
                    f"{info['size']}: was it replaced meanwhile? Run `resumax index` again"
                )
            count = count_records(local, url)
            content = shard_index.content_hash(local)
            os.remove(local)
            entries.append((name, count, size, remote.object_mtime_ns(info), content))
    index = shard_index.index_path(stem_url)
    remote.upload_index(entries, index, storage_options)
    return IndexedSet(index, len(entries), sum(entry[1] for entry in entries))


def _raise_if_no_bucket(fs: Any, url: str) -> None:
    """DataFileNotFoundError when the bucket of `url` does not exist (a glob in a missing
    bucket lists nothing, as s3fs does, rather than failing)."""
    bucket = storage.bucket_of(url)
    try:
        exists = fs.exists(bucket)
    except Exception:
        return
    if not exists:
        raise DataFileNotFoundError(f"cannot list {url!r}: the bucket {bucket!r} does not exist")
