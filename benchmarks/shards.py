"""Many shards against one file: time to first batch, throughput, and the cost of a far restore.

Run: `.venv/bin/python benchmarks/shards.py [--records 100000] [--shards 10000]`. Prints records/s,
seconds and the ratios the speed issue targets (medians of interleaved rounds, one process).
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from rates import items_per_second

import resumax
from resumax.pipeline import Pipeline
from resumax.sources import ArrayRecordSourceConfig, ArrayRecordSourceModule, RecordSource
from resumax.sources.files.readers import default_max_open_files

BATCH = 256


def examples(count: int, record_bytes: int) -> list[bytes]:
    """Encoded records of about `record_bytes` bytes: an id and a uint8 image."""
    return [
        resumax.encode(
            {"id": np.int64(i), "image": np.full(record_bytes - 40, i % 251, dtype=np.uint8)}
        )
        for i in range(count)
    ]


def first_batch_seconds(paths: str, shuffle: bool, **source_options: Any) -> float:
    """Seconds from nothing to the first batch in hand: resolve, identify, open, read, stack."""
    start = time.perf_counter()
    config = ArrayRecordSourceConfig(seed=1, shuffle_files=shuffle)
    source = ArrayRecordSourceModule(config, paths, **source_options)
    iterator = iter(Pipeline(source=source, batch_size=BATCH, prefetch=0))
    next(iterator)
    elapsed = time.perf_counter() - start
    iterator.close()
    source.close()
    return elapsed


def records_per_second(
    paths: str,
    shuffle: bool,
    batches: int,
    warm: bool = False,
    window: int | None = None,
    **source_options: Any,
) -> float:
    """Records/s over `batches` batches after the first (a fresh source and pipeline); `warm`
    reads one whole epoch first, so that every reader the pool can hold is already open;
    `window` is the config's shuffle_window (the file-grouped shuffle)."""
    config = ArrayRecordSourceConfig(seed=2, shuffle_files=shuffle, shuffle_window=window)
    source = ArrayRecordSourceModule(config, paths, **source_options)
    if warm:
        source.read_raw(np.arange(len(source)))
    rate = items_per_second(Pipeline(source=source, batch_size=BATCH, prefetch=0), batches)
    source.close()
    return rate


def window_rows(
    one: str, many: str, windows: list[int], batches: int
) -> dict[str, Callable[[], float]]:
    """Throughput measures of the file-grouped shuffle (shuffle_window) over shards and over the
    one file, per window size."""
    rows: dict[str, Callable[[], float]] = {}
    for window in windows:
        for name, paths in (("shards", many), ("one file", one)):
            rows[f"{name}, shuffle_window {window}"] = functools.partial(
                records_per_second, paths, True, batches, window=window
            )
    return rows


class RepeatedSource(RecordSource):
    """`records_per_epoch` records over a small backing list: record i is backing[i % len].

    The order, position and state code run on the full 10^12-record epoch exactly as for files;
    only the bytes come from the backing list, which a fresh and a restored pipeline share.
    """

    def __init__(self, config: ArrayRecordSourceConfig, backing: Sequence[Any], records: int):
        self._backing = list(backing)
        super().__init__(config, records_per_epoch=records, fingerprint="repeated")

    def read_records(self, record_indices: Sequence[int]) -> list[Any]:
        backing = self._backing
        return [backing[int(i) % len(backing)] for i in record_indices]


def restore_seconds(backing: list[dict], restore: bool) -> float:
    """Seconds to the first batch of a fresh pipeline, or of one set to epoch 10^6, position 10^9
    of a 10^12-record shuffled order (set_state included)."""
    config = ArrayRecordSourceConfig(seed=3, shuffle_files=True)
    source = RepeatedSource(config, backing, 10**12)
    pipeline = Pipeline(source=source, batch_size=BATCH, prefetch=0)
    start = time.perf_counter()
    if restore:
        state = pipeline.get_state()
        state["source"] = {**state["source"], "current_epoch": 10**6, "current_index": 10**9}
        pipeline.set_state(state)
    iterator = iter(pipeline)
    next(iterator)
    elapsed = time.perf_counter() - start
    iterator.close()
    return elapsed


def median_of(rounds: int, measures: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Median of each measure over `rounds` interleaved rounds."""
    values: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            values[name].append(measure())
    return {name: statistics.median(found) for name, found in values.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--record-bytes", type=int, default=3_100)
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--windows", type=int, nargs="+", default=[1024, 4096, 16384])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="resumax-shards-") as directory:
        data = examples(args.records, args.record_bytes)
        start = time.perf_counter()
        resumax.write_shards(os.path.join(directory, "many"), data, args.shards)
        write_many = time.perf_counter() - start
        resumax.write_shards(os.path.join(directory, "one"), data, 1)
        many = os.path.join(directory, "many-*.array_record")
        one = os.path.join(directory, "one-*.array_record")
        print(
            f"{args.records} records of {args.record_bytes} B; {args.shards} shards written by "
            f"write_shards in {write_many:.1f} s; batch {BATCH}; machine: {os.cpu_count()} cores"
        )
        all_open = {"max_open_files": args.shards}
        print(
            f"ulimit -n {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}: default max_open_files "
            f"{default_max_open_files()}; 'bounded' rows use max_open_files=128 (the default "
            "under ulimit -n 1024)"
        )
        first = median_of(
            args.rounds,
            {
                "one file, shuffled": lambda: first_batch_seconds(one, True),
                "shards, shuffled": lambda: first_batch_seconds(many, True),
                "one file, in order": lambda: first_batch_seconds(one, False),
                "shards, in order": lambda: first_batch_seconds(many, False),
            },
        )
        print("\ntime to first batch (s)")
        for name, seconds in first.items():
            print(f"  {name:<22} {seconds:.4f}")
        for order in ("shuffled", "in order"):
            ratio = first[f"shards, {order}"] / first[f"one file, {order}"]
            print(f"  ratio shards/one file, {order}: {ratio:.2f}x (target <= 3)")
        speed = median_of(
            args.rounds,
            {
                "one file, shuffled": lambda: records_per_second(one, True, args.batches),
                "shards, shuffled": lambda: records_per_second(many, True, args.batches),
                "shards, shuffled, bounded": lambda: records_per_second(
                    many, True, args.batches, max_open_files=128
                ),
                "shards, shuffled, all open": lambda: records_per_second(
                    many, True, args.batches, **all_open
                ),
                "shards, shuffled, all open, warm": lambda: records_per_second(
                    many, True, args.batches, warm=True, **all_open
                ),
                "one file, in order": lambda: records_per_second(one, False, args.batches),
                "shards, in order": lambda: records_per_second(many, False, args.batches),
                "shards, in order, bounded": lambda: records_per_second(
                    many, False, args.batches, max_open_files=128
                ),
                "shards, in order, warm": lambda: records_per_second(
                    many, False, args.batches, warm=True, **all_open
                ),
                **window_rows(one, many, args.windows, args.batches),
            },
        )
        print("\nthroughput (records/s)")
        for name, rate in speed.items():
            print(f"  {name:<34} {rate:>10,.0f}")
        for name in speed:
            if name.startswith("one file"):
                continue
            one_file = "one file, in order" if "in order" in name else "one file, shuffled"
            print(
                f"  ratio {name} / {one_file}: {speed[name] / speed[one_file]:.2f} (target >= 0.8)"
            )
            if "window" in name:
                same = name.replace("shards", "one file")
                print(f"  ratio {name} / {same}: {speed[name] / speed[same]:.2f}")
    backing = [resumax.decode(record) for record in examples(BATCH * 4, args.record_bytes)]
    restore = median_of(
        args.rounds * 4,
        {
            "fresh": lambda: restore_seconds(backing, False),
            "restored": lambda: restore_seconds(backing, True),
        },
    )
    print("\nfirst batch of a 10^12-record shuffled order (s)")
    print(f"  fresh pipeline                          {restore['fresh']:.5f}")
    print(f"  set_state(epoch 10^6, position 10^9)    {restore['restored']:.5f}")
    print(f"  ratio restored/fresh: {restore['restored'] / restore['fresh']:.2f}x (target <= 1.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
