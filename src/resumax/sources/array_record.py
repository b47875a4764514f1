"""`ArrayRecordSourceModule`: records from ArrayRecord files, read through per-file readers.

Reads use per-record range reads `reader.read(i, i + 1)` on readers opened for random access, which
cost the same few microseconds whatever the file size or shard count (see REFERENCE.md). Readers
are opened on demand from a bounded pool (`resumax.sources.files.readers`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import glob
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flax import nnx

from resumax import records
from resumax.errors import (
    ConfigError,
    DataFileNotFoundError,
    DataSourceError,
    RecordDecodeError,
    StateMismatchError,
)
from resumax.records import shard_index
from resumax.sources.base import ArrayRecordSourceConfig, RecordSource, fingerprint
from resumax.sources.files.listing import identify_by_listing
from resumax.sources.files.readers import (
    ArrayRecordFiles,
    FileIdentity,
    default_max_open_files,
    open_reader,
    stat_files,
)
from resumax.sources.files.window_reads import BlockCache

_GLOB_CHARACTERS = frozenset("*?[")
logger = logging.getLogger("resumax")

PathLike = str | bytes | os.PathLike
PathsLike = PathLike | Sequence[PathLike]


# Directory (absolute) -> {name: inode}, from the listing a glob took.
Listings = dict[str, dict[str, int]]


def _expand(pattern: str, listings: Listings) -> list[str]:
    """An existing path as it is; otherwise the sorted matches of the glob (never an index file).

    A directory part that exists literally (`run[1]/`) is taken literally too, so only the
    pattern's remaining part is expanded.
    """
    if os.path.exists(pattern) or not _GLOB_CHARACTERS.intersection(pattern):
        return [pattern]
    directory, name = os.path.split(pattern)
    if not _GLOB_CHARACTERS.intersection(directory) or os.path.isdir(directory):
        matches = _match_in(directory, name, listings)
    else:
        matches = sorted(path for path in glob.glob(pattern) if not shard_index.is_index_file(path))
    if not matches:
        raise DataFileNotFoundError(f"the glob {pattern!r} matches no file")
    shard_index.check_complete_sets(matches, pattern)
    return matches


def _match_in(directory: str, name_pattern: str, listings: Listings) -> list[str]:
    """Sorted files of one literal directory whose names match, as glob would (no hidden files
    unless the pattern starts with a dot), in one listing: fast for 10^5 shards. The listing's
    inodes go to `listings` (`listed_files` identifies an indexed set by them)."""
    try:
        with os.scandir(directory or ".") as entries:
            inodes = {entry.name: entry.inode() for entry in entries}
    except OSError:
        return []
    listings[os.path.abspath(directory or ".")] = inodes
    matches = fnmatch.filter(inodes, name_pattern)
    matches.sort()
    # A pattern that starts with a literal other than "." matches no hidden name, and one that
    # ends with a literal other than the index suffix's last character matches no index.
    first, last = name_pattern[:1], name_pattern[-1:]
    if first in _GLOB_CHARACTERS:
        matches = [name for name in matches if name[:1] != "."]
    if last in _GLOB_CHARACTERS or last == "]" or last == shard_index.INDEX_SUFFIX[-1]:
        matches = [name for name in matches if not shard_index.is_index_file(name)]
    return list(map(os.path.join(directory, "").__add__, matches))


def resolve_paths(paths: PathsLike) -> list[str]:
    """Expands one path, a glob or a list of either (str, bytes or os.PathLike) into files.

    A path that exists is taken literally even when it holds glob characters (`run[1]/x`); only
    patterns that match no existing file are expanded, and their matches sorted.
    """
    return _resolve_paths(paths, {})


def _resolve_paths(paths: PathsLike, listings: Listings) -> list[str]:
    """`resolve_paths`, keeping the directory listings its globs took in `listings`."""
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]
    if not isinstance(paths, Sequence) or not paths:
        raise DataSourceError(
            f"paths must be a path, a glob or a non-empty list of them, got {paths!r}"
        )
    files: list[str] = []
    for path in paths:
        try:
            pattern = os.fsdecode(path)
        except TypeError:
            raise DataSourceError(
                f"a data path must be a str, bytes or os.PathLike, got {path!r}"
            ) from None
        files.extend(_expand(pattern, listings))
    return files


@dataclasses.dataclass(frozen=True)
class ResolvedFiles:
    """A source's files as its process found them: what workers open, never resolving again.

    paths are absolute; identities and record counts are those the parent saw.
    """

    paths: tuple[str, ...]
    identities: tuple[FileIdentity, ...]
    counts: tuple[int, ...]
    fingerprint: str
    # Files the shard index did not describe: "name: why; it has N records".
    stale: tuple[str, ...] = ()
    # The shard index the identities were taken from (a set identified by its listing), if any.
    index: str | None = None


# Characters json.dumps writes as they are: printable ASCII but the quote and the backslash.
_JSON_PLAIN = bytes(set(range(0x20, 0x7F)) - set(b'"\\'))


def files_fingerprint(names: Sequence[str], counts: Sequence[int], hashes: Sequence[str]) -> str:
    """A short hash of the files' names, record counts and content hashes: identifies the
    records, not where the files live, so a moved or renamed directory keeps it."""
    counts = [int(count) for count in counts]
    text = ("".join(names) + "".join(hashes)).encode("utf-8", "backslashreplace")
    if names and not text.translate(None, _JSON_PLAIN):
        # Nothing to escape: the very text json.dumps gives, joined without per-item encoding.
        quoted = '", "'
        payload = (
            f'[["{quoted.join(names)}"], [{", ".join(map(str, counts))}], '
            f'["{quoted.join(hashes)}"]]'
        )
    else:
        payload = json.dumps([list(names), counts, list(hashes)])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def resolve_files(paths: PathsLike, max_open_files: int | None = None) -> ResolvedFiles:
    """Finds, checks and identifies a source's files; opens only those no index describes.

    Record counts and content hashes come from the shard index `write_shards` writes beside a
    set, or from a TFDS `dataset_info.json` (`shardLengths`; TFDS stores no hash, so such a
    file's fingerprint part is its size); other files are opened once to count and hashed with
    `shard_index.content_hash`. Which files were opened, and why, is logged or warned. A whole
    set whose index records inodes is identified from one directory listing, with no stat per
    file (`listed_files`); each file is still checked against that identity when opened.
    """
    listings: Listings = {}
    found = _resolve_paths(paths, listings)
    absolute = [path if path.startswith(os.sep) else os.path.abspath(path) for path in found]
    names = [path.rpartition(os.sep)[2] for path in absolute]
    listed = identify_by_listing(absolute, listings)
    if listed is not None:
        identities, counts, hashes, index = listed
        return ResolvedFiles(
            paths=tuple(absolute),
            identities=tuple(identities),
            counts=tuple(counts),
            fingerprint=files_fingerprint(names, counts, hashes),
            index=index,
        )
    identities = stat_files(found)
    sizes, mtimes = [i[0] for i in identities], [i[1] for i in identities]
    lookup = shard_index.look_up(absolute, names, sizes, mtimes)
    counts, hashes = lookup.counts, lookup.hashes
    opened = [position for position, count in enumerate(counts) if count is None]
    for position in opened:
        path = absolute[position]
        reader = open_reader(path, identities[position], max_open_files)
        counts[position], hashes[position] = reader.num_records(), shard_index.content_hash(path)
        reader.close()
    if None in hashes:
        hashes = [content or f"size:{size}" for content, size in zip(hashes, sizes, strict=True)]
    stale = [
        f"{names[position]}: {why}; it has {counts[position]} records"
        for position, why in sorted(lookup.stale.items())
    ]
    _report_opened(absolute, [p for p in opened if p not in lookup.stale], stale)
    return ResolvedFiles(
        paths=tuple(absolute),
        identities=tuple(identities),
        counts=tuple(counts),
        fingerprint=files_fingerprint(names, counts, hashes),
        stale=tuple(stale),
    )


def _report_opened(paths: list[str], unindexed: list[int], stale: list[str]) -> None:
    if stale:
        shown = " | ".join(stale[:3])
        more = f" (and {len(stale) - 3} more)" if len(stale) > 3 else ""
        warnings.warn(
            f"{len(stale)} data file(s) differ from their shard index, so they were opened to "
            f"count and hash their records: {shown}{more}",
            stacklevel=4,
        )
    if unindexed:
        logger.info(
            "no shard index describes %d of %d data file(s) (e.g. %s): opened them to count and "
            "hash their records",
            len(unindexed),
            len(paths),
            paths[unindexed[0]],
        )


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
            paths = resolve_files(paths, max_open_files)
        self._resolved = paths
        self.paths = list(paths.paths)
        self.max_open_files = max_open_files
        self._files = ArrayRecordFiles(
            paths.paths, paths.counts, paths.identities, max_open_files, index=paths.index
        )
        total = sum(paths.counts)
        if total == 0:
            raise DataSourceError(f"the data files {self.paths} hold no records")
        self._decode = decode or records.decode
        super().__init__(config, records_per_epoch=int(total), fingerprint=paths.fingerprint)
        window = config.shuffle_window
        self._blocks = BlockCache(self._files, window) if window is not None else None

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
        super().close()
