"""Remote sets: URL patterns listed through fsspec into objects with their sizes, and their record
counts and content hashes from the set's shard index (or TFDS `dataset_info.json`), with one
listing and one small GET per set: no shard is downloaded to build a source.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from typing import Any

from array_record.python import array_record_module

from resumax.errors import ConfigError, DataFileNotFoundError, DataSourceError
from resumax.records import shard_index, storage
from resumax.sources.files.resolve import ResolvedFiles, files_fingerprint
from resumax.sources.files.shard_cache import CacheSettings, RemoteShards, ShardCache, shard_path

logger = logging.getLogger("resumax")

_GLOB_CHARACTERS = frozenset("*?[")
DEFAULT_FETCH_THREADS = 8
DEFAULT_FETCH_TIMEOUT = 120.0
# Of the free disk space where the cache lives, the share a default cache_limit takes.
_DEFAULT_DISK_SHARE = 0.8
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: int | str, name: str = "cache_limit") -> int:
    """Bytes from an int or a string such as "20GB", "512MiB" or "1.5 TB"; ConfigError else."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(
            f"{name} must be a number of bytes > 0 or a string such as '20GB' or '512MiB', "
            f"got {value!r}"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def cache_settings(
    cache_dir: str | os.PathLike | None,
    cache_limit: int | str | None,
    fetch_threads: int | None,
    fetch_timeout: float | None,
) -> CacheSettings:
    """The cache a remote source uses: `cache_dir` (default `$RESUMAX_CACHE_DIR`, else
    `~/.cache/resumax`), `cache_limit` (default: 80% of the free disk space there), threads and
    timeout checked, ConfigError naming a bad value."""
    if cache_dir is None:
        cache_dir = os.environ.get("RESUMAX_CACHE_DIR") or os.path.join(
            os.path.expanduser("~"), ".cache", "resumax"
        )
    directory = os.path.abspath(os.path.expanduser(os.fsdecode(cache_dir)))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create cache_dir {directory!r}: {error}") from error
    if cache_limit is None:
        limit = int(shutil.disk_usage(directory).free * _DEFAULT_DISK_SHARE)
    else:
        limit = parse_bytes(cache_limit)
    threads = DEFAULT_FETCH_THREADS if fetch_threads is None else fetch_threads
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ConfigError(f"fetch_threads must be an int >= 1, got {fetch_threads!r}")
    timeout = DEFAULT_FETCH_TIMEOUT if fetch_timeout is None else fetch_timeout
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        raise ConfigError(f"fetch_timeout must be a number of seconds > 0, got {fetch_timeout!r}")
    return CacheSettings(directory, limit, threads, float(timeout))


@dataclasses.dataclass(frozen=True)
class RemoteFiles(ResolvedFiles):
    """Resolved files that live in a bucket: the objects, and the cache to read them through."""

    shards: RemoteShards | None = None
    settings: CacheSettings | None = None


def resolve_remote(
    patterns: Sequence[str], storage_options: dict[str, Any], settings: CacheSettings
) -> RemoteFiles:
    """A remote set's objects, record counts and fingerprint: from its index or TFDS info when it
    has one; otherwise each object is downloaded (through the cache) to count its records, and a
    log line says so and how to avoid it."""
    listing = list_remote(patterns, storage_options)
    missing = [position for position, count in enumerate(listing.counts) if count is None]
    if missing:
        _count_by_download(listing, missing, storage_options, settings)
    names = [url.rpartition("/")[2] for url in listing.urls]
    hashes = [
        content if content is not None else f"size:{size}"
        for content, size in zip(listing.hashes, listing.sizes, strict=True)
    ]
    counts = [int(count) for count in listing.counts]
    return RemoteFiles(
        paths=tuple(listing.urls),
        identities=tuple((size, 0, 0, 0) for size in listing.sizes),
        counts=tuple(counts),
        fingerprint=files_fingerprint(names, counts, hashes),
        shards=RemoteShards(
            tuple(listing.urls), tuple(listing.sizes), tuple(listing.hashes), storage_options
        ),
        settings=settings,
    )


def _count_by_download(
    listing: RemoteListing,
    missing: list[int],
    storage_options: dict[str, Any],
    settings: CacheSettings,
) -> None:
    names = [listing.urls[position].rpartition("/")[2] for position in missing]
    if any(shard_index.ShardName.parse(name) for name in names):
        advice = "`resumax index PATTERN` writes the index once"
    else:
        advice = (
            "`resumax index` indexes -NNNNN-of-MMMMM sets only: write the set with "
            "resumax.write_shards or `resumax convert` (shards and their index)"
        )
    logger.warning(
        "no shard index describes %d of %d object(s) (e.g. %s): downloading each to count its "
        "records. %s, so that later runs start without downloading",
        len(missing),
        len(listing.urls),
        listing.urls[missing[0]],
        advice,
    )
    shards = RemoteShards(
        tuple(listing.urls), tuple(listing.sizes), tuple(listing.hashes), storage_options
    )
    cache = ShardCache(shards, settings)
    for position in missing:
        path = cache.fetch(position)
        reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
        try:
            if not reader.ok():
                raise DataSourceError(
                    f"{listing.urls[position]!r} is not a valid ArrayRecord file (corrupt or "
                    "truncated)"
                )
            listing.counts[position] = reader.num_records()
        finally:
            reader.close()
        if listing.hashes[position] is None:
            listing.hashes[position] = shard_index.content_hash(path)
            # Keyed by content from now on, as indexed shards are.
            key = f"{listing.hashes[position]}-{listing.sizes[position]}"
            with contextlib.suppress(FileNotFoundError):  # evicted meanwhile: fetched again
                os.replace(path, shard_path(settings.directory, key))


@dataclasses.dataclass
class RemoteListing:
    """Objects of a remote set in read order, with what their index tells (None: unknown)."""

    urls: list[str]
    sizes: list[int]
    counts: list[int | None]
    hashes: list[str | None]


def list_remote(patterns: Sequence[str], storage_options: dict[str, Any]) -> RemoteListing:
    """Lists every URL or URL glob (sorted matches; whole `-of-N` sets only) and looks up each
    set's index. DataSourceError naming the URL or bucket on a failure."""
    urls: list[str] = []
    sizes: list[int] = []
    for pattern in patterns:
        found = _list_one(pattern, storage_options)
        urls.extend(found)
        sizes.extend(found.values())
    listing = RemoteListing(urls, sizes, [None] * len(urls), [None] * len(urls))
    for (directory, stem, _), members in shard_index.shard_sets(urls).items():
        _describe_set(listing, directory, stem, members, storage_options)
    return listing


def _list_one(pattern: str, storage_options: dict[str, Any]) -> dict[str, int]:
    """{url: size} of one URL, or of the sorted objects a glob matches (never index files)."""
    fs, path = storage.filesystem(pattern, storage_options)
    try:
        if _GLOB_CHARACTERS.intersection(path):
            details = fs.glob(path, detail=True)
            found = {
                fs.unstrip_protocol(name): int(info["size"])
                for name, info in sorted(details.items())
                if info.get("type") != "directory" and not shard_index.is_index_file(name)
            }
            if not found:
                bucket = storage.bucket_of(pattern)
                if not fs.exists(bucket):
                    raise DataFileNotFoundError(
                        f"cannot list {pattern!r}: the bucket {bucket!r} does not exist"
                    )
                raise DataFileNotFoundError(f"the glob {pattern!r} matches no object")
            shard_index.check_complete_sets(list(found), pattern)
            return found
        info = fs.info(path)
    except DataSourceError:
        raise
    except Exception as error:
        raise storage.storage_error(pattern, error, doing="list") from error
    if info.get("type") == "directory":
        raise DataSourceError(
            f"data URL {pattern!r} is a directory; pass objects or a glob such as "
            f"{pattern.rstrip('/')}/*.array_record"
        )
    if int(info["size"]) == 0:
        raise DataSourceError(f"data object {pattern!r} is empty (0 bytes)")
    return {fs.unstrip_protocol(path): int(info["size"])}


def _describe_set(
    listing: RemoteListing,
    directory: str,
    stem: str,
    members: list[tuple[int, shard_index.ShardName]],
    storage_options: dict[str, Any],
) -> None:
    """Fills the counts and hashes of one set's members from its index, else from TFDS info."""
    index_url = shard_index.index_path(f"{directory}/{stem}")
    payload = _read_json(index_url, storage_options)
    if payload is not None:
        try:
            payload = shard_index.check_index(payload)
        except shard_index.INDEX_ERRORS as error:
            raise DataSourceError(f"the shard index {index_url!r} cannot be used: {error}") from (
                error
            )
        rows = {name: row for row, name in enumerate(payload["names"])}
        for position, _ in members:
            name = listing.urls[position].rpartition("/")[2]
            row = rows.get(name)
            if row is None:
                raise DataSourceError(
                    f"the shard index {index_url!r} has no entry for {listing.urls[position]!r}; "
                    "run `resumax index` on the set or write it anew"
                )
            if payload["sizes"][row] != listing.sizes[position]:
                raise DataSourceError(
                    f"{listing.urls[position]!r} has {listing.sizes[position]} bytes where its "
                    f"shard index {index_url!r} says {payload['sizes'][row]}: the object changed "
                    "since the set was indexed; write the set anew or run `resumax index`"
                )
            listing.counts[position] = payload["num_records"][row]
            listing.hashes[position] = payload["content_hashes"][row]
        return
    info_url = f"{directory}/{shard_index.TFDS_INFO}"
    info = _read_json(info_url, storage_options)
    if info is None:
        return
    counts = shard_index.tfds_shard_lengths(info, stem)
    for position, shard in members:
        if counts is not None and len(counts) == shard.total:
            listing.counts[position] = int(counts[shard.index])


def _read_json(url: str, storage_options: dict[str, Any]) -> Any:
    """The JSON object at `url`, or None when there is no such object."""
    try:
        data = storage.read_bytes(url, storage_options)
    except DataFileNotFoundError:
        return None
    try:
        return json.loads(data)
    except ValueError as error:
        raise DataSourceError(f"{url!r} is not valid JSON: {error}") from error
