"""`resumax convert` throughput per input format: the local engine and Apache Beam with 2 worker
processes, against the format's own reader followed by `write_shards`.

Run: `.venv/bin/python benchmarks/convert.py [--records 100000] [--formats jsonl,csv,...]
[--repeats 3]` (about 8 minutes on 2 cores). Each format's input is 4 files (an image folder:
4 class directories; a Hugging Face dataset: one directory) of records like
`tests/convert_inputs.py` writes (an id, a short text, a float, a pair of floats; 4x4 PNGs for
images), written once into a temporary directory. Every conversion writes 8 shards. The baseline
reads with the format's own library (json, csv, pyarrow, plain file reads, datasets, numpy; for
TFRecord, which has no reader without TensorFlow, a plain framing loop and `resumax.TFExample`),
builds the same records and calls `write_shards`. Each of `--repeats` rounds runs the baseline,
the local engine and Beam one after the other; rates are medians over the rounds, ratios
medians of each round's ratio. "local cores used" is the local engine's CPU time over its wall
time. "2 processes" is the ceiling of 2 workers on this machine at that moment: a pool of 2
processes, started beforehand, writes the even and the odd shards with the engines' own
functions (no Beam), then commits. Beam runs on FnApiRunner with `direct_num_workers=2`,
`direct_running_mode=multi_processing`; its startup (importing Beam, launching 2 worker
processes that import Beam and resumax, the first stages) lasts until a worker creates the
first shard file, its work (reading, writing, the commit) until the index appears, its shutdown
(stopping the workers) until `convert` returns: startup and shutdown are fixed costs, the
records/s counts the work.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import shutil
import statistics
import struct
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests import convert_inputs  # noqa: E402

from resumax.convert import convert, shards, stream  # noqa: E402
from resumax.convert.formats import Reader, reader_for  # noqa: E402
from resumax.convert.options import ConvertOptions  # noqa: E402
from resumax.convert.plan import Plan, make_plan  # noqa: E402
from resumax.records import ArrayRows, TFExample, write_shards  # noqa: E402

SHARDS = 8
FILES = 4
BEAM = [
    "--runner=FnApiRunner",
    "--direct_num_workers=2",
    "--direct_running_mode=multi_processing",
]


def make_inputs(format: str, directory: str, records: int) -> list[str]:
    """4 files (or directories) of `format` holding `records` records in all."""
    per_file = records // FILES
    os.makedirs(directory, exist_ok=True)
    if format == "imagefolder":
        root = os.path.join(directory, "images")
        for label in range(FILES):
            os.makedirs(os.path.join(root, f"class{label}"))
            for i in range(per_file):
                with open(os.path.join(root, f"class{label}", f"{i:06d}.png"), "wb") as out:
                    out.write(convert_inputs.png(i % 256))
        return [root]
    if format == "hf":
        import datasets

        path = os.path.join(directory, "hf")
        datasets.Dataset(convert_inputs.arrow_table(0, records)).save_to_disk(path)
        return [path]
    writer = getattr(convert_inputs, f"write_{format}")
    return writer(directory, num_files=FILES, per_file=per_file)


def baseline_records(format: str, inputs: list[str]) -> list:
    """The records, read by the format's own library."""
    if format == "jsonl":
        rows = []
        for path in inputs:
            with open(path, "rb") as file:
                for line in file:
                    row = json.loads(line)
                    rows.append(
                        {
                            "id": np.int64(row["id"]),
                            "text": row["text"],
                            "score": np.float64(row["score"]),
                            "pair": np.asarray(row["pair"], np.float64),
                        }
                    )
        return rows
    if format == "csv":
        rows = []
        for path in inputs:
            with open(path, newline="") as file:
                for row in csv.DictReader(file):
                    rows.append(
                        {
                            "id": np.int64(row["id"]),
                            "text": row["text"],
                            "score": np.float64(row["score"]),
                        }
                    )
        return rows
    if format in ("parquet", "hf"):
        if format == "parquet":
            import pyarrow.parquet as pq

            tables = [pq.read_table(path) for path in inputs]
        else:
            import datasets

            tables = [datasets.load_from_disk(inputs[0]).data.table]
        rows = []
        for table in tables:
            columns = {
                "id": table.column("id").to_numpy(),
                "text": table.column("text").to_pylist(),
                "score": table.column("score").to_numpy(),
                "pair": [np.asarray(v, np.float32) for v in table.column("pair").to_pylist()],
            }
            table_rows = ArrayRows(columns)
            rows.extend(table_rows[i] for i in range(table.num_rows))
        return rows
    if format == "tfrecord":
        parse, rows = TFExample(), []
        for path in inputs:
            with open(path, "rb") as file:
                while header := file.read(12):
                    (length,) = struct.unpack("<Q", header[:8])
                    parsed = parse(file.read(length))
                    file.read(4)
                    parsed["text"] = np.array(parsed["text"], dtype=bytes)
                    rows.append(parsed)
        return rows
    if format == "imagefolder":
        root = inputs[0]
        rows = []
        for label, name in enumerate(sorted(os.listdir(root))):
            for file_name in sorted(os.listdir(os.path.join(root, name))):
                with open(os.path.join(root, name, file_name), "rb") as file:
                    rows.append({"image": file.read(), "label": np.int64(label)})
        return rows
    rows = []
    for path in inputs:
        with np.load(path) as arrays:
            table = ArrayRows({name: arrays[name] for name in arrays.files})
            rows.extend(table[i] for i in range(len(table)))
    return rows


def timed(function, *args, **kwargs) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    function(*args, **kwargs)
    return time.perf_counter() - start, time.process_time() - cpu


def baseline(format: str, inputs: list[str], prefix: str) -> None:
    write_shards(prefix, baseline_records(format, inputs), SHARDS)


def _write_some_shards(reader: Reader, plan: Plan, prefix: str, numbers: range) -> None:
    for shard in numbers:
        records = stream.shard_records(reader, plan.shard_reads(shard))
        shards.write_shard(prefix, shard, plan.num_shards, records)


def two_processes(pool, format: str, inputs: list[str], prefix: str) -> None:
    """The most 2 worker processes can do on this machine now, without Beam: the plan, the even
    and the odd shards (as FnApiRunner splits them) written by a pool of 2 processes started
    beforehand, with the engines' own functions, then the commit."""
    reader = reader_for(ConvertOptions(format=format, num_shards=SHARDS))
    plan = make_plan(reader, inputs)
    halves = [(reader, plan, prefix, range(first, SHARDS, 2)) for first in (0, 1)]
    pool.starmap(_write_some_shards, halves)
    shards.commit(prefix, SHARDS, plan.metadata)


def timed_beam(inputs: list[str], prefix: str) -> tuple[float, float, float]:
    """(startup, work, shutdown) seconds of a Beam conversion: the startup lasts until a worker
    creates the first shard file, the work until the index appears (the commit included), the
    shutdown until `convert` returns (a thread watches the output directory)."""
    directory = os.path.dirname(prefix)
    os.makedirs(directory, exist_ok=True)
    index = os.path.basename(prefix) + ".index.json"
    first: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set() and not os.listdir(directory):
            time.sleep(0.005)
        first.append(time.perf_counter())
        while not done.is_set() and index not in os.listdir(directory):
            time.sleep(0.005)
        first.append(time.perf_counter())

    watcher = threading.Thread(target=watch)
    start = time.perf_counter()
    watcher.start()
    convert(inputs, prefix, num_shards=SHARDS, engine="beam", pipeline_options=BEAM)
    end = time.perf_counter()
    done.set()
    watcher.join()
    return first[0] - start, first[1] - first[0], end - first[1]


def measure(pool, format: str, directory: str, records: int, repeats: int) -> str:
    """One table row: `repeats` rounds of the baseline, the local engine, 2 processes without
    Beam and Beam, one after the other; rates are medians over the rounds, ratios medians of
    each round's ratio."""
    inputs = make_inputs(format, os.path.join(directory, format), records)
    out = os.path.join(directory, f"{format}-out")
    bases, locals_, cpus, pooled, beams = [], [], [], [], []
    for round_ in range(repeats):
        bases.append(timed(baseline, format, inputs, f"{out}/base{round_}/train")[0])
        wall, cpu = timed(convert, inputs, f"{out}/local{round_}/train", num_shards=SHARDS)
        locals_.append(wall)
        cpus.append(cpu)
        pooled.append(timed(two_processes, pool, format, inputs, f"{out}/pool{round_}/t")[0])
        beams.append(timed_beam(inputs, f"{out}/beam{round_}/train"))
    for path in (format, f"{format}-out"):
        shutil.rmtree(os.path.join(directory, path))
    median = statistics.median
    base, local = median(bases), median(locals_)
    startup, work, shutdown = (median(times) for times in zip(*beams, strict=True))
    ratio = median(b / c for b, c in zip(bases, locals_, strict=True))
    beam_ratio = median(c / b[1] for c, b in zip(locals_, beams, strict=True))
    pool_ratio = median(c / p for c, p in zip(locals_, pooled, strict=True))
    return (
        f"| {format} | {records / base:,.0f} | {records / local:,.0f} | {ratio:.2f} "
        f"| {median(cpus) / local:.2f} | {pool_ratio:.2f} | {records / work:,.0f} "
        f"| {beam_ratio:.2f} | {startup:.1f} s + {shutdown:.1f} s |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--formats", default=",".join(convert_inputs.FORMATS))
    parser.add_argument("--repeats", type=int, default=3, help="rounds of baseline and local")
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="resumax-bench-convert-")
    try:
        print(
            "| format | baseline rec/s | local rec/s | local / baseline | local cores used "
            "| 2 processes / local | Beam rec/s (work) | Beam / local | Beam startup + shutdown |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        with multiprocessing.get_context("spawn").Pool(2) as pool:
            pool.map(abs, range(2))  # started before any measurement
            for format in args.formats.split(","):
                print(measure(pool, format, directory, args.records, args.repeats), flush=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
