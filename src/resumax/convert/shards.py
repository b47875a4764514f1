"""One shard written atomically and resumably, and a shard set committed with its index: the
code both engines share, so that their files and index are byte-identical.

A shard is written to the fixed name `<shard>.partial` (a retried writer overwrites its own
attempt), then its record count and a SHA-256 of its encoded records go into `<shard>.done`.
On resume a shard whose `.done` record matches both the file (content hash, size) and the
records this conversion would write is kept. The commit writes the index `.partial`, removes
the old index, renames the shards, then the index, and removes the `.done` records.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

from resumax.errors import ConfigError, DataSourceError
from resumax.records import shard_index
from resumax.records.writers import shard_paths, write_array_record

PARTIAL, DONE = ".partial", ".done"


def _digested(records: Iterable[bytes], digest: Any) -> Iterator[bytes]:
    for record in records:
        digest.update(len(record).to_bytes(8, "little"))
        digest.update(record)
        yield record


def staging_prefix(url: str) -> str:
    """The local prefix a URL's shards are written at before their upload: a directory named
    after the URL, so that a resumed attempt on this machine finds the interrupted one's."""
    stem = url.rpartition("/")[2]
    if not stem:
        raise ConfigError(f"the prefix {url!r} must end with a file name stem, e.g. .../train")
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"resumax-convert-{digest}", stem)


def done_record(prefix: str, shard: int, num_shards: int) -> dict[str, Any]:
    """The `.done` record of a written shard: records, records_sha256, bytes, content_hash."""
    with open(shard_paths(prefix, num_shards)[shard] + DONE) as file:
        return json.load(file)


def _written(final: str) -> tuple[str, dict] | None:
    """(the file, its `.done` record) of a shard written before, if both are whole and agree."""
    try:
        with open(final + DONE) as file:
            done = json.load(file)
    except (OSError, ValueError):
        return None
    for path in (final + PARTIAL, final):
        with contextlib.suppress(OSError):
            if os.path.getsize(path) == done.get("bytes") and (
                shard_index.content_hash(path) == done.get("content_hash")
            ):
                return path, done
    return None


def write_shard(
    prefix: str, shard: int, num_shards: int, records: Iterable[bytes], resume: bool = False
) -> int:
    """Writes the encoded `records` as shard `shard` of `num_shards` (to its `.partial` name);
    returns their count. With `resume`, a shard an earlier attempt completed with the same
    records is kept (the records are only hashed); one with other records is a DataSourceError."""
    final = shard_paths(prefix, num_shards)[shard]
    digest = hashlib.sha256()
    written = _written(final) if resume else None
    if written is not None:
        count = sum(1 for _ in _digested(records, digest))
        done = written[1]
        if done.get("records") == count and done.get("records_sha256") == digest.hexdigest():
            return count
        raise DataSourceError(
            f"--resume: {written[0]!r}, written by an earlier attempt, holds other records than "
            "this conversion writes (did the input or the options change?); convert again "
            "without --resume"
        )
    with contextlib.suppress(FileNotFoundError):
        os.remove(final + DONE)
    partial = final + PARTIAL
    count = write_array_record(partial, _digested(records, digest), group_size=1)
    done = {
        "records": count,
        "records_sha256": digest.hexdigest(),
        "bytes": os.path.getsize(partial),
        "content_hash": shard_index.content_hash(partial),
    }
    with open(final + DONE + PARTIAL, "w") as file:
        json.dump(done, file)
    os.replace(final + DONE + PARTIAL, final + DONE)
    return count


def commit(prefix: str, num_shards: int, metadata: dict[str, Any] | None) -> list[str]:
    """Publishes the written shards of `prefix` and their index (with `metadata`); returns the
    shard paths. DataSourceError names a shard that was not written."""
    finals = shard_paths(prefix, num_shards)
    entries = []
    for final in finals:
        written = _written(final)
        if written is None:
            raise DataSourceError(f"cannot commit {prefix!r}: {final!r} was not written whole")
        path, done = written
        entries.append(shard_index.index_entry(path, os.path.basename(final), done["records"]))
    index = shard_index.index_path(prefix)
    shard_index.write_index(index + PARTIAL, entries, metadata=metadata)
    # A set caught half renamed has no index yet, so nothing describes it as complete.
    with contextlib.suppress(FileNotFoundError):
        os.remove(index)
    for final in finals:
        if os.path.exists(final + PARTIAL):
            os.replace(final + PARTIAL, final)
    os.replace(index + PARTIAL, index)
    for final in finals:
        with contextlib.suppress(FileNotFoundError):
            os.remove(final + DONE)
    return finals


def discard(prefix: str, num_shards: int) -> None:
    """Removes the `.partial` shards and `.done` records of an attempt that failed on bad
    input (an interrupted attempt keeps them, for --resume), and the file of a shard a stopped
    worker was writing."""
    for final in shard_paths(prefix, num_shards):
        for path in (
            final + PARTIAL,
            final + PARTIAL + PARTIAL,
            final + DONE,
            final + DONE + PARTIAL,
        ):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
