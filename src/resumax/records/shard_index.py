"""Shard sets and their index: `-NNNNN-of-MMMMM` completeness, per-file content hashes, and the
small JSON index `write_shards` puts beside a set so that a source learns it without opening files.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from resumax.errors import DataSourceError

INDEX_SUFFIX = ".index.json"
INDEX_FORMAT = "resumax-shard-index"
INDEX_VERSION = 1
TFDS_INFO = "dataset_info.json"

logger = logging.getLogger("resumax")

# `train-00001-of-00003.array_record` (write_shards) and `mnist-train.array_record-00001-of-00003`
# (TFDS): a stem, the shard number, the shard count and an optional extension.
# Matched from the name's end only: a pattern with a leading `.+` backtracks over every name.
_SHARD_TAIL = re.compile(r"-(\d+)-of-(\d+)((?:\.\w+)*)$")
# Bytes of a file that `content_hash` reads: its head, its tail (the ArrayRecord footer, which
# lists every chunk's offset, and the postscript) and evenly spaced samples in between.
_HEAD, _TAIL, _SAMPLE, _SAMPLES = 64 * 1024, 128 * 1024, 4 * 1024, 16


class ShardName(NamedTuple):
    """A file name split as `<stem>-<index>-of-<total><suffix>`."""

    stem: str
    index: int
    total: int
    width: int
    suffix: str

    @staticmethod
    def parse(name: str) -> ShardName | None:
        return _parse_shard_name(name)

    def sibling(self, index: int) -> str:
        """The name of shard `index` of the same set."""
        return f"{self.stem}-{index:0{self.width}d}-of-{self.total:0{self.width}d}{self.suffix}"


# Cached: a glob's completeness check and the index lookup parse the same names.
@functools.lru_cache(maxsize=1 << 17)
def _parse_shard_name(name: str) -> ShardName | None:
    match = _SHARD_TAIL.search(name)
    if match is None or match.start() == 0:
        return None
    index, total, suffix = match.groups()
    return ShardName(name[: match.start()], int(index), int(total), len(index), suffix)


# (directory, stem, suffix) -> the (position in the path list, parsed name) of its files.
ShardSets = dict[tuple[str, str, str], list[tuple[int, ShardName]]]


def shard_sets(paths: Sequence[str]) -> ShardSets:
    """The files of `paths` named `<stem>-NNNNN-of-MMMMM<suffix>`, grouped by directory, stem and
    suffix."""
    sets: ShardSets = {}
    for position, path in enumerate(paths):
        directory, _, name = path.rpartition(os.sep)
        shard = ShardName.parse(name)
        if shard is not None:
            sets.setdefault((directory, shard.stem, shard.suffix), []).append((position, shard))
    return sets


def complete_set(paths: Sequence[str]) -> ShardName | None:
    """The parsed name of `paths[0]` when `paths` are exactly shards 0..M-1 of one set in shard
    order (a sorted glob over a whole set, the common case), else None.

    Compares all names at once as one byte matrix (well under a microsecond a file, where
    parsing every name costs microseconds).
    """
    if not paths:
        return None
    first = paths[0]
    name = first.rpartition(os.sep)[2]
    shard = ShardName.parse(name)
    if shard is None or shard.index != 0 or shard.total != len(paths) or shard.sibling(0) != name:
        return None
    if len(set(map(len, paths))) != 1:
        return None
    joined = "".join(paths).encode()
    if len(joined) != len(first) * len(paths):
        return None  # non-ASCII names: not worth a fast path
    matrix = np.frombuffer(joined, np.uint8).reshape(len(paths), len(first))
    start = len(first) - len(name) + len(shard.stem) + 1
    stop = start + shard.width
    digits = matrix[:, start:stop].astype(np.int64) - ord("0")
    numbers = digits @ (10 ** np.arange(shard.width - 1, -1, -1, dtype=np.int64))
    same = (matrix[:, :start] == matrix[0, :start]).all() and (
        matrix[:, stop:] == matrix[0, stop:]
    ).all()
    in_order = ((digits >= 0) & (digits <= 9)).all() and (numbers == np.arange(len(paths))).all()
    return shard if same and in_order else None


def is_index_file(path: str) -> bool:
    """True for a shard index; globs over a data directory skip these."""
    return path.endswith(INDEX_SUFFIX)


def index_path(stem_path: str) -> str:
    """Where the index of the shard set `<stem_path>-NNNNN-of-MMMMM...` lives."""
    return f"{stem_path}{INDEX_SUFFIX}"


def check_complete_sets(paths: Sequence[str], pattern: str) -> None:
    """Raises DataSourceError when the files a glob `pattern` matched hold only part of a
    `-NNNNN-of-MMMMM` shard set.

    A set is the files of one directory with the same stem and extension; it must hold every
    shard 0..M-1 of a single M, so that an interrupted write or a too narrow glob is never
    read as if it were the whole dataset.
    """
    if complete_set(paths) is not None:
        return
    for (directory, stem, suffix), members in shard_sets(paths).items():
        where = os.path.join(directory, f"{stem}-*-of-*{suffix}")
        totals = sorted({shard.total for _, shard in members})
        if len(totals) > 1:
            raise DataSourceError(
                f"the glob {pattern!r} mixes shard sets {where!r} of {totals} shards; "
                "remove the stale set or use a glob that matches one set"
            )
        present = {shard.index for _, shard in members}
        shard = members[0][1]
        missing = [index for index in range(shard.total) if index not in present]
        if missing:
            names = [shard.sibling(index) for index in missing[:5]]
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DataSourceError(
                f"the glob {pattern!r} matches an incomplete shard set: {len(present)} of "
                f"{shard.total} shards of {where!r}; missing {names}{more} in "
                f"{directory or '.'!r}. An interrupted write or a narrow glob leaves such a set: "
                "write the set again, widen the glob, or list the files you mean one by one"
            )


def content_hash(path: str) -> str:
    """A SHA-256 of a file's size, head, tail (ArrayRecord footer) and 16 samples in between.

    Reads at most 256 KiB whatever the file size (files up to that size are hashed whole), so
    it is cheap, yet a file re-encoded or regenerated with other records changes it: the footer
    holds every record chunk's offset. A change confined to unsampled middle bytes that keeps
    every record size is not seen.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        digest.update(size.to_bytes(8, "little"))
        if size <= _HEAD + _TAIL + _SAMPLES * _SAMPLE:
            digest.update(file.read())
        else:
            digest.update(file.read(_HEAD))
            span = size - _HEAD - _TAIL - _SAMPLE
            for sample in range(_SAMPLES):
                file.seek(_HEAD + span * sample // (_SAMPLES - 1))
                digest.update(file.read(_SAMPLE))
            file.seek(size - _TAIL)
            digest.update(file.read(_TAIL))
    return digest.hexdigest()[:32]


def index_entry(path: str, name: str, num_records: int) -> tuple[str, int, int, int, str, int]:
    """(name, record count, size, mtime_ns, content hash, inode) of one written shard (`path` may
    be its `.partial` file: a rename keeps size, mtime and inode)."""
    stat = os.stat(path)
    return name, int(num_records), stat.st_size, stat.st_mtime_ns, content_hash(path), stat.st_ino


_COLUMNS = ("names", "num_records", "sizes", "mtime_ns", "content_hashes")
# Optional: indexes written before it lack it, and a source then stats every file.
INODES = "inodes"


def write_index(path: str, entries: Sequence[tuple], metadata: dict | None = None) -> None:
    """Writes an index file at `path`: JSON with one list per column (fast to load for 10^5
    shards), in the order of `index_entry`'s fields (the inodes only when every entry has one),
    then `metadata` (JSON values describing the set, e.g. what `resumax convert` read), if any."""
    payload: dict = {"format": INDEX_FORMAT, "version": INDEX_VERSION}
    columns = (*_COLUMNS, INODES) if all(len(e) > len(_COLUMNS) for e in entries) else _COLUMNS
    for position, column in enumerate(columns):
        payload[column] = [entry[position] for entry in entries]
    if metadata is not None:
        payload["metadata"] = metadata
    with open(path, "w") as file:
        json.dump(payload, file, separators=(",", ":"))


# What reading an index may raise when it is missing, malformed or not one.
INDEX_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError)


def read_index(path: str) -> dict:
    """The shard index at `path`, checked to be one: its format and version, columns of one
    length and record counts that are ints >= 0 (the optional inodes column is not checked).
    Raises one of INDEX_ERRORS, saying why, otherwise."""
    with open(path) as file:
        return check_index(json.load(file))


def check_index(payload: dict) -> dict:
    """`payload` if it is a shard index (`read_index`'s checks), else one of INDEX_ERRORS."""
    if payload.get("format") != INDEX_FORMAT or payload.get("version") != INDEX_VERSION:
        raise ValueError(f"not a {INDEX_FORMAT} version {INDEX_VERSION}")
    if len({len(payload[column]) for column in _COLUMNS}) != 1:
        raise ValueError("its columns differ in length")
    if not all(type(count) is int and count >= 0 for count in payload["num_records"]):
        raise ValueError("its record counts must be ints >= 0")
    return payload


@dataclasses.dataclass
class Lookup:
    """Per position in the path list, what is known without opening the file, and why the rest
    must be opened."""

    # Record counts; None: unknown, the file must be opened to count it.
    counts: list[int | None]
    # Content hashes; None where unknown or where TFDS gave the count (it stores no hash).
    hashes: list[str | None]
    # position -> why its index entry cannot be used (it differs from the file).
    stale: dict[int, str] = dataclasses.field(default_factory=dict)


# The members of one shard set: their positions in the path list, and each one's parsed name, or
# None when the positions are the whole list in shard order (shard k at position k).
_Members = tuple[Sequence[int], Sequence[ShardName] | None]


def look_up(
    paths: Sequence[str], names: Sequence[str], sizes: Sequence[int], mtimes: Sequence[int]
) -> Lookup:
    """Record counts and content hashes of files that a shard index or TFDS info describes.

    `names`, `sizes` and `mtimes` are the files' base names, sizes and modification times (ns).
    A file is taken from an index when its name, size and modification time match its entry,
    or when only the time differs (a copy) and its `content_hash` is the entry's: the file is
    then read, but not opened as ArrayRecord. A TFDS `dataset_info.json` gives the count when
    the split's `shardLengths` has one count per shard.
    """
    lookup = Lookup(counts=[None] * len(paths), hashes=[None] * len(paths))
    shard = complete_set(paths)
    if shard is not None:
        directory = paths[0].rpartition(os.sep)[0]
        sets = {(directory, shard.stem, shard.suffix): (range(len(paths)), None)}
    else:
        sets = {
            key: ([position for position, _ in members], [shard for _, shard in members])
            for key, members in shard_sets(paths).items()
        }
    for (directory, stem, _), members in sets.items():
        stem_path = os.path.join(directory, stem)
        if os.path.exists(index_path(stem_path)):
            _from_index(index_path(stem_path), members, paths, (names, sizes, mtimes), lookup)
        elif os.path.exists(os.path.join(directory, TFDS_INFO)):
            _from_tfds_info(os.path.join(directory, TFDS_INFO), stem, members, lookup)
    return lookup


def _from_index(
    path: str,
    members: _Members,
    file_paths: Sequence[str],
    files: tuple[Sequence[str], Sequence[int], Sequence[int]],
    lookup: Lookup,
) -> None:
    positions, _ = members
    try:
        payload = read_index(path)
    except INDEX_ERRORS as error:
        for position in positions:
            lookup.stale[position] = f"the shard index {path!r} cannot be read ({error})"
        return
    index_names, counts, sizes, mtimes, hashes = (payload[column] for column in _COLUMNS)
    if isinstance(positions, range) and len(positions) == len(files[0]):
        names, found_sizes, found_mtimes = files
    else:
        names, found_sizes, found_mtimes = ([column[p] for p in positions] for column in files)
    if index_names == names and sizes == found_sizes and mtimes == found_mtimes:
        # Every file as indexed, in index order: whole columns at once.
        if isinstance(positions, range):
            lookup.counts[positions.start : positions.stop] = counts
            lookup.hashes[positions.start : positions.stop] = hashes
        else:
            for position, count, content in zip(positions, counts, hashes, strict=True):
                lookup.counts[position], lookup.hashes[position] = count, content
        return
    rows = {name: row for row, name in enumerate(index_names)}
    copies = 0
    for position, name, size, mtime_ns in zip(
        positions, names, found_sizes, found_mtimes, strict=True
    ):
        row = rows.get(name)
        if row is None:
            lookup.stale[position] = f"{path!r} has no entry for it"
        elif sizes[row] == size and (
            mtimes[row] == mtime_ns or _same_content(file_paths[position], hashes[row])
        ):
            copies += mtimes[row] != mtime_ns
            lookup.counts[position], lookup.hashes[position] = counts[row], hashes[row]
        else:
            lookup.stale[position] = (
                f"it has {size} bytes, modified at {mtime_ns} ns, where {path!r} says "
                f"{sizes[row]} bytes at {mtimes[row]} ns ({counts[row]} records)"
            )
    if copies:
        logger.info(
            "%d file(s) have other modification times than %s records (copies?): their "
            "contents match its hashes, so its record counts are used",
            copies,
            path,
        )


def _same_content(path: str, indexed_hash: object) -> bool:
    """Whether the file at `path` has the content hash its index entry records."""
    try:
        return content_hash(path) == indexed_hash
    except OSError:
        return False


def _from_tfds_info(path: str, stem: str, members: _Members, lookup: Lookup) -> None:
    try:
        with open(path) as file:
            info = json.load(file)
    except (OSError, ValueError) as error:
        logger.info("cannot use %s (%s): opening the files", path, error)
        return
    shard_lengths = tfds_shard_lengths(info, stem)
    positions, shards = members
    for offset, position in enumerate(positions):
        index, total = (offset, len(positions)) if shards is None else shards[offset][1:3]
        if shard_lengths is None or len(shard_lengths) != total:
            lookup.stale[position] = f"{path!r} lists no {total} shard lengths for {stem!r}"
        else:
            lookup.counts[position] = int(shard_lengths[index])


def tfds_shard_lengths(info: object, stem: str) -> list | None:
    """The `shardLengths` a TFDS `dataset_info.json` (parsed) gives the files named `stem`
    (`<name>-<split>.array_record`), or None."""
    try:
        lengths = {
            f"{info['name']}-{split['name']}.array_record": split.get("shardLengths")
            for split in info.get("splits", [])
        }
    except (KeyError, TypeError, AttributeError) as error:
        logger.info("cannot use dataset_info.json (%s): opening the files", error)
        return None
    return lengths.get(stem)
