"""Read throughput of resumax against the bare read, hand-written loops and Grain, the worker
speed-up, and a table over record sizes and shard counts (`record_sizes.py`).

Run `make bench` or `.venv/bin/python benchmarks/throughput.py [--repeats 3]`. The first run writes
100,000 records (32x32x3 uint8 image + int64 label, 3.1 KB each) to benchmarks/.cache/. Every
contender is measured once per round, rounds are repeated, and the median of each is reported,
so that load from other processes hits all contenders alike.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from array_record.python import array_record_module
from record_sizes import size_shard_table

import resumax
from resumax import ArrayRecordSourceConfig, ArrayRecordSourceModule, Pipeline, RandomMap

CACHE = Path(__file__).resolve().parent / ".cache"
NUM_RECORDS = 100_000
BATCH_SIZE = 256
SEED = 42
IMAGE_SHAPE = (32, 32, 3)
# Per-channel mean and std of the augmentation's normalisation (CIFAR-10 values).
MEAN = np.array([0.491, 0.482, 0.447], dtype=np.float32)
STD = np.array([0.247, 0.243, 0.262], dtype=np.float32)

# A contender: (first batch number, number of batches) -> (wall seconds, CPU seconds of this
# process and its worker processes) for those batches, with the iterator built and its first
# batch taken before the clock starts. The CPU time is NaN for Grain (threads in a subprocess).
Contender = Callable[[int, int], tuple[float, float]]
# Peak resident memory of each worker process seen, read before it exits.
WORKER_PEAK_RSS_KIB: dict[int, int] = {}


# Data -----------------------------------------------------------------------------------------


def ensure_data() -> str:
    """The single file's path, written once; a `done` marker means complete."""
    single = CACHE / f"images-{NUM_RECORDS}.array_record"
    marker = CACHE / f"done-images-{NUM_RECORDS}"
    if not marker.exists():
        print(f"writing {NUM_RECORDS:,} records to {CACHE} (once) ...", flush=True)
        rng = np.random.default_rng(0)
        encoded = (
            resumax.encode(
                {
                    "image": rng.integers(0, 256, IMAGE_SHAPE, dtype=np.uint8),
                    "label": np.int64(index % 10),
                }
            )
            for index in range(NUM_RECORDS)
        )
        resumax.write_array_record(single, encoded)
        marker.touch()
    return str(single)


def shuffled_order(first_batch: int, num_batches: int) -> list[list[int]]:
    """The record indices of resumax's epoch-0 order, batch by batch (computed untimed)."""
    positions = np.arange(first_batch * BATCH_SIZE, (first_batch + num_batches) * BATCH_SIZE)
    indices = resumax.order.record_indices(
        positions, num_records=NUM_RECORDS, seed=SEED, epoch=0, shuffle=True
    )
    return [batch.tolist() for batch in np.split(indices, num_batches)]


def stack(examples: list[dict]) -> dict[str, np.ndarray]:
    return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


# Contenders -----------------------------------------------------------------------------------


def raw_loop(path: str, per_record: bool) -> Contender:
    """(a) A hand-written loop: ArrayRecordReader reads + resumax.records.decode + np.stack."""
    decode = resumax.records.decode

    def run(first_batch: int, num_batches: int) -> float:
        reader = array_record_module.ArrayRecordReader(
            path, "readahead_buffer_size:0,max_parallelism:0"
        )
        batches = shuffled_order(first_batch, num_batches + 1)
        stack([decode(data) for data in reader.read(batches[0])])
        start, cpu_start = time.perf_counter(), time.process_time()
        for indices in batches[1:]:
            if per_record:
                raw = [reader.read(index, index + 1)[0] for index in indices]
            else:
                raw = reader.read(indices)
            stack([decode(data) for data in raw])
        elapsed = time.perf_counter() - start, time.process_time() - cpu_start
        reader.close()
        return elapsed

    return run


def bytes_only(path: str) -> Contender:
    """The limit: 256 x reader.read(i, i + 1), bytes only (no decode, no batch)."""

    def run(first_batch: int, num_batches: int) -> float:
        reader = array_record_module.ArrayRecordReader(
            path, "readahead_buffer_size:0,max_parallelism:0"
        )
        batches = shuffled_order(first_batch, num_batches)
        read = reader.read
        start, cpu_start = time.perf_counter(), time.process_time()
        for indices in batches:
            [read(index, index + 1)[0] for index in indices]
        elapsed = time.perf_counter() - start, time.process_time() - cpu_start
        reader.close()
        return elapsed

    return run


def grain_seconds(path: str, first_batch: int, num_batches: int) -> float:
    """(b) Grain: MapDataset.source(ArrayRecordDataSource).shuffle(seed).map(decode).batch."""
    import grain

    source = grain.sources.ArrayRecordDataSource([path])
    dataset = (
        grain.MapDataset.source(source)
        .shuffle(seed=SEED)
        .map(resumax.records.decode)
        .batch(BATCH_SIZE)
    )
    iterator = iter(dataset[first_batch:])
    next(iterator)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(iterator)
    return time.perf_counter() - start


def grain_map_dataset(path: str) -> Contender:
    """(b) in a fresh process: Grain's 16 read threads and 500-batch buffer keep running after
    the measurement and would slow whatever is measured next."""

    def run(first_batch: int, num_batches: int) -> float:
        command = [sys.executable, __file__, "--grain", path, str(first_batch), str(num_batches)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        return float(output.split()[-1]), math.nan

    return run


def resumax_pipeline(paths: str, stages: tuple = (), **options: int) -> Contender:
    """(c) resumax: Pipeline(source with shuffle_files=True, batch_size=256, **options)."""

    def run(first_batch: int, num_batches: int) -> float:
        config = ArrayRecordSourceConfig(seed=SEED, shuffle_files=True)
        source = ArrayRecordSourceModule(config, paths)
        source.seek(0, first_batch * BATCH_SIZE)
        pipeline = Pipeline(source, stages, batch_size=BATCH_SIZE, rngs=0, **options)
        with iter(pipeline) as batches:
            next(batches)
            workers_start = sum(map(cpu_seconds, batches.worker_pids))
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(num_batches):
                next(batches)
            cpu = time.process_time() - cpu_start
            cpu += sum(map(cpu_seconds, batches.worker_pids)) - workers_start
            elapsed = time.perf_counter() - start, cpu
            for pid in batches.worker_pids:
                WORKER_PEAK_RSS_KIB[pid] = peak_rss_kib(pid)
        source.close()
        return elapsed

    return run


def augment(example: dict, rng: np.random.Generator) -> dict:
    """CPU-heavy per-record work: reflect-pad random crop, random flip, normalise to float32."""
    padded = np.pad(example["image"], ((4, 4), (4, 4), (0, 0)), mode="reflect")
    top, left = rng.integers(0, 9, size=2)
    image = padded[top : top + IMAGE_SHAPE[0], left : left + IMAGE_SHAPE[1]]
    if rng.random() < 0.5:
        image = image[:, ::-1]
    image = (image.astype(np.float32) / 255.0 - MEAN) / STD
    return {"image": image, "label": example["label"]}


# Measurement ----------------------------------------------------------------------------------


Rates = dict[str, list[float]]


def measure(contenders: dict[str, tuple[Contender, int]], repeats: int) -> tuple[Rates, Rates]:
    """Records/s of each contender in each round, per wall second and per CPU second of this
    process; a round runs each once, on a new part of the order, so contenders next to each other
    in a round see the same machine load."""
    rates: Rates = {name: [] for name in contenders}
    cpu_rates: Rates = {name: [] for name in contenders}
    first_batch = 0
    for round_index in range(repeats):
        print(f"  round {round_index + 1}/{repeats}:", end="", flush=True)
        for name, (contender, num_batches) in contenders.items():
            wall, cpu = contender(first_batch, num_batches)
            rates[name].append(num_batches * BATCH_SIZE / wall)
            cpu_rates[name].append(num_batches * BATCH_SIZE / cpu)
            print(f" {rates[name][-1]:,.0f}", end="", flush=True)
        print(flush=True)
        # Each round reads another part of epoch 0 (the order is only defined within an epoch).
        span = max(batches for _, batches in contenders.values()) + 1
        first_batch = (first_batch + span) % (NUM_RECORDS // BATCH_SIZE - span)
    return rates, cpu_rates


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median over rounds of numerator / denominator measured in the same round."""
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))


def warm_page_cache(paths: list[str]) -> None:
    """Reads the files once, so that the first round does not measure the disk."""
    for path in paths:
        with open(path, "rb") as file:
            while file.read(1 << 24):
                pass


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used (clock-tick resolution)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_kib(pid: int) -> int:
    """Peak resident memory (VmHWM) of a live process, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1])


def report(rates: Rates, cpu_rates: Rates) -> None:
    """Median records/s per wall second and per CPU second of this process and its workers
    (less sensitive to other load on the machine; not measured for Grain)."""
    print(f"  {'':<58} {'records/s':>10} {'per CPU s':>10}")
    for name, values in rates.items():
        cpu = statistics.median(cpu_rates[name])
        cpu_text = "" if math.isnan(cpu) else f"{cpu:>10,.0f}"
        print(f"  {name:<58} {statistics.median(values):>10,.0f} {cpu_text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds (median; >= 3)")
    parser.add_argument("--batches", type=int, default=200, help="timed batches per resumax run")
    parser.add_argument("--skip-sizes", action="store_true", help="no size x shard table")
    parser.add_argument(
        "--grain", nargs=3, metavar=("PATH", "FIRST", "COUNT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.grain:
        path, first_batch, num_batches = args.grain
        print(grain_seconds(path, int(first_batch), int(num_batches)))
        return
    single = ensure_data()
    many = args.batches
    few = max(4, many // 10)  # Grain is ~30x slower: fewer batches keep a round short

    warm_page_cache([single])

    print(f"\nRead + decode + batch of {BATCH_SIZE}, shuffled, {NUM_RECORDS:,} records of 3.1 KB")
    limit = "limit: 256 x reader.read(i, i + 1), bytes only"
    list_reads = "(a1) raw: reader.read(list of 256) + decode + stack"
    range_reads = "(a2) raw: 256 x reader.read(i, i + 1) + decode + stack"
    grain_name = "(b) Grain MapDataset ... .batch(256)"
    ours = "(c) resumax Pipeline(batch_size=256)"
    two_processes = "(c) resumax, num_workers=2"
    read_contenders = {
        limit: (bytes_only(single), many),
        list_reads: (raw_loop(single, False), many),
        range_reads: (raw_loop(single, True), many),
        ours: (resumax_pipeline(single), many),
        "(c) resumax, prefetch=0": (resumax_pipeline(single, prefetch=0), many),
        two_processes: (resumax_pipeline(single, num_workers=2), many),
        grain_name: (grain_map_dataset(single), few),
    }
    rates, cpu_rates = measure(read_contenders, args.repeats)
    report(rates, cpu_rates)
    # (a): the faster of the two raw loops, round by round.
    upper = [max(pair) for pair in zip(rates[list_reads], rates[range_reads], strict=True)]
    print("  ratios: median over rounds of the ratio within a round")
    print(f"  (c)/(a) = {median_ratio(rates[ours], upper):.2f}   (target >= 1.6)")
    print(f"  (c) num_workers=2/(a) = {median_ratio(rates[two_processes], upper):.2f}   (>= 2.5)")
    print(f"  (c)/limit = {median_ratio(rates[ours], rates[limit]):.2f}   (target >= 0.75)")
    print(f"  (c)/(b) = {median_ratio(rates[ours], rates[grain_name]):.1f}   (target >= 10)")
    upper_cpu = [max(p) for p in zip(cpu_rates[list_reads], cpu_rates[range_reads], strict=True)]
    print(
        f"  per CPU second: (c)/(a) = {median_ratio(cpu_rates[ours], upper_cpu):.2f}, "
        f"(c)/limit = {median_ratio(cpu_rates[ours], cpu_rates[limit]):.2f}, "
        f"num_workers=2/(c) = {median_ratio(cpu_rates[two_processes], cpu_rates[ours]):.2f}"
    )
    print(f"  (c) num_workers=2/(c) = {median_ratio(rates[two_processes], rates[ours]):.2f}")
    print(f"  (cores: {os.cpu_count()}, load average now: {os.getloadavg()[0]:.2f})")

    print(
        f"\nRandomMap(random crop + flip + normalise to float32) per record, batch of {BATCH_SIZE}"
    )
    augmented = (RandomMap(augment),)
    in_process, two_workers = "resumax, num_workers=0", "resumax, num_workers=2"
    transform_contenders = {
        in_process: (resumax_pipeline(single, augmented, num_workers=0), max(10, many // 3)),
        two_workers: (resumax_pipeline(single, augmented, num_workers=2), max(10, many // 3)),
    }
    transform_rates, transform_cpu = measure(transform_contenders, args.repeats)
    report(transform_rates, transform_cpu)
    speedup = median_ratio(transform_rates[two_workers], transform_rates[in_process])
    print(f"  2 workers / 0 workers = {speedup:.2f}   (target >= 1.6 on 2 cores)")
    efficiency = median_ratio(transform_cpu[two_workers], transform_cpu[in_process])
    print(f"  per CPU second: 2 workers / 0 workers = {efficiency:.2f}")

    if not args.skip_sizes:
        print("\nresumax over record sizes and shard counts (single process, no stages)")
        size_shard_table(args.repeats)

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker = max(WORKER_PEAK_RSS_KIB.values(), default=0) / 1024
    print(f"\npeak RSS: this process {own:,.0f} MiB, largest worker {worker:,.0f} MiB")
    print(f"(cores: {os.cpu_count()}, load average now: {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
