"""Apache Beam (the optional extra `resumax[beam]`): `WriteShards`, a PTransform that writes a
PCollection of `(global_index, record)` as a shard set with its index, and the Beam engine of
`resumax convert`. The files and index are byte-identical to the local engine's.

Shard k holds the records whose global index falls in `bounds[k]..bounds[k+1]-1` (the cut of
`write_shards`), in index order: no random keys, nothing depends on bundle boundaries or the
number of workers. Each shard is written by one worker under a fixed temporary name (a retried
bundle overwrites its own attempt); one final step writes the index and renames the set.
`WriteShards` groups each shard's records on one worker (which holds them in memory); the
engine instead has each worker read its shard's records from the input itself.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import zlib
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np

from resumax import errors
from resumax.convert import shards
from resumax.convert.formats import Reader
from resumax.convert.plan import Plan
from resumax.convert.stream import shard_records
from resumax.errors import DataSourceError, ResumaxError
from resumax.records import remote, shard_index, storage
from resumax.records.codec import encode
from resumax.records.writers import shard_paths


@functools.lru_cache(maxsize=16)
def _bounds(num_records: int, num_shards: int) -> np.ndarray:
    return np.linspace(0, num_records, num_shards + 1).astype(int)


def _encoded(pair: tuple[int, Any]) -> tuple[int, bytes]:
    index, record = pair
    return int(index), record if isinstance(record, bytes) else encode(record)


def _key_by_shard(
    pair: tuple[int, bytes], num_shards: int, num_records: int
) -> tuple[int, tuple[int, bytes]]:
    index = pair[0]
    if not 0 <= index < num_records:
        raise DataSourceError(
            f"WriteShards got the global index {index}, outside 0..{num_records - 1} (the "
            "indices must run over 0..N-1 for N records)"
        )
    shard = int(np.searchsorted(_bounds(num_records, num_shards), index, side="right")) - 1
    return shard, pair


def _write_shard(
    keyed: tuple[int, Iterable[tuple[int, bytes]]],
    prefix: str,
    num_shards: int,
    num_records: int,
    resume: bool,
) -> int:
    shard, pairs = keyed
    ordered = sorted(pairs, key=lambda pair: pair[0])
    start, stop = _bounds(num_records, num_shards)[shard : shard + 2]
    indices = [index for index, _ in ordered]
    if indices != list(range(start, stop)):
        wrong = next(
            (i for i, index in zip(range(start, stop), indices, strict=False) if i != index), stop
        )
        raise DataSourceError(
            f"WriteShards: shard {shard} must hold the global indices {start}..{stop - 1} once "
            f"each, but index {wrong} is missing or repeated ({len(indices)} records)"
        )
    shards.write_shard(prefix, shard, num_shards, (data for _, data in ordered), resume)
    return shard


def _commit(
    written: list[int],
    prefix: str,
    num_shards: int,
    num_records: int,
    metadata: dict | None,
    resume: bool,
) -> list[str]:
    bounds = _bounds(num_records, num_shards)
    for shard in sorted(set(range(num_shards)) - set(written)):
        if bounds[shard + 1] > bounds[shard]:
            raise DataSourceError(f"WriteShards: shard {shard} of {prefix!r} was not written")
        shards.write_shard(prefix, shard, num_shards, [], resume)  # empty: nothing grouped
    return shards.commit(prefix, num_shards, metadata)


class WriteShards(beam.PTransform):
    """Writes a PCollection of `(global_index, record)` pairs as the shard set
    `prefix-NNNNN-of-MMMMM.array_record` with its index `prefix.index.json`.

    Args:
      prefix: the output prefix, on a filesystem every worker and the final step share.
      num_shards: the number of shards; the records are cut as `write_shards` cuts them.
      num_records: N, when known; otherwise the pairs are counted in the pipeline.
      metadata: JSON values to put into the index (`resumax convert` records its sources).
      resume: keep the shards an earlier attempt completed with the same records.

    `global_index` must run over 0..N-1, each once; a record is a dict (encoded with
    `resumax.records.encode`) or bytes already encoded. The output PCollection holds the list
    of shard paths, once the set is committed.
    """

    def __init__(
        self,
        prefix: str,
        num_shards: int,
        *,
        num_records: int | None = None,
        metadata: dict | None = None,
        resume: bool = False,
    ):
        super().__init__()
        if not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
        self.prefix = str(prefix)
        self.num_shards = num_shards
        self.num_records = num_records
        self.metadata = metadata
        self.resume = resume

    def expand(self, pairs: beam.PCollection) -> beam.PCollection:
        encoded = pairs | "Encode" >> beam.Map(_encoded)
        total: Any = self.num_records
        if total is None:
            total = beam.pvalue.AsSingleton(encoded | "Count" >> beam.combiners.Count.Globally())
        written = (
            encoded
            | "KeyByShard" >> beam.Map(_key_by_shard, self.num_shards, total)
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard"
            >> beam.Map(_write_shard, self.prefix, self.num_shards, total, self.resume)
        )
        return (
            written
            | "Written" >> beam.combiners.ToList()
            | "Commit"
            >> beam.Map(_commit, self.prefix, self.num_shards, total, self.metadata, self.resume)
        )


class _PlanSummary(NamedTuple):
    """What the commit needs of a plan."""

    num_shards: int
    num_records: int
    metadata: dict[str, Any]


def _task(shard: int, reads: Sequence[tuple[str, int, int, int]]) -> bytes:
    """A worker's task: the shard number and its `Plan.shard_reads`, as compressed JSON."""
    plain = [[unit, int(start), int(stop), int(good)] for unit, start, stop, good in reads]
    return zlib.compress(json.dumps([shard, plain]).encode(), 1)


def _write_planned_shard(
    task: bytes,
    reader: Reader,
    num_shards: int,
    prefix: str,
    resume: bool,
    storage_options: storage.StorageOptions,
) -> tuple[int, dict | None]:
    """Writes the shard of a `_task`; to a URL prefix, into this worker's staging directory,
    then uploads it. Returns (shard, its `.done` record for a URL, else None)."""
    shard, reads = json.loads(zlib.decompress(task))
    reader.prepare()
    records = shard_records(reader, reads)
    if not storage.is_url(prefix):
        shards.write_shard(prefix, shard, num_shards, records, resume)
        return shard, None
    local = shards.staging_prefix(prefix)
    shards.write_shard(local, shard, num_shards, records, resume)
    written = shard_paths(local, num_shards)[shard] + shards.PARTIAL
    remote.upload_file(written, shard_paths(prefix, num_shards)[shard], storage_options)
    return shard, shards.done_record(local, shard, num_shards)


def _commit_planned(
    written: list[tuple[int, dict | None]],
    prefix: str,
    summary: _PlanSummary,
    resume: bool,
    storage_options: storage.StorageOptions,
) -> list[str]:
    if not storage.is_url(prefix):
        numbers = [shard for shard, _ in written]
        return _commit(
            numbers, prefix, summary.num_shards, summary.num_records, summary.metadata, resume
        )
    urls = shard_paths(prefix, summary.num_shards)
    done = dict(written)
    fs, first_key = storage.filesystem(urls[0], storage_options)
    directory = first_key.rpartition("/")[0]
    fs.invalidate_cache(directory)
    listed = {info["name"].rstrip("/"): info for info in fs.ls(directory, detail=True)}
    entries = []
    for shard, url in enumerate(urls):
        info = listed.get(storage.filesystem(url, storage_options)[1])
        record = done[shard]
        if info is None or info.get("size") != record["bytes"]:
            raise DataSourceError(
                f"{url!r} was uploaded with {record['bytes']} bytes but the bucket lists "
                f"{info and info.get('size')}: did another writer replace it? Convert again"
            )
        name = url.rpartition("/")[2]
        mtime = remote.object_mtime_ns(info)
        entries.append((name, record["records"], record["bytes"], mtime, record["content_hash"]))
    remote.upload_index(entries, shard_index.index_path(prefix), storage_options, summary.metadata)
    shutil.rmtree(os.path.dirname(shards.staging_prefix(prefix)), ignore_errors=True)
    return urls


def write_beam(
    reader: Reader,
    plan: Plan,
    prefix: str,
    resume: bool,
    pipeline_options: list[str],
    storage_options: storage.StorageOptions = None,
) -> list[str]:
    """Runs the plan on Beam with `pipeline_options` (command-line style); returns the paths.

    The plan gives each shard's records as parts of units (`Plan.shard_reads`), so each shard
    is read and written by one worker and no record crosses a process boundary; the commit is
    `WriteShards`'. To a URL prefix, each worker writes its shards locally and uploads them,
    and the final step uploads the index (the bucket's old index is deleted first, so it never
    describes a mix of old and new shards).
    """
    from apache_beam.options.pipeline_options import PipelineOptions

    if storage.is_url(prefix):
        index_url = shard_index.index_path(prefix)
        fs, index_key = storage.filesystem(index_url, storage_options)
        try:
            fs.rm_file(index_key)
        except FileNotFoundError:
            pass
        except Exception as error:
            raise remote.write_error(index_url, error) from error
    # Each worker gets its shards' parts of the inputs, not the plan: the plan of many small
    # inputs (an image folder) is large, and Beam would pickle and bz2 it in every step that
    # takes it. Each task is bytes, as Beam would infer the type of every value in a list.
    num_shards, options = plan.num_shards, storage_options
    tasks = [_task(shard, plan.shard_reads(shard)) for shard in range(num_shards)]
    summary = _PlanSummary(num_shards, plan.num_records, plan.metadata)
    try:
        with beam.Pipeline(options=PipelineOptions(pipeline_options)) as pipeline:
            _ = (
                pipeline
                # Create spreads its elements over the workers (it ends with a Reshuffle).
                | "Shards" >> beam.Create(tasks)
                | "WriteShard"
                >> beam.Map(_write_planned_shard, reader, num_shards, prefix, resume, options)
                | "Written" >> beam.combiners.ToList()
                | "Commit" >> beam.Map(_commit_planned, prefix, summary, resume, options)
            )
    except Exception as error:
        cause = worker_error(error)
        if cause is None:  # not bad input: the written shards stay, for --resume
            raise
        staged = shards.staging_prefix(prefix) if storage.is_url(prefix) else prefix
        shards.discard(staged, plan.num_shards)
        if cause is error:
            raise
        raise cause from error
    return shard_paths(prefix, plan.num_shards)


_REPORTED = re.compile(r"^resumax\.errors\.(\w+): (.+)$", re.MULTILINE)


def worker_error(error: Exception) -> ResumaxError | None:
    """The resumax error that failed a pipeline, or None when another error did: `error` itself
    (in-process runners re-raise it), or one rebuilt from the last worker traceback the
    runner quotes in its message (worker threads or processes, remote runners)."""
    if isinstance(error, ResumaxError):
        return error
    reported = _REPORTED.findall(str(error))
    if not reported:
        return None
    name, message = reported[-1]
    error_type = getattr(errors, name, None)
    if not (isinstance(error_type, type) and issubclass(error_type, ResumaxError)):
        return None
    return error_type(message)
