"""PackSequences: packing efficiency (non-padding tokens / all tokens), packed rows/s, and the
bytes each process reads when rows are split across 1 or 2 processes.

Run `.venv/bin/python benchmarks/packing.py`. Token records with lengths uniform in
[1, length/2] are written once to benchmarks/.cache/. Every process packs each window it needs
from all of that window's records (a window's row layout depends on every record's length), so
with N processes each reads the whole stream: the read amplification is N.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
from rates import items_per_second

import resumax
from resumax import ArrayRecordSourceConfig, ArrayRecordSourceModule, PackSequences, Pipeline
from resumax.stages.packing import DEFAULT_WINDOW

CACHE = Path(__file__).resolve().parent / ".cache"
NUM_RECORDS = 50_000
LENGTH = 512
BATCH_SIZE = 32  # rows per process


def ensure_data(length: int) -> str:
    """A glob of 4 shards of {"tokens": int32[n]} records, n uniform in [1, length / 2]."""
    prefix = CACHE / f"tokens-{length}"
    marker = CACHE / f"done-tokens-{length}-{NUM_RECORDS}"
    if not marker.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        lengths = rng.integers(1, length // 2 + 1, size=NUM_RECORDS)
        examples = (
            {"tokens": rng.integers(1, 50_000, size=n, dtype=np.int32)} for n in lengths.tolist()
        )
        resumax.write_shards(prefix, examples, num_shards=4)
        marker.touch()
    return f"{prefix}-*.array_record"


class ReadCounter:
    """A first stage that counts the records and token bytes this process reads."""

    def __init__(self) -> None:
        self.records = 0
        self.bytes = 0

    def __call__(self, example: dict) -> dict:
        self.records += 1
        self.bytes += example["tokens"].nbytes
        return example


def build(paths: str, length: int, window: int, counter=None, **kwargs) -> Pipeline:
    config = ArrayRecordSourceConfig(seed=1, num_epochs=-1, shuffle_files=True)
    stages = [counter] if counter is not None else []
    return Pipeline(
        ArrayRecordSourceModule(config, paths),
        [*stages, PackSequences(length, ["tokens"], window=window)],
        batch_size=BATCH_SIZE,
        rngs=0,
        **kwargs,
    )


def efficiency(paths: str, length: int, window: int, batches: int) -> float:
    real = total = 0
    for batch in itertools.islice(build(paths, length, window, prefetch=0), batches):
        real += int((batch["tokens_segment_ids"] > 0).sum())
        total += batch["tokens_segment_ids"].size
    return real / total


def rows_per_second(paths: str, batches: int, num_workers: int) -> float:
    pipeline = build(paths, LENGTH, DEFAULT_WINDOW, num_workers=num_workers)
    return items_per_second(pipeline, batches)


def reads_per_process(paths: str, global_batches: int, process_count: int) -> list[ReadCounter]:
    """What each simulated process read to deliver its rows of `global_batches` global batches."""
    counters = []
    for index in range(process_count):
        counter = ReadCounter()
        pipeline = build(
            paths,
            LENGTH,
            DEFAULT_WINDOW,
            counter,
            prefetch=0,
            process_index=index,
            process_count=process_count,
        )
        for _ in itertools.islice(pipeline, global_batches):
            pass
        counters.append(counter)
    return counters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=150)
    args = parser.parse_args()

    print(f"packing efficiency, lengths uniform in [1, length/2], {args.batches} batches of rows")
    for length in (128, LENGTH):
        paths = ensure_data(length)
        cells = [
            f"window {window}: {efficiency(paths, length, window, args.batches):.4f}"
            for window in (64, 128, 256, DEFAULT_WINDOW, 1024)
        ]
        print(f"  length {length:4d}  " + "  ".join(cells))
    paths = ensure_data(LENGTH)

    print(f"\npacked rows/s (length {LENGTH}, window {DEFAULT_WINDOW}, {BATCH_SIZE} rows/batch)")
    for workers in (0, 2):
        rate = rows_per_second(paths, args.batches, workers)
        print(f"  num_workers={workers}: {rate:,.0f} rows/s ({rate * LENGTH:,.0f} tokens/s)")

    global_rows = BATCH_SIZE * 2
    print(f"\nreads per process to deliver the same {args.batches * global_rows:,} rows in total")
    base = None
    for count in (1, 2):
        counters = reads_per_process(paths, args.batches * 2 // count, count)
        for index, counter in enumerate(counters):
            base = base or counter.bytes
            print(
                f"  {count} process(es), process {index}: {counter.records:,} records, "
                f"{counter.bytes / 2**20:.1f} MiB of tokens ({counter.bytes / base:.2f}x "
                "the single-process read)"
            )
    print(
        "  every process reads every record of the windows it packs: with N processes the "
        "total read is N times the data"
    )


if __name__ == "__main__":
    main()
