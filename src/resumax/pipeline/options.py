"""The pipeline's options turned into what it runs with: the seed of its `rngs`, this process's
slice of the global batches, and how many spans go to a worker at once.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from resumax.errors import ConfigError
from resumax.workers.pool import TASKS_PER_WORKER

# Positions per message to a worker: each message costs ~0.2 ms of CPU (both processes).
TASK_RECORDS = 1024


def seed_from_rngs(rngs: nnx.Rngs | int | None) -> int:
    """An integer seed from an `nnx.Rngs` (its default stream's key), an int, or None (0).

    The key is read, not split: the pipeline consumes no randomness from the caller's Rngs.
    """
    if rngs is None:
        return 0
    if isinstance(rngs, int) and not isinstance(rngs, bool):
        if rngs < 0:
            raise ConfigError(f"rngs seed must be >= 0, got {rngs}")
        return rngs
    if isinstance(rngs, nnx.Rngs):
        streams = {n: s for n, s in vars(rngs).items() if isinstance(s, nnx.RngStream)}
        stream = streams.get("default") or streams[min(streams)]
        words = np.asarray(jax.random.key_data(stream.key.get_value())).astype(np.uint64)
        return int(words[0]) << 32 | int(words[1])
    raise ConfigError(f"rngs must be an nnx.Rngs, an int or None, got {rngs!r}")


def process_shard(
    shard_by_process: bool, process_index: int | None, process_count: int | None
) -> tuple[int, int]:
    """(this process's index, number of processes) the global batches are split over."""
    if not shard_by_process:
        return 0, 1
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    for name, value in (("process_index", index), ("process_count", count)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{name} must be an int, got {name}={value!r}")
    if not 0 <= index < count:
        raise ConfigError(
            f"process_index must be in [0, process_count), got process_index={index}, "
            f"process_count={count}"
        )
    return index, count


def worker_group_size(
    batch_size: int,
    span: int,
    *,
    grouped: bool,
    prefetch: int,
    num_workers: int,
    read_ahead_limit: int | None,
) -> int:
    """Spans per message to a worker. Without per-record stages (`grouped`), about
    TASK_RECORDS positions (a stage's span, or a window, goes alone, so that a slow or stuck
    stage never holds back the batches before it); fewer when the source can read only
    `read_ahead_limit` positions ahead (a remote source's cache). `span`: the positions one
    span covers (a global batch, or a packing window). ConfigError when even prefetch alone
    reads too far ahead."""
    max_group = -(-TASK_RECORDS // batch_size) if grouped else 1
    if read_ahead_limit is None:
        return max_group
    ahead = (prefetch + 2) * span
    groups = num_workers * TASKS_PER_WORKER
    if ahead + groups * span > read_ahead_limit:
        raise ConfigError(
            f"the source's cache_limit holds the shards of {read_ahead_limit} positions, but "
            f"this pipeline reads up to {ahead + groups * span} positions ahead ({span} "
            f"positions per span, prefetch {prefetch}, num_workers {num_workers}); raise "
            "cache_limit, or lower shuffle_window, batch_size, prefetch or num_workers"
        )
    return max(1, min(max_group, (read_ahead_limit - ahead) // max(1, groups * span)))
