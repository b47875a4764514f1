"""The local engine: one process reads the units in order and writes the shards one after
another, with a progress bar of records/s and the time left."""

from __future__ import annotations

import itertools
import sys

from resumax.convert import shards
from resumax.convert.formats import Reader
from resumax.convert.plan import Plan
from resumax.convert.stream import BadLimit, good_records
from resumax.errors import DataSourceError, ResumaxError


def progress_bar(total: int | None, description: str, enabled: bool):
    """A tqdm bar on stderr (records/s and ETA), or None when not `enabled`."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit=" records", file=sys.stderr, smoothing=0.1)


def write_local(reader: Reader, plan: Plan, prefix: str, resume: bool, progress: bool) -> list[str]:
    """Writes the plan's shards at `prefix` and commits them with their index; returns the
    shard paths. Bad input removes the attempt's partial files; an interruption keeps them for
    `resume`."""
    bar = progress_bar(sum(plan.counts), "convert", progress)
    records = good_records(
        reader, list(plan.units), BadLimit(reader.options.skip_bad), bar.update if bar else None
    )
    bounds = plan.bounds()
    try:
        for shard in range(plan.num_shards):
            expected = int(bounds[shard + 1] - bounds[shard])
            chunk = itertools.islice(records, expected)
            count = shards.write_shard(prefix, shard, plan.num_shards, chunk, resume)
            if count != expected:
                raise DataSourceError(
                    f"the inputs held {plan.num_records} records when counted, but fewer when "
                    "read: did they change during the conversion?"
                )
        if next(records, None) is not None:
            raise DataSourceError(
                f"the inputs held {plan.num_records} records when counted, but more when read: "
                "did they change during the conversion?"
            )
        return shards.commit(prefix, plan.num_shards, plan.metadata)
    except ResumaxError:
        shards.discard(prefix, plan.num_shards)
        raise
    finally:
        if bar is not None:
            bar.close()
