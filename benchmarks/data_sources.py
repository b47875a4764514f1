"""Records/s of the ways into a pipeline: our ArrayRecord reader, Grain's ArrayRecordDataSource
through DataSourceModule, tf.train.Example records (TFExample) and TFDS-style PNG records.

    python benchmarks/data_sources.py [--records 20000] [--batches 200]
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
from grain.sources import ArrayRecordDataSource
from PIL import Image
from rates import items_per_second

import resumax
from resumax.records.tfexample import Example
from resumax.sources.tfds import TFDSDecode

BATCH = 256


def example_record(i: int, image: bytes | None) -> bytes:
    example = Example()
    features = example.features.feature
    features["label"].int64_list.value.append(i % 10)
    if image is None:
        features["pixels"].float_list.value.extend(np.full(64, i, np.float32).tolist())
    else:
        features["image"].bytes_list.value.append(image)
    return example.SerializeToString()


def png_of(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((28, 28), i % 256, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def records_per_second(source: resumax.RecordSource, batches: int) -> float:
    return items_per_second(resumax.Pipeline(source, batch_size=BATCH, prefetch=0), batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    config = resumax.ArrayRecordSourceConfig(seed=0, shuffle_files=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        native = [
            {"label": np.int64(i % 10), "pixels": np.full(64, i, np.float32)}
            for i in range(args.records)
        ]
        resumax.write_array_record(root / "native.array_record", native)
        resumax.write_array_record(
            root / "example.array_record", (example_record(i, None) for i in range(args.records))
        )
        images = [png_of(i) for i in range(256)]
        resumax.write_array_record(
            root / "tfds.array_record",
            (example_record(i, images[i % 256]) for i in range(args.records)),
        )
        spec = {"label": ("int64", ()), "pixels": ("float32", (64,))}
        tfds_features = {
            "label": {"classLabel": {"numClasses": "10"}},
            "image": {"image": {"shape": {"dimensions": ["28", "28", "1"]}, "dtype": "uint8"}},
        }
        native_path = str(root / "native.array_record")
        sources = {
            "ArrayRecordSourceModule (msgpack)": resumax.ArrayRecordSourceModule(
                config, native_path
            ),
            "DataSourceModule(grain ArrayRecordDataSource)": resumax.DataSourceModule(
                config, ArrayRecordDataSource([native_path]), decode=resumax.decode
            ),
            "ArrayRecordSourceModule + TFExample": resumax.ArrayRecordSourceModule(
                config, root / "example.array_record", decode=resumax.TFExample(spec)
            ),
            "TFDS decode (Example + 28x28 PNG)": resumax.ArrayRecordSourceModule(
                config, root / "tfds.array_record", decode=TFDSDecode(tfds_features)
            ),
        }
        rates = {name: records_per_second(source, args.batches) for name, source in sources.items()}
    baseline = next(iter(rates.values()))
    print(f"{args.records} records, shuffled, batches of {BATCH}, no prefetch, 1 process")
    for name, rate in rates.items():
        print(f"  {name:48s} {rate:>10,.0f} records/s  ({rate / baseline:.2f}x)")


if __name__ == "__main__":
    main()
