"""resumax throughput over record sizes (100 B, 3 KB, 150 KB) and shard counts (1, 1,000, 10,000).

Run by `benchmarks/throughput.py` (or alone: `.venv/bin/python benchmarks/record_sizes.py`). Data is
written once to benchmarks/.cache/sizes/: 100,000 records of 100 B and 3 KB, 10,000 of 150 KB,
each as one file, 1,000 shards and 10,000 shards (~5 GB in all).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import resumax
from resumax import ArrayRecordSourceConfig, ArrayRecordSourceModule, Pipeline

CACHE = Path(__file__).resolve().parent / ".cache" / "sizes"
BATCH_SIZE = 256
SEED = 42
# (name, bytes per record, records): a total of ~10 MB, ~310 MB and ~1.5 GB per layout.
SIZES = (("100 B", 100, 100_000), ("3 KB", 3_100, 100_000), ("150 KB", 150_000, 10_000))
SHARD_COUNTS = (1, 1_000, 10_000)


def payload_length(record_bytes: int) -> int:
    """uint8 elements of the `data` field that make an encoded record `record_bytes` long."""
    overhead = len(resumax.encode({"data": np.zeros(0, np.uint8), "label": np.int64(0)}))
    return max(1, record_bytes - overhead - 2)  # the bin header grows by 2 bytes past 255


class RandomRecords(Sequence):
    """`count` encoded records {"data": random uint8[length], "label": int64}, made on demand
    (10,000 records of 150 KB would hold 1.5 GB)."""

    def __init__(self, length: int, count: int):
        self.length, self.count = length, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> bytes:
        data = np.random.default_rng(index).integers(0, 256, self.length, dtype=np.uint8)
        return resumax.encode({"data": data, "label": np.int64(index % 10)})


def ensure_layout(size_name: str, record_bytes: int, count: int, num_shards: int) -> str:
    """A glob of the files holding `count` records of `record_bytes` in `num_shards` files."""
    tag = f"{record_bytes}B-{count}-{num_shards}"
    prefix = CACHE / tag / "records"
    marker = CACHE / f"done-{tag}"
    pattern = f"{prefix}-*-of-{num_shards:05d}.array_record"
    if marker.exists():
        return pattern
    print(f"  writing {count:,} records of {size_name} as {num_shards:,} files (once) ...")
    resumax.write_shards(prefix, RandomRecords(payload_length(record_bytes), count), num_shards)
    marker.touch()
    return pattern


def open_source(pattern: str) -> ArrayRecordSourceModule:
    return ArrayRecordSourceModule(ArrayRecordSourceConfig(seed=SEED, shuffle_files=True), pattern)


def measure_cell(pattern: str, num_batches: int) -> tuple[float, float]:
    """(seconds from opening the source to the first batch, records/s of the next batches).

    The records it reads are read once untimed first: the files of every cell (~9 GB with the
    block padding of 10,000 small files) do not all stay in the page cache at once.
    """
    warm = open_source(pattern)
    stop = min((num_batches + 1) * BATCH_SIZE, warm.records_per_epoch)
    warm.read_raw(warm.record_indices(0, 0, stop))
    warm.close()
    start = time.perf_counter()
    source = open_source(pattern)
    pipeline = Pipeline(source, batch_size=BATCH_SIZE, rngs=0)
    with iter(pipeline) as batches:
        next(batches)
        first_batch = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(num_batches):
            next(batches)
        rate = num_batches * BATCH_SIZE / (time.perf_counter() - start)
    source.close()
    return first_batch, rate


def size_shard_table(repeats: int, max_bytes: float = 5e8) -> None:
    """Measures every (size, shard count) cell `repeats` times, interleaved, and prints medians.

    Each measurement reads at most 100 batches or `max_bytes` of records.
    """
    cells = {
        (name, shards): ensure_layout(name, record_bytes, count, shards)
        for name, record_bytes, count in SIZES
        for shards in SHARD_COUNTS
    }
    counts = {name: count for name, _, count in SIZES}
    record_bytes = {name: size for name, size, _ in SIZES}
    firsts: dict[tuple[str, int], list[float]] = {cell: [] for cell in cells}
    rates: dict[tuple[str, int], list[float]] = {cell: [] for cell in cells}
    for round_index in range(repeats):
        print(f"  round {round_index + 1}/{repeats}", flush=True)
        for (name, shards), pattern in cells.items():
            records = min(100 * BATCH_SIZE, counts[name], max_bytes / record_bytes[name])
            first, rate = measure_cell(pattern, int(records) // BATCH_SIZE - 1)
            firsts[name, shards].append(first)
            rates[name, shards].append(rate)
            print(f"    {name:>6} x {shards:>6,} files: {rate:>9,.0f} records/s", flush=True)
    print(
        f"\n  {'record':>7} {'shards':>7} {'records':>8} {'records/s':>10} {'MB/s':>7} "
        f"{'vs 1 file':>9} {'first batch':>11}"
    )
    for (name, shards), values in rates.items():
        rate = statistics.median(values)
        one_file = statistics.median(a / b for a, b in zip(values, rates[name, 1], strict=True))
        first = statistics.median(firsts[name, shards])
        print(
            f"  {name:>7} {shards:>7,} {counts[name]:>8,} {rate:>10,.0f} "
            f"{rate * record_bytes[name] / 1e6:>7,.0f} {one_file:>9.2f} {first:>10.2f}s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds (median)")
    size_shard_table(parser.parse_args().repeats)


if __name__ == "__main__":
    main()
