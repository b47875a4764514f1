"""The input files of a conversion: files, globs and directories (local or URLs) expanded into
one sorted list, the format guessed from their names, and opening each for reading."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from typing import IO

from resumax.errors import ConfigError, DataFileNotFoundError, DataSourceError
from resumax.records import storage

# File name endings of each format (a TFDS-style `name.tfrecord-00000-of-00010` also counts).
EXTENSIONS = {
    "jsonl": (".jsonl", ".ndjson", ".json"),
    "parquet": (".parquet", ".pq"),
    "csv": (".csv",),
    "tfrecord": (".tfrecord", ".tfrecords", ".tfrec"),
    "npz": (".npz",),
}
# A directory holding these is a Hugging Face `save_to_disk` dataset.
HF_MARKERS = ("dataset_info.json", "state.json")


def _has_extension(path: str, format: str) -> bool:
    name = path.rpartition("/")[2].lower()
    if format == "tfrecord" and ".tfrecord" in name:
        return True
    return name.endswith(EXTENSIONS[format])


def _is_dir(path: str, storage_options: storage.StorageOptions) -> bool:
    if storage.is_url(path):
        fs, key = storage.filesystem(path, storage_options)
        return fs.isdir(key)
    return os.path.isdir(path)


def guess_format(inputs: Sequence[str], storage_options: storage.StorageOptions = None) -> str:
    """The format of `inputs` from their names: a Hugging Face `save_to_disk` directory, a
    directory of class sub-directories (imagefolder), or the extension of the files (of a
    directory's files). ConfigError naming the inputs when it cannot tell."""
    formats = set()
    for path in inputs:
        if _is_dir(path, storage_options):
            entries = list_dir(path, storage_options, recursive=False)
            names = {entry.rpartition("/")[2] for entry in entries}
            if all(marker in names for marker in HF_MARKERS):
                formats.add("hf")
                continue
            if any(_is_dir(entry, storage_options) for entry in entries):
                formats.add("imagefolder")
                continue
            path_formats = {f for f in EXTENSIONS for e in entries if _has_extension(e, f)}
        else:
            path_formats = {f for f in EXTENSIONS if _has_extension(path, f)}
        formats |= path_formats or {None}
    if len(formats) != 1 or None in formats:
        raise ConfigError(
            f"cannot tell the format of {list(inputs)} from their names "
            f"(found {sorted(f for f in formats if f) or 'none'}); give --format with one of "
            "jsonl, parquet, csv, tfrecord, imagefolder, hf, npz"
        )
    return formats.pop()


def list_dir(path: str, storage_options: storage.StorageOptions, recursive: bool) -> list[str]:
    """The entries of a directory (all files below it when `recursive`), hidden ones left out."""
    if storage.is_url(path):
        fs, key = storage.filesystem(path, storage_options)
        scheme = path.split("://", 1)[0]
        found = fs.find(key) if recursive else fs.ls(key, detail=False)
        entries = [f"{scheme}://{entry}" for entry in found]
    elif recursive:
        entries = []
        for root, dirs, files in os.walk(path):
            dirs[:] = [name for name in dirs if not name.startswith(".")]
            entries.extend(os.path.join(root, name) for name in files)
    else:
        entries = [os.path.join(path, name) for name in os.listdir(path)]
    return sorted(e for e in entries if not e.rpartition("/")[2].startswith("."))


def expand(
    inputs: Sequence[str], format: str, storage_options: storage.StorageOptions = None
) -> list[str]:
    """The files of `inputs` in sorted order: each file as it is, each glob's matches, and each
    directory's files (recursively) with the format's extension. DataFileNotFoundError names
    an input that matches nothing."""
    if not inputs:
        raise ConfigError("give at least one input file, glob or directory")
    files: set[str] = set()
    for path in map(os.fsdecode, inputs):
        if _is_dir(path, storage_options):
            found = [
                entry
                for entry in list_dir(path, storage_options, recursive=True)
                if _has_extension(entry, format)
            ]
        elif glob.has_magic(path):
            found = _glob(path, storage_options)
        else:
            found = [path] if _exists(path, storage_options) else []
        if not found:
            raise DataFileNotFoundError(
                f"the input {path!r} matches no {format} file (a directory is searched for "
                f"names ending in {EXTENSIONS.get(format, ())})"
            )
        files.update(found)
    return sorted(files)


def _glob(pattern: str, storage_options: storage.StorageOptions) -> list[str]:
    if storage.is_url(pattern):
        fs, key = storage.filesystem(pattern, storage_options)
        scheme = pattern.split("://", 1)[0]
        return [f"{scheme}://{entry}" for entry in fs.glob(key) if not fs.isdir(entry)]
    local = storage.local_path(pattern)
    return [path for path in glob.glob(local) if os.path.isfile(path)]


def _exists(path: str, storage_options: storage.StorageOptions) -> bool:
    if storage.is_url(path):
        fs, key = storage.filesystem(path, storage_options)
        return fs.isfile(key)
    return os.path.isfile(storage.local_path(path))


def open_input(path: str, storage_options: storage.StorageOptions = None, mode: str = "rb") -> IO:
    """`path` opened for reading (a URL through fsspec); DataSourceError naming it."""
    if not storage.is_url(path):
        try:
            return open(storage.local_path(path), mode)  # noqa: SIM115 (the caller closes it)
        except OSError as error:
            raise DataSourceError(f"cannot open the input {path!r}: {error}") from error
    fs, key = storage.filesystem(path, storage_options)
    try:
        return fs.open(key, mode)
    except Exception as error:
        raise storage.storage_error(path, error) from error


def size_of(path: str, storage_options: storage.StorageOptions = None) -> int:
    """The size in bytes of the input file `path`."""
    if storage.is_url(path):
        fs, key = storage.filesystem(path, storage_options)
        return int(fs.size(key))
    return os.path.getsize(storage.local_path(path))
