"""MixtureSource: state size for 2 and 10 components, read throughput against one plain source,
and the cost of a lookup far into the stream against one at its start.

    .venv/bin/python benchmarks/mixture.py [--records 20000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from rates import items_per_second

import resumax
from resumax import ArrayRecordSourceConfig, ArrayRecordSourceModule, MixtureSource, Pipeline

BATCH_SIZE = 256


def token_records(count: int, corpus: int) -> list[dict]:
    """Variable-length int32 token records (1..64 tokens), tagged with their corpus."""
    rng = np.random.default_rng(corpus)
    return [
        {"tokens": rng.integers(0, 256, rng.integers(1, 65), dtype=np.int32), "corpus": corpus}
        for _ in range(count)
    ]


def write_corpora(directory: Path, count: int, corpora: int) -> list[Path]:
    paths = []
    for corpus in range(corpora):
        paths.append(directory / f"corpus{corpus}.array_record")
        resumax.write_array_record(paths[-1], token_records(count, corpus))
    return paths


def build_mixture(paths: list[Path], seed: int = 1) -> MixtureSource:
    config = ArrayRecordSourceConfig(seed=seed, shuffle_files=True)
    sources = {path.stem: ArrayRecordSourceModule(config, path) for path in paths}
    weights = {path.stem: 1 + index for index, path in enumerate(paths)}
    return MixtureSource(ArrayRecordSourceConfig(seed=seed, shuffle_files=True), sources, weights)


def state_bytes(directory: Path, corpora: int) -> int:
    """Bytes of the JSON state of a pipeline over a mixture of `corpora` components, mid-stream."""
    paths = write_corpora(directory / f"state{corpora}", 100, corpora)
    pipeline = Pipeline(build_mixture(paths), [resumax.Pad({"tokens": 64})], batch_size=32)
    next(iter(pipeline))
    return len(json.dumps(pipeline.get_state()))


def records_per_second(source: resumax.RecordSource, batches: int) -> float:
    pipeline = Pipeline(source, [resumax.Pad({"tokens": 64})], batch_size=BATCH_SIZE)
    return items_per_second(pipeline, batches)


def lookup_seconds(source: MixtureSource, position: int, repeats: int = 200) -> float:
    """Median time of `record_indices` for one batch of positions at `position` + a new block
    each time (so every call lays out its block afresh)."""
    times = []
    for repeat in range(repeats):
        start = time.perf_counter()
        epoch, index = divmod(position + repeat * len(source), len(source))
        source.record_indices(epoch, index, min(index + BATCH_SIZE, len(source)))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=20_000, help="records per corpus")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for corpora in (2, 10):
            print(
                f"state of a pipeline over a {corpora}-component mixture: "
                f"{state_bytes(directory, corpora)} bytes of JSON"
            )
        paths = write_corpora(directory, args.records, 2)
        plain_path = directory / "plain.array_record"
        resumax.write_array_record(plain_path, token_records(2 * args.records, 0))
        batches = 2 * args.records // BATCH_SIZE // 2
        ratios = []
        for _ in range(args.repeats):
            mixed = records_per_second(build_mixture(paths), batches)
            config = ArrayRecordSourceConfig(seed=1, shuffle_files=True)
            plain = records_per_second(ArrayRecordSourceModule(config, plain_path), batches)
            ratios.append(mixed / plain)
            print(f"mixture {mixed:,.0f} records/s, one source {plain:,.0f} records/s")
        print(
            f"mixture / one source (median of {args.repeats} rounds): "
            f"{statistics.median(ratios):.2f}"
        )
        source = build_mixture(paths)
        near, far = lookup_seconds(source, 5_000), lookup_seconds(source, 10**12)
        print(
            f"record_indices for {BATCH_SIZE} positions: at 5,000 {near * 1e6:.0f} us, "
            f"at 10**12 {far * 1e6:.0f} us (ratio {far / near:.2f})"
        )


if __name__ == "__main__":
    main()
