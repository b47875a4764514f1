"""`resumax convert --resume`: after a kill -9 mid-conversion, a second run keeps the shards the
first completed and writes the rest, byte-identical to an uninterrupted run; and conversion to a
bucket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resumax import ArrayRecordSourceConfig, ArrayRecordSourceModule, cli
from resumax.convert import convert, shards
from resumax.errors import DataSourceError
from tests.convert_inputs import write_jsonl


def without_file_fields(index_path) -> dict:
    """An index without the fields that describe the files on disk."""
    payload = json.loads(Path(index_path).read_text())
    payload.pop("mtime_ns")
    payload.pop("inodes", None)
    return payload


def wait_for(condition, seconds: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the conversion ended (status {process.returncode}) too soon")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the conversion")
        time.sleep(0.005)


@pytest.mark.slow
def test_kill_9_mid_conversion_then_resume_is_byte_identical_to_an_uninterrupted_run(tmp_path):
    inputs = write_jsonl(tmp_path / "in", num_files=4, per_file=10_000)
    reference = convert(inputs, str(tmp_path / "ref/train"), num_shards=8)
    out = tmp_path / "out"
    arguments = [*inputs, str(out / "train"), "--shards", "8", "--no-progress"]
    process = subprocess.Popen([sys.executable, "-m", "resumax", "convert", *arguments])
    wait_for(lambda: len(list(out.glob("*.done"))) >= 2, 120, process)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    completed = sorted(out.glob("*.done"))
    assert 2 <= len(completed) < 8 and not (out / "train.index.json").exists()
    shard_names = [path.name.removesuffix(".done") for path in completed]
    kept = {name: os.stat(out / f"{name}.partial").st_mtime_ns for name in shard_names}

    assert cli.main(["convert", *arguments, "--resume"]) == 0
    for ours, theirs in zip(sorted(out.glob("train-*")), reference.paths, strict=True):
        assert ours.read_bytes() == Path(theirs).read_bytes()
    index = json.loads((out / "train.index.json").read_text())
    mtimes = dict(zip(index["names"], index["mtime_ns"], strict=True))
    assert all(mtimes[name] == mtime for name, mtime in kept.items())  # not written again
    assert without_file_fields(out / "train.index.json") == {
        **without_file_fields(reference.index),
        "names": index["names"],
    }
    assert sorted(os.listdir(out)) == sorted([*mtimes, "train.index.json"])


def test_resume_refuses_a_shard_written_from_other_records(tmp_path):
    inputs = write_jsonl(tmp_path, num_files=1)
    prefix = str(tmp_path / "train")
    shards.write_shard(prefix, 0, 2, [b"a record of another conversion"])
    with pytest.raises(DataSourceError, match="holds other records.*without --resume"):
        convert(inputs, prefix, num_shards=2, resume=True)
    done = convert(inputs, prefix, num_shards=2)  # starting over replaces it
    assert len(ArrayRecordSourceModule(ArrayRecordSourceConfig(), done.paths)) == 100


def test_resume_with_nothing_to_resume_writes_every_shard(tmp_path):
    inputs = write_jsonl(tmp_path, num_files=1)
    done = convert(inputs, str(tmp_path / "train"), num_shards=3, resume=True)
    assert len(ArrayRecordSourceModule(ArrayRecordSourceConfig(), done.paths)) == 100
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["part-0.jsonl", "train.index.json", *(os.path.basename(p) for p in done.paths)]
    )


def test_convert_to_a_bucket_uploads_the_set_with_its_index_metadata(
    tmp_path, s3_server, s3_bucket
):
    local = write_jsonl(tmp_path, num_files=1)
    options = s3_server.storage_options
    done = convert(local, f"{s3_bucket}/data/train", num_shards=2, storage_options=options)
    assert done.paths == [f"{s3_bucket}/data/train-0000{i}-of-00002.array_record" for i in range(2)]
    fs = s3_server.filesystem()
    index = json.loads(fs.cat_file(f"{s3_bucket[5:]}/data/train.index.json"))
    assert index["num_records"] == [50, 50]
    assert index["metadata"]["sources"][0]["path"] == local[0]
    source = ArrayRecordSourceModule(
        ArrayRecordSourceConfig(), f"{s3_bucket}/data/train-*", storage_options=options
    )
    assert int(source[99]["id"]) == 99


def test_inputs_in_a_bucket_are_read_through_fsspec(tmp_path, s3_server, s3_bucket):
    local = write_jsonl(tmp_path / "in")
    fs = s3_server.filesystem()
    for path in local:
        fs.put_file(path, f"{s3_bucket[5:]}/in/{os.path.basename(path)}")
    options = s3_server.storage_options
    done = convert([f"{s3_bucket}/in/*.jsonl"], str(tmp_path / "t"), storage_options=options)
    reference = convert(local, str(tmp_path / "ref"))
    assert Path(done.paths[0]).read_bytes() == Path(reference.paths[0]).read_bytes()
    sources = json.loads(Path(done.index).read_text())["metadata"]["sources"]
    assert [source["path"] for source in sources] == [
        f"{s3_bucket}/in/part-0.jsonl",
        f"{s3_bucket}/in/part-1.jsonl",
    ]
