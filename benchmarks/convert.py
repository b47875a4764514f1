"""`resumax convert` throughput per input format: the local engine and Apache Beam with 2 worker
processes, against the format's own reader followed by `write_shards`.

Run: `.venv/bin/python benchmarks/convert.py [--records 100000] [--formats jsonl,csv,...]
[--repeats 3]` (about 15 minutes on 2 cores). Each format's input is 4 files (an image folder:
4 class directories; a Hugging Face dataset: one directory) of records like
`tests/convert_inputs.py` writes (an id, a short text, a float, a pair of floats; 4x4 PNGs for
images), written once into a temporary directory. Every conversion writes 8 shards. The baseline
reads with the format's own library (json, csv, pyarrow, plain file reads, datasets, numpy; for
TFRecord, which has no reader without TensorFlow, a plain framing loop and `resumax.TFExample`),
builds the same records and calls `write_shards`. The baseline and the local engine alternate
for `--repeats` rounds; their rates and ratio are medians over the rounds. Beam runs once, on
FnApiRunner with `direct_num_workers=2`, `direct_running_mode=multi_processing`; its startup
(launch, plan, worker processes) lasts until a worker creates the first shard file, which a
thread watches for; its records/s counts the time from then on (reading, writing, the commit).
"""

from __future__ import annotations

import argparse
import csv
import json
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

from resumax.convert import convert  # noqa: E402
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


def timed(function, *args, **kwargs) -> float:
    start = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - start


def baseline(format: str, inputs: list[str], prefix: str) -> None:
    write_shards(prefix, baseline_records(format, inputs), SHARDS)


def timed_beam(inputs: list[str], prefix: str) -> tuple[float, float]:
    """(startup, work) seconds of a Beam conversion: the startup lasts until a worker creates
    the first shard file (a thread watches the output directory), the work from then on."""
    directory = os.path.dirname(prefix)
    os.makedirs(directory, exist_ok=True)
    first: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set() and not os.listdir(directory):
            time.sleep(0.005)
        first.append(time.perf_counter())

    watcher = threading.Thread(target=watch)
    start = time.perf_counter()
    watcher.start()
    convert(inputs, prefix, num_shards=SHARDS, engine="beam", pipeline_options=BEAM)
    end = time.perf_counter()
    done.set()
    watcher.join()
    return first[0] - start, end - first[0]


def measure(format: str, directory: str, records: int, repeats: int) -> str:
    """One table row: the baseline and the local engine in `repeats` interleaved rounds (rates
    and ratio: medians over rounds), then Beam once."""
    inputs = make_inputs(format, os.path.join(directory, format), records)
    out = os.path.join(directory, f"{format}-out")
    bases, locals_ = [], []
    for round_ in range(repeats):
        bases.append(timed(baseline, format, inputs, f"{out}/base{round_}/train"))
        locals_.append(timed(convert, inputs, f"{out}/local{round_}/train", num_shards=SHARDS))
    startup, work = timed_beam(inputs, f"{out}/beam/train")
    for path in (format, f"{format}-out"):
        shutil.rmtree(os.path.join(directory, path))
    base, local = statistics.median(bases), statistics.median(locals_)
    ratio = statistics.median(b / c for b, c in zip(bases, locals_, strict=True))
    return (
        f"| {format} | {records / base:,.0f} | {records / local:,.0f} | {ratio:.2f} "
        f"| {records / work:,.0f} | {startup:.1f} s | {local / work:.2f} |"
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
            "| format | baseline rec/s | local rec/s | local / baseline | Beam rec/s (startup "
            "excluded) | Beam startup | Beam / local |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for format in args.formats.split(","):
            print(measure(format, directory, args.records, args.repeats), flush=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
