"""Which files a source reads: paths, globs and lists of them resolved into files, each with its
record count and content hash (from the shard index, TFDS info, or by opening it), and the
fingerprint of the whole set.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Sequence

from resumax.errors import DataFileNotFoundError, DataSourceError
from resumax.records import shard_index, storage
from resumax.sources.files.listing import identify_by_listing
from resumax.sources.files.readers import FileIdentity, open_reader, stat_files

logger = logging.getLogger("resumax")

PathLike = str | bytes | os.PathLike
PathsLike = PathLike | Sequence[PathLike]

_GLOB_CHARACTERS = frozenset("*?[")
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
            pattern = storage.local_path(os.fsdecode(path))
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
