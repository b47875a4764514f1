"""Small inputs of every format `resumax convert` reads, written with each format's own tools,
and what their records must read back as (tests/test_convert_*.py)."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np

from resumax.convert.formats.tfrecord import frame
from resumax.records import tfexample

FORMATS = ("jsonl", "csv", "parquet", "tfrecord", "imagefolder", "hf", "npz")


def rows(start: int, stop: int) -> list[dict]:
    """The logical rows i in start..stop-1: an id, a text, a score and a pair of floats."""
    return [
        {"id": i, "text": f"row {i}", "score": i / 4, "pair": [float(i), -float(i)]}
        for i in range(start, stop)
    ]


def write_jsonl(directory, num_files: int = 2, per_file: int = 100) -> list[str]:
    paths = []
    for file in range(num_files):
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"part-{file}.jsonl")
        with open(path, "w") as out:
            for row in rows(file * per_file, (file + 1) * per_file):
                out.write(json.dumps(row) + "\n")
        paths.append(path)
    return paths


def write_csv(directory, num_files: int = 2, per_file: int = 100) -> list[str]:
    paths = []
    for file in range(num_files):
        path = os.path.join(directory, f"part-{file}.csv")
        with open(path, "w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["id", "text", "score"])
            for row in rows(file * per_file, (file + 1) * per_file):
                writer.writerow([row["id"], row["text"], row["score"]])
        paths.append(path)
    return paths


def arrow_table(start: int, stop: int):
    import pyarrow as pa

    part = rows(start, stop)
    return pa.table(
        {
            "id": pa.array([row["id"] for row in part], pa.int32()),
            "text": pa.array([row["text"] for row in part], pa.string()),
            "score": pa.array([row["score"] for row in part], pa.float64()),
            "pair": pa.array([row["pair"] for row in part], pa.list_(pa.float32())),
        }
    )


def write_parquet(directory, num_files: int = 2, per_file: int = 100) -> list[str]:
    import pyarrow.parquet as pq

    paths = []
    for file in range(num_files):
        path = os.path.join(directory, f"part-{file}.parquet")
        pq.write_table(arrow_table(file * per_file, (file + 1) * per_file), path, row_group_size=64)
        paths.append(path)
    return paths


def example_bytes(row: dict) -> bytes:
    feature = tfexample.Feature
    example = tfexample.Example()
    features = example.features.feature
    features["id"].CopyFrom(feature(int64_list={"value": [row["id"]]}))
    features["text"].CopyFrom(feature(bytes_list={"value": [row["text"].encode()]}))
    features["pair"].CopyFrom(feature(float_list={"value": row["pair"]}))
    return example.SerializeToString()


def write_tfrecord(directory, num_files: int = 2, per_file: int = 100) -> list[str]:
    paths = []
    for file in range(num_files):
        path = os.path.join(directory, f"part-{file}.tfrecord")
        with open(path, "wb") as out:
            for row in rows(file * per_file, (file + 1) * per_file):
                out.write(frame(example_bytes(row)))
        paths.append(path)
    return paths


def png(value: int, size: int = 4) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_imagefolder(directory, per_class: int = 5) -> list[str]:
    root = os.path.join(directory, "images")
    for label, name in enumerate(["cat", "dog", "emu"]):
        os.makedirs(os.path.join(root, name))
        for i in range(per_class):
            with open(os.path.join(root, name, f"{i:03d}.png"), "wb") as out:
                out.write(png(label * 50 + i))
    return [root]


def write_hf(directory, per_file: int = 200) -> list[str]:
    import datasets

    path = os.path.join(directory, "hf_train")
    datasets.Dataset(arrow_table(0, per_file)).save_to_disk(path)
    return [path]


def write_npz(directory, num_files: int = 2, per_file: int = 100) -> list[str]:
    paths = []
    for file in range(num_files):
        part = rows(file * per_file, (file + 1) * per_file)
        path = os.path.join(directory, f"part-{file}.npz")
        np.savez(
            path,
            id=np.array([row["id"] for row in part], np.int64),
            pair=np.array([row["pair"] for row in part], np.float32),
        )
        paths.append(path)
    return paths


def write_inputs(format: str, directory) -> list[str]:
    """Inputs of `format` in `directory` (200 records, 15 for the image folder)."""
    os.makedirs(directory, exist_ok=True)
    return globals()[f"write_{format}"](directory)
