"""`ArrayRecordSourceModule`: records from ArrayRecord files, read through per-file readers.

Reads use per-record range reads `reader.read(i, i + 1)` on readers opened for random access, which
cost the same few microseconds whatever the file size or shard count (see REFERENCE.md).
"""

from __future__ import annotations

import functools
import glob
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from array_record.python import array_record_module
from flax import nnx

from resumax import records
from resumax.errors import DataSourceError, RecordDecodeError
from resumax.sources.base import ArrayRecordSourceConfig, RecordSource, fingerprint

_RANDOM_ACCESS_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"
_GLOB_CHARACTERS = frozenset("*?[")

PathsLike = str | bytes | os.PathLike | Sequence[str | bytes | os.PathLike]
_PATH_TYPES = (str, bytes, os.PathLike)


def resolve_paths(paths: PathsLike) -> list[str]:
    """Expands one path, a glob or a list of either into a list of files; globs are sorted.

    Paths may be str, bytes (decoded as the OS does, `os.fsdecode`) or path-like objects.
    """
    if isinstance(paths, _PATH_TYPES):
        paths = [paths]
    if (
        not isinstance(paths, Sequence)
        or not paths
        or not all(isinstance(path, _PATH_TYPES) for path in paths)
    ):
        raise DataSourceError(
            f"paths must be a path, a glob or a non-empty list of them, got {paths!r}"
        )
    files: list[str] = []
    for pattern in map(os.fsdecode, paths):
        if _GLOB_CHARACTERS.intersection(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise DataSourceError(f"the glob {pattern!r} matches no file")
            files.extend(matches)
        else:
            files.append(pattern)
    return files


def open_reader(path: str) -> Any:
    """Opens one ArrayRecord file for random access, or raises DataSourceError naming it."""
    if not os.path.exists(path):
        raise DataSourceError(f"data file {path!r} does not exist")
    if os.path.isdir(path):
        raise DataSourceError(
            f"data path {path!r} is a directory; pass files or a glob such as {path}/*"
        )
    if os.path.getsize(path) == 0:
        raise DataSourceError(
            f"data file {path!r} is empty (0 bytes); it is not an ArrayRecord file"
        )
    try:
        reader = array_record_module.ArrayRecordReader(path, _RANDOM_ACCESS_OPTIONS)
    except Exception as error:
        raise DataSourceError(f"cannot open ArrayRecord file {path!r}: {error}") from error
    if not reader.ok():
        raise DataSourceError(
            f"data file {path!r} is not a valid ArrayRecord file (corrupt or truncated)"
        )
    return reader


class ArrayRecordFiles:
    """Open readers over a list of files, addressed by one global record index."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.readers = [open_reader(path) for path in paths]
        self.counts = [reader.num_records() for reader in self.readers]
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    def locate(self, record_index: int) -> tuple[str, int]:
        """(file path, index within that file) of a global record index."""
        file_id = int(np.searchsorted(self.starts, record_index, side="right") - 1)
        return self.paths[file_id], record_index - int(self.starts[file_id])

    def read(self, record_indices: np.ndarray) -> list[bytes]:
        """Raw bytes of the records at the given global indices, by per-record range reads."""
        if len(self.readers) == 1:
            read = self.readers[0].read
            return [read(i, i + 1)[0] for i in record_indices.tolist()]
        file_ids = np.searchsorted(self.starts, record_indices, side="right") - 1
        local_indices = record_indices - self.starts[file_ids]
        readers = self.readers
        return [
            readers[f].read(i, i + 1)[0]
            for f, i in zip(file_ids.tolist(), local_indices.tolist(), strict=True)
        ]

    def close(self) -> None:
        for reader in self.readers:
            reader.close()
        self.readers = []


class ArrayRecordSourceModule(RecordSource):
    """Records of one or more ArrayRecord files, in a seeded per-epoch order.

    Args:
      config: seed, num_epochs and shuffle_files (`ArrayRecordSourceConfig`).
      paths: a path, a glob, or a list of paths/globs; globs are expanded and sorted.
      rngs: accepted for Datarax compatibility; the order depends on `config.seed` alone, so that
        it is a pure function of (seed, epoch, position).
      decode: bytes -> example; defaults to `resumax.records.decode`.
    """

    def __init__(
        self,
        config: ArrayRecordSourceConfig,
        paths: PathsLike,
        *,
        rngs: nnx.Rngs | None = None,
        decode: Callable[[bytes], Any] | None = None,
    ):
        self.paths = resolve_paths(paths)
        self._files = ArrayRecordFiles(self.paths)
        total = sum(self._files.counts)
        if total == 0:
            raise DataSourceError(f"the data files {self.paths} hold no records")
        self._decode = decode or records.decode
        names = [os.path.basename(path) for path in self.paths]
        super().__init__(
            config,
            records_per_epoch=int(total),
            fingerprint=fingerprint(list(zip(names, self._files.counts, strict=True))),
        )

    def read_records(self, record_indices: Sequence[int]) -> list[Any]:
        """Decoded records at the given dataset indices, in that order."""
        record_indices = np.asarray(record_indices, dtype=np.int64)
        try:
            raw = self._files.read(record_indices)
        except Exception as error:
            raise self._read_error(record_indices, error) from error
        decode = self._decode
        try:
            return [decode(data) for data in raw]
        except Exception as error:
            raise self._decode_error(record_indices, raw, error) from error

    def reopener(self) -> Callable[[], ArrayRecordSourceModule]:
        """Opens the same files (by absolute path) with the same config and decode, e.g. in a
        worker process."""
        paths = [os.path.abspath(path) for path in self.paths]
        return functools.partial(ArrayRecordSourceModule, self.config, paths, decode=self._decode)

    def _read_error(self, record_indices: np.ndarray, error: Exception) -> DataSourceError:
        """Names the first record of a failed batch read that cannot be read on its own."""
        for record_index in record_indices.tolist():
            try:
                self._files.read(np.array([record_index]))
            except Exception as single_error:
                path, local = self._files.locate(record_index)
                return DataSourceError(f"cannot read record {local} of {path!r}: {single_error}")
        return DataSourceError(f"cannot read records of {self.paths}: {error}")

    def _decode_error(
        self, record_indices: np.ndarray, raw: list[bytes], error: Exception
    ) -> RecordDecodeError:
        """Names the first record of a failed batch decode that cannot be decoded on its own."""
        for record_index, data in zip(record_indices.tolist(), raw, strict=True):
            try:
                self._decode(data)
            except Exception as single_error:
                path, local = self._files.locate(record_index)
                return RecordDecodeError(
                    f"record {local} of {path!r} cannot be decoded: {single_error}"
                )
        return RecordDecodeError(f"records of {self.paths} cannot be decoded: {error}")

    def close(self) -> None:
        """Closes the file readers; the source cannot read afterwards."""
        self._files.close()
