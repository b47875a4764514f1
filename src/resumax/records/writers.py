"""ArrayRecord writers: one file, or a contiguous shard set with its index, written atomically
(`.partial` files renamed into place once complete); to a URL (`s3://`, `gs://`, any fsspec
protocol) by writing locally into a temporary directory and uploading (the index last).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from array_record.python import array_record_module

from resumax.errors import DataSourceError, RecordEncodeError
from resumax.records import remote, shard_index, storage
from resumax.records.codec import encode


def _as_bytes(example: Mapping[str, Any] | bytes) -> bytes:
    return example if isinstance(example, bytes) else encode(example)


def _write_file(
    partial_path: str,
    final_path: str,
    examples: Iterable[Mapping[str, Any] | bytes],
    group_size: int,
) -> int:
    """Writes examples to `partial_path`; on any failure removes it and re-raises, a write error
    (full disk, file size limit, permissions) as a DataSourceError naming `final_path`."""
    writer = array_record_module.ArrayRecordWriter(partial_path, f"group_size:{group_size}")
    count = 0
    try:
        if not writer.ok():
            raise DataSourceError(
                f"cannot open {partial_path!r} for writing {final_path!r} (permissions or disk?)"
            )
        try:
            for example in examples:
                writer.write(_as_bytes(example))
                count += 1
            writer.close()
        except (RuntimeError, OSError) as error:
            raise DataSourceError(
                f"cannot write {final_path!r} (its partial file {partial_path!r} was removed): "
                f"{error}. Is the disk full, or a file size limit (ulimit -f) reached?"
            ) from error
    except BaseException:
        with contextlib.suppress(Exception):
            writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial_path)
        raise
    return count


def write_array_record(
    path: str | bytes | os.PathLike,
    examples: Iterable[Mapping[str, Any] | bytes],
    *,
    group_size: int = 1,
    storage_options: storage.StorageOptions = None,
) -> int:
    """Writes examples (dicts, or already encoded bytes) to one ArrayRecord file; returns the count.

    The file is written beside its final name and renamed when complete, so a crash never leaves a
    truncated file under that name, and an error (an example that cannot be encoded, a full disk)
    leaves no partial file; missing parent directories are created. group_size 1 keeps random
    access fast.

    `path` may be a URL (`s3://bucket/key`, `gs://...`, any fsspec protocol; `file://` is a local
    path): the file is written into a local temporary directory, then uploaded as one object, so
    the object appears whole or not at all. `storage_options` go to fsspec as they are
    (`endpoint_url`, `key` / `secret`, `token`, ...; credentials otherwise come from each
    library's standard chain); a failed upload raises DataSourceError naming the URL.
    """
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    storage.check_storage_options(storage_options)
    path = os.fsdecode(path)
    if storage.is_url(path):
        name = path.rpartition("/")[2]
        if not name:
            raise ValueError(f"the URL {path!r} must name an object, e.g. .../train.array_record")
        with tempfile.TemporaryDirectory(prefix="resumax-write-") as directory:
            local = os.path.join(directory, name)
            count = write_array_record(local, examples, group_size=group_size)
            remote.upload_file(local, path, storage_options)
        return count
    path = storage.local_path(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    partial_path = f"{path}.partial"
    count = _write_file(partial_path, path, examples, group_size)
    os.replace(partial_path, path)
    return count


class ArrayRows(Sequence):
    """Row i of every array as one example: a lazy sequence of dicts over equal-length arrays.

    Lets `write_shards` convert column data (e.g. an .npz file) without building every dict.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        lengths = {name: len(array) for name, array in arrays.items() if np.ndim(array) > 0}
        if not arrays or len(lengths) != len(arrays) or len(set(lengths.values())) != 1:
            raise RecordEncodeError(
                f"the arrays must all have the same, non-zero number of dimensions and rows; "
                f"got rows {lengths or {name: 0 for name in arrays}}"
            )
        self._arrays = dict(arrays)
        self._length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self._length <= index < self._length:
            raise IndexError(f"row {index} out of range for {self._length} rows")
        return {name: array[index] for name, array in self._arrays.items()}


def shard_paths(prefix: str | bytes | os.PathLike, num_shards: int) -> list[str]:
    """The file names `write_shards` uses: `prefix-00000-of-0000N.array_record`."""
    prefix = os.fsdecode(prefix)
    return [f"{prefix}-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]


def write_shards(
    prefix: str | bytes | os.PathLike,
    examples: Sequence[Mapping[str, Any] | bytes],
    num_shards: int,
    *,
    storage_options: storage.StorageOptions = None,
) -> list[str]:
    """Splits examples into `num_shards` contiguous, near-equal files; returns their paths.

    All or nothing: every shard is written as a `.partial` file first and the set renamed into
    place only once all are complete, followed by its index `prefix.index.json` (names, sizes,
    record counts, content hashes: sources read it instead of opening the files). On an error
    no partial file stays, and files of an earlier set with this prefix are left as they were.

    `prefix` may be a URL (`s3://bucket/train`, `gs://...`, any fsspec protocol; `file://` is a
    local path); the URLs of the shards are returned. The set is written as above into a local
    temporary directory (it needs the set's size on local disk), the bucket's old index for the
    prefix is deleted, the shards are uploaded, then the index, last: a remote set is complete
    only once its index exists. The index holds the same names, record counts, sizes and content
    hashes as a local write's, with the objects' modification times and no inodes. A failed
    upload raises DataSourceError naming the URL, writes no index and removes the set's objects
    (best effort). `storage_options` go to fsspec as they are (`endpoint_url`, `key` / `secret`,
    `token`, ...; credentials otherwise come from each library's standard chain).
    """
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
    storage.check_storage_options(storage_options)
    prefix = os.fsdecode(prefix)
    if storage.is_url(prefix):
        return _write_remote_shards(prefix, examples, num_shards, storage_options)
    prefix = storage.local_path(prefix)
    if not isinstance(examples, Sequence):
        examples = list(examples)
    bounds = np.linspace(0, len(examples), num_shards + 1).astype(int)
    paths = shard_paths(prefix, num_shards)
    index = shard_index.index_path(prefix)
    os.makedirs(os.path.dirname(index) or ".", exist_ok=True)
    partials: list[str] = []
    try:
        entries = []
        for path, start, stop in zip(paths, bounds[:-1], bounds[1:], strict=True):
            partials.append(f"{path}.partial")
            count = _write_file(partials[-1], path, (examples[i] for i in range(start, stop)), 1)
            entries.append(shard_index.index_entry(partials[-1], os.path.basename(path), count))
        partials.append(f"{index}.partial")
        shard_index.write_index(partials[-1], entries)
        # A set caught half renamed has no index yet, so nothing describes it as complete.
        with contextlib.suppress(FileNotFoundError):
            os.remove(index)
        for partial, final in zip(partials, [*paths, index], strict=True):
            os.replace(partial, final)
    except BaseException:
        for partial in partials:
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial)
        raise
    return paths


def _write_remote_shards(
    prefix: str,
    examples: Sequence[Mapping[str, Any] | bytes],
    num_shards: int,
    storage_options: storage.StorageOptions,
) -> list[str]:
    """`write_shards` to a URL prefix: locally into a temporary directory, then uploaded."""
    stem = prefix.rpartition("/")[2]
    if not stem:
        raise ValueError(f"the prefix {prefix!r} must end with a file name stem, e.g. .../train")
    urls = shard_paths(prefix, num_shards)
    with tempfile.TemporaryDirectory(prefix="resumax-write-") as directory:
        paths = write_shards(os.path.join(directory, stem), examples, num_shards)
        remote.upload_set(paths, urls, shard_index.index_path(prefix), storage_options)
    return urls
