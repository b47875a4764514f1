"""`ArrayRecordSourceModule`: records from ArrayRecord files, read through per-file readers.

Reads use per-record range reads `reader.read(i, i + 1)` on readers opened for random access, which
cost the same few microseconds whatever the file size or shard count (see REFERENCE.md). Readers
are opened on demand from a bounded pool (`resumax.sources.files.readers`).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from flax import nnx

from resumax import records
from resumax.errors import ConfigError, DataSourceError, RecordDecodeError, StateMismatchError
from resumax.records import storage
from resumax.sources.base import ArrayRecordSourceConfig, RecordSource, fingerprint
from resumax.sources.files.fetch_ahead import ReadAhead
from resumax.sources.files.file_schedule import NEVER, FileSchedule
from resumax.sources.files.readers import ArrayRecordFiles, default_max_open_files
from resumax.sources.files.remote import RemoteFiles, cache_settings, resolve_remote
from resumax.sources.files.resolve import PathsLike, ResolvedFiles, resolve_files
from resumax.sources.files.shard_cache import ShardCache
from resumax.sources.files.window_reads import BlockCache


class ArrayRecordSourceModule(RecordSource):
    """Records of one or more ArrayRecord files, in a seeded per-epoch order.

    Args:
      config: seed, num_epochs, shuffle_files and shuffle_window (`ArrayRecordSourceConfig`).
      paths: a path, a glob, or a list of paths/globs (str, bytes or os.PathLike). A path that
        exists is taken literally; other globs are expanded and sorted, and must match whole
        `-NNNNN-of-MMMMM` shard sets.
      rngs: accepted for Datarax compatibility; the order depends on `config.seed` alone, so that
        it is a pure function of (seed, epoch, position).
      decode: bytes -> example; defaults to `resumax.records.decode`.
      max_open_files: most files this process keeps open at once (readers are opened on demand
        and the least recently used closed); None: `default_max_open_files()`, the process's
        `ulimit -n` less half of it, at least 896 left free (128 under 1024, 10,000 under
        20,000), between 16 and 32,768. Each worker process has its own pool. Shuffled reading
        over more files than this reopens files (~30 microseconds each).
      storage_options: passed as they are to fsspec for URL paths (`s3://`, `gs://`, any fsspec
        protocol), e.g. `endpoint_url`, `key` / `secret`, `token`, `anon`; credentials otherwise
        come from each library's standard chain. Never part of the state.
      cache_dir: where URL paths' shards are kept, shared by every process of the host; default
        `$RESUMAX_CACHE_DIR`, else `~/.cache/resumax`.
      cache_limit: bytes (or a string such as "20GB") the cache directory may hold, downloads in
        progress included; default 80% of the free disk space there. ConfigError at
        construction when the read order needs more at once.
      fetch_threads: parallel downloads ahead of the read order (default 8).
      fetch_timeout: seconds one shard's download, retries included, may take (default 120).

    The fingerprint hashes each file's name, record count and content hash (see
    `resolve_files`): a regenerated shard changes it, a moved directory does not. Every file
    opened later, in this process or a worker, must still be the file seen here.
    """

    def __init__(
        self,
        config: ArrayRecordSourceConfig,
        paths: PathsLike | ResolvedFiles,
        *,
        rngs: nnx.Rngs | None = None,
        decode: Callable[[bytes], Any] | None = None,
        max_open_files: int | None = None,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike | None = None,
        cache_limit: int | str | None = None,
        fetch_threads: int | None = None,
        fetch_timeout: float | None = None,
    ):
        if max_open_files is None:
            max_open_files = default_max_open_files()
        if (
            not isinstance(max_open_files, int)
            or isinstance(max_open_files, bool)
            or max_open_files < 1
        ):
            raise ConfigError(f"max_open_files must be None or an int >= 1, got {max_open_files!r}")
        if not isinstance(paths, ResolvedFiles):
            urls = _urls(paths)
            if urls:
                options = storage.check_storage_options(storage_options)
                settings = cache_settings(cache_dir, cache_limit, fetch_threads, fetch_timeout)
                paths = resolve_remote(urls, options, settings)
            else:
                paths = resolve_files(paths, max_open_files)
        self._resolved = paths
        self.paths = list(paths.paths)
        self.max_open_files = max_open_files
        self._cache = None
        self._cache_sets_bytes: int | None = None  # see share_cache
        if isinstance(paths, RemoteFiles):
            self._cache = ShardCache(paths.shards, paths.settings)
        self._files = ArrayRecordFiles(
            paths.paths,
            paths.counts,
            paths.identities,
            max_open_files,
            index=paths.index,
            copies=self._cache,
        )
        if self._cache is not None:
            self._cache.close_reader = self._files.pool.forget
        total = sum(paths.counts)
        if total == 0:
            raise DataSourceError(f"the data files {self.paths} hold no records")
        self._decode = decode or records.decode
        super().__init__(config, records_per_epoch=int(total), fingerprint=paths.fingerprint)
        window = config.shuffle_window
        self._blocks = BlockCache(self._files, window) if window is not None else None
        self._schedule = None
        if self._cache is not None:
            self._schedule = FileSchedule(paths.counts, config)
            _check_cache_limit(self._schedule, paths.shards.sizes, paths.settings.limit)

    def read_ahead_limit(self, room: int | None = None) -> int | None:
        """With URL paths: the positions whose shards `room` bytes (default: `cache_limit`)
        hold at once."""
        if self._cache is None:
            return None
        room = self._cache.settings.limit if room is None else room
        return self._schedule.positions_within(self._resolved.shards.sizes, room)

    def cache_needs(self) -> tuple[str, int, int, int] | None:
        """With URL paths: (cache directory, bytes of shards the read order needs on disk at
        once with a window read ahead, cache_limit, bytes of the whole set); None for local
        paths."""
        if self._cache is None:
            return None
        sizes = self._resolved.shards.sizes
        needed = _bytes_needed(self._schedule, sizes)
        return self._cache.settings.directory, needed, self._cache.settings.limit, sum(sizes)

    def share_cache(self, sets_bytes: int) -> None:
        """Told by a mixture whose components read through this source's cache directory at
        once: the bytes of all their sets. Its shards then stay pinned once read (no re-pinning
        in later epochs) only if all those sets fit the limit together."""
        self._cache_sets_bytes = sets_bytes

    def spans_ready(self, spans: Iterator[tuple[int, int]]) -> Iterator[tuple[int, int]]:
        """With URL paths: each span once its shards are in the local cache (and pinned there
        until the caller has received it), downloading ahead in read order meanwhile."""
        if self._cache is None:
            return spans
        sets_bytes = self._cache_sets_bytes or sum(self._resolved.shards.sizes)
        keep_all = self._schedule.global_shuffle or sets_bytes <= self._cache.settings.limit
        return ReadAhead(
            self._cache, self._schedule, self._file_ids_of, self._delivered, spans, keep_all
        )

    def _file_ids_of(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """The files the records at global positions [start, stop) lie in, and where each one's
        use ends: from the files' ranges of positions (no record order computed), or, under the
        global shuffle (where every file ranges over the whole epoch, each kept to the end), from
        the records' own indices."""
        if not self._schedule.global_shuffle:
            return self._schedule.needed_until(start, stop)
        per_epoch = self.records_per_epoch
        indices = []
        while start < stop:
            epoch, index = divmod(start, per_epoch)
            end = min(stop - epoch * per_epoch, per_epoch)
            indices.append(self.record_indices(epoch, index, end))
            start = epoch * per_epoch + end
        found = np.searchsorted(self._files.starts, np.concatenate(indices), side="right") - 1
        file_ids = np.unique(found)
        return file_ids, np.full(len(file_ids), NEVER, dtype=np.int64)

    def _delivered(self) -> int:
        epoch, index = self.position
        return epoch * self.records_per_epoch + index

    def locate(self, record_indices: Sequence[int]) -> list[tuple[str | None, int]]:
        """(file or URL, record inside it) of each dataset index."""
        return [self._files.locate(int(index)) for index in record_indices]

    def file_record_counts(self) -> Sequence[int]:
        """Records of each file, in the order of `paths`."""
        return self._resolved.counts

    @property
    def batch_decodable(self) -> bool:
        """True when the records use resumax's codec (the default decode), so that a span of
        them can be decoded at once (`resumax.pipeline.batch_decode`)."""
        return self._decode is records.decode

    def read_raw(self, record_indices: Sequence[int]) -> list[bytes]:
        """Undecoded bytes of the records at the given dataset indices, in that order."""
        self.check_open()
        record_indices = np.asarray(record_indices, dtype=np.int64)
        try:
            if self._blocks is not None:
                return self._blocks.read(record_indices)
            return self._files.read(record_indices)
        except DataSourceError:
            raise
        except Exception as error:
            raise self._read_error(record_indices, error) from error

    def read_records(self, record_indices: Sequence[int]) -> list[Any]:
        """Decoded records at the given dataset indices, in that order."""
        record_indices = np.asarray(record_indices, dtype=np.int64)
        raw = self.read_raw(record_indices)
        decode = self._decode
        try:
            return [decode(data) for data in raw]
        except Exception as error:
            raise self._decode_error(record_indices, raw, error) from error

    def reopener(self) -> Callable[[], ArrayRecordSourceModule]:
        """Opens exactly the files this source resolved (no glob again, no count, no hash) with
        the same config, decode and max_open_files, e.g. in a worker process; each file is
        checked to be the one this process saw when it is opened."""
        return functools.partial(
            ArrayRecordSourceModule,
            self.config,
            self._resolved,
            decode=self._decode,
            max_open_files=self.max_open_files,
        )

    def set_state(self, state: dict[str, Any]) -> None:
        """`RecordSource.set_state`; a changed record count also names the files that differ
        from their shard index, when an index tells which."""
        if isinstance(state, dict) and state.get("fingerprint") == self._names_and_counts_hash():
            warnings.warn(
                "this source state carries the older fingerprint of file names and record counts "
                "only (saved before resumax fingerprinted file contents): resuming on these files "
                "without checking their content; the next save records the content fingerprint",
                stacklevel=2,
            )
            state = {**state, "fingerprint": self.fingerprint}
        try:
            super().set_state(state)
        except StateMismatchError as error:
            if "'num_records'" not in str(error) or not self._resolved.stale:
                raise
            changed = " | ".join(self._resolved.stale[:3])
            raise StateMismatchError(f"{error}. Changed since indexed: {changed}") from error

    def _names_and_counts_hash(self) -> str:
        """The fingerprint states saved before content fingerprints had: basenames and counts."""
        names = [os.path.basename(path) for path in self._resolved.paths]
        return fingerprint(list(zip(names, self._resolved.counts, strict=True)))

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
        """Closes the open file readers; a later read opens them again."""
        if self._blocks is not None:
            self._blocks.clear()
        self._files.close()
        if self._cache is not None:
            self._cache.close()
        super().close()


def _urls(paths: Any) -> list[str]:
    """The paths as strings when they are URLs (all of them), [] when none is; ConfigError for
    a mix, which would read one set from two places."""
    listed = [paths] if isinstance(paths, str | bytes | os.PathLike) else paths
    if not isinstance(listed, Sequence) or isinstance(listed, str | bytes):
        return []
    try:
        names = [os.fsdecode(path) for path in listed]
    except TypeError:
        return []  # resolve_files names the bad value
    urls = [name for name in names if storage.is_url(name)]
    if urls and len(urls) != len(names):
        local = next(name for name in names if not storage.is_url(name))
        raise ConfigError(
            f"paths mix URLs ({urls[0]!r}) and local paths ({local!r}); use one kind per "
            "source, or a MixtureSource of two sources"
        )
    return urls


def _bytes_needed(schedule: FileSchedule, sizes: Sequence[int]) -> int:
    """The bytes of shards the read order needs on disk at once, counting one window (or one
    shard's records) read ahead, the least a pipeline reads ahead."""
    return schedule.bytes_at_once(sizes, schedule.window or int(max(schedule.counts)))


def _check_cache_limit(schedule: FileSchedule, sizes: Sequence[int], limit: int) -> None:
    """ConfigError when the read order needs more bytes on disk at once than `limit`, counting
    one window (or one shard's records) read ahead, the least a pipeline reads ahead."""
    needed = _bytes_needed(schedule, sizes)
    if needed <= limit:
        return
    if schedule.global_shuffle:
        why = (
            f"the global shuffle reads any shard at any time, so the whole set ({needed} bytes) "
            "must fit"
        )
    else:
        why = f"the read order needs up to {needed} bytes of shards on disk at once"
    window = (
        "a smaller shuffle_window"
        if schedule.window is not None
        else "a shuffle_window (ArrayRecordSourceConfig(shuffle_window=...))"
    )
    raise ConfigError(
        f"cache_limit={limit} bytes is too small: {why}. Either read with {window}, which "
        f"needs only the shards of a few windows, or raise cache_limit to at least {needed} bytes"
    )
