"""How long `mngr.save()` blocks the training thread for the data item, for a small and a large set.

The data item's blocking share is the state snapshot (`get_state` + `json.dumps`) plus starting
the commit future that writes the file; both should not depend on the dataset size.

    python benchmarks/checkpoint_save.py [--small 1000] [--large 1000000] [--repeats 200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import orbax.checkpoint as ocp

import resumax
from resumax.checkpoint import CheckpointSave, DataStateHandler, snapshot

WARMUP = 10


def build_pipeline(directory: Path, num_records: int) -> resumax.Pipeline:
    """A shuffled pipeline over `num_records` records, positioned mid-epoch of epoch 3."""
    # The state holds a few integers whatever the records hold: one encoded record, repeated,
    # writes a million-record dataset in seconds.
    record = resumax.encode({"id": 0, "pixels": bytes(64)})
    resumax.write_shards(directory / "train", (record for _ in range(num_records)), num_shards=4)
    config = resumax.ArrayRecordSourceConfig(seed=42, shuffle_files=True)
    source = resumax.ArrayRecordSourceModule(config, directory / "train-*.array_record")
    pipeline = resumax.Pipeline(source, batch_size=32)
    source.seek(3, num_records // 2)
    next(iter(pipeline))
    return pipeline


def snapshot_seconds(pipeline: resumax.Pipeline) -> float:
    start = time.perf_counter()
    snapshot(pipeline)
    return time.perf_counter() - start


async def _nothing() -> None:
    pass


def commit_future_seconds() -> float:
    """Orbax's own price of a background write, which its JsonCheckpointHandler pays too."""
    start = time.perf_counter()
    future = ocp.future.CommitFutureAwaitingContractedSignals(_nothing())
    elapsed = time.perf_counter() - start
    future.result()
    return elapsed


def handler_seconds(
    pipeline: resumax.Pipeline, directory: Path, loop: asyncio.AbstractEventLoop
) -> float:
    """The blocking part of the handler's `async_save`; the file is written afterwards."""
    item_dir = Path(tempfile.mkdtemp(dir=directory))
    handler = DataStateHandler()
    start = time.perf_counter()
    futures = loop.run_until_complete(handler.async_save(item_dir, CheckpointSave(pipeline)))
    elapsed = time.perf_counter() - start
    for future in futures:
        future.result()
    return elapsed


def manager_seconds(pipeline: resumax.Pipeline, mngr: ocp.CheckpointManager, step: int) -> float:
    """The blocking part of a whole `mngr.save` whose only item is the data position."""
    start = time.perf_counter()
    mngr.save(step, args=ocp.args.Composite(data=CheckpointSave(pipeline)))
    elapsed = time.perf_counter() - start
    mngr.wait_until_finished()
    return elapsed


def measure(sizes: list[int], repeats: int, workdir: Path) -> dict[int, dict[str, float]]:
    """Median µs per dataset size and measurement.

    Sizes alternate within each round, so drift in the machine's load affects them alike.
    """
    pipelines, managers = {}, {}
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True, max_to_keep=2)
    for size in sizes:
        (workdir / f"data-{size}").mkdir()
        (workdir / f"items-{size}").mkdir()
        pipelines[size] = build_pipeline(workdir / f"data-{size}", size)
        managers[size] = ocp.CheckpointManager(workdir / f"ckpt-{size}", options=options)
    loop = asyncio.new_event_loop()
    samples = {size: {"snapshot": [], "future": [], "handler": [], "manager": []} for size in sizes}
    for step in range(-WARMUP, repeats):
        for size in sizes:
            pipeline, times = pipelines[size], samples[size]
            times["snapshot"].append(snapshot_seconds(pipeline))
            times["future"].append(commit_future_seconds())
            times["handler"].append(handler_seconds(pipeline, workdir / f"items-{size}", loop))
            times["manager"].append(manager_seconds(pipeline, managers[size], step + WARMUP))
    loop.close()
    for mngr in managers.values():
        mngr.close()
    return {
        size: {key: statistics.median(values[WARMUP:]) * 1e6 for key, values in times.items()}
        for size, times in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        rows = measure([args.small, args.large], args.repeats, Path(workdir))
    small, large = rows[args.small], rows[args.large]
    labels = {
        "snapshot": "state snapshot (get_state + json)",
        "future": "an empty Orbax commit future",
        "handler": "handler async_save, blocking part",
        "manager": "whole mngr.save, data item only",
    }
    print(f"median blocking time in µs ({args.repeats} saves; the file write is in the background)")
    print(f"{'':36}{args.small:>12,}{args.large:>14,}  large/small")
    for key, label in labels.items():
        ratio = large[key] / small[key]
        print(f"{label:36}{small[key]:>12.1f}{large[key]:>14.1f}  {ratio:>11.2f}")
    print(
        f"the data item's blocking share is {large['handler'] / large['manager']:.1%} "
        "of a whole mngr.save (the rest is Orbax's per-step bookkeeping)"
    )


if __name__ == "__main__":
    main()
