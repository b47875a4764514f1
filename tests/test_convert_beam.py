"""`resumax convert --engine beam` and `resumax.beam.WriteShards`: the same files and index as the
local engine, byte for byte, whatever the runner and the number of workers."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from array_record.python.array_record_module import ArrayRecordReader

import resumax
from resumax import cli
from resumax.convert import convert, shards
from resumax.errors import DataSourceError
from tests.convert_inputs import FORMATS, write_inputs, write_jsonl

beam = pytest.importorskip("apache_beam")
from resumax.beam import WriteShards  # noqa: E402 (needs apache_beam)

pytestmark = pytest.mark.slow
# Runners that work offline (2.78's default DirectRunner first tries to download Prism).
IN_PROCESS = ["--runner=FnApiRunner"]
TWO_THREADS = [*IN_PROCESS, "--direct_num_workers=2", "--direct_running_mode=multi_threading"]
TWO_PROCESSES = [*IN_PROCESS, "--direct_num_workers=2", "--direct_running_mode=multi_processing"]


def file_bytes(paths) -> list[bytes]:
    return [Path(path).read_bytes() for path in paths]


def index_without_file_fields(path) -> dict:
    payload = json.loads(Path(path).read_text())
    for field in ("names", "mtime_ns", "inodes"):
        payload.pop(field, None)
    return payload


def assert_same_set(ours, theirs) -> None:
    assert file_bytes(ours.paths) == file_bytes(theirs.paths)
    assert index_without_file_fields(ours.index) == index_without_file_fields(theirs.index)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """One conversion by 2 Beam worker processes (shared by the tests: each run costs ~10 s)."""
    directory = tmp_path_factory.mktemp("beam")
    inputs = write_jsonl(directory / "in", num_files=4, per_file=250)
    local = convert(inputs, str(directory / "local/train"), num_shards=3)
    on_beam = convert(
        inputs,
        str(directory / "beam/train"),
        num_shards=3,
        engine="beam",
        pipeline_options=TWO_PROCESSES,
    )
    return local, on_beam


def test_two_worker_processes_write_the_local_engines_bytes(two_processes):
    local, on_beam = two_processes
    assert_same_set(on_beam, local)
    assert sorted(os.listdir(os.path.dirname(on_beam.index))) == sorted(
        [*map(os.path.basename, on_beam.paths), "train.index.json"]
    )


@pytest.mark.parametrize("format", FORMATS)
def test_every_format_on_beam_matches_the_local_engine_byte_for_byte(tmp_path, format):
    inputs = write_inputs(format, tmp_path / "in")
    local = convert(inputs, str(tmp_path / "local/t"), num_shards=4)
    on_beam = convert(
        inputs, str(tmp_path / "beam/t"), num_shards=4, engine="beam", pipeline_options=TWO_THREADS
    )
    assert_same_set(on_beam, local)


def test_one_worker_and_repeated_runs_write_the_same_bytes(tmp_path):
    inputs = write_inputs("parquet", tmp_path / "in")
    runs = [
        convert(inputs, str(tmp_path / f"{n}/t"), num_shards=5, engine="beam", pipeline_options=o)
        for n, o in enumerate([IN_PROCESS, TWO_THREADS, IN_PROCESS])
    ]
    for run in runs[1:]:
        assert_same_set(run, runs[0])


def test_the_command_line_passes_what_follows_the_double_dash_to_beam(tmp_path, capsys):
    inputs = write_jsonl(tmp_path / "in")
    prefix = str(tmp_path / "out/t")
    argv = ["convert", *inputs, prefix, "--engine", "beam", "--shards", "2", "--", *IN_PROCESS]
    assert cli.main(argv) == 0
    assert "wrote 200 records" in capsys.readouterr().out
    assert resumax.ArrayRecordSourceModule(resumax.ArrayRecordSourceConfig(), f"{prefix}-*")


def test_resume_on_beam_keeps_the_shards_an_earlier_attempt_completed(tmp_path):
    inputs = write_jsonl(tmp_path / "in")
    reference = convert(inputs, str(tmp_path / "ref/t"), num_shards=2)
    prefix = str(tmp_path / "out/t")
    first_shard = file_bytes(reference.paths[:1])[0]
    reader = ArrayRecordReader(reference.paths[0])
    records = reader.read(list(range(reader.num_records())))
    reader.close()
    shards.write_shard(prefix, 0, 2, records)  # what an interrupted attempt left
    kept = os.stat(f"{prefix}-00000-of-00002.array_record.partial")
    on_beam = convert(
        inputs, prefix, num_shards=2, engine="beam", pipeline_options=IN_PROCESS, resume=True
    )
    assert os.stat(on_beam.paths[0]).st_mtime_ns == kept.st_mtime_ns
    assert file_bytes(on_beam.paths)[0] == first_shard
    assert_same_set(on_beam, reference)


def test_a_malformed_line_fails_the_beam_run_naming_file_and_line(tmp_path):
    paths = write_jsonl(tmp_path / "in")
    lines = Path(paths[1]).read_text().splitlines()
    lines[40] = "{oops"
    Path(paths[1]).write_text("\n".join(lines) + "\n")
    with pytest.raises(Exception, match=r"part-1\.jsonl, line 41: not JSON"):
        convert(paths, str(tmp_path / "out/t"), engine="beam", pipeline_options=IN_PROCESS)
    assert not (tmp_path / "out/t.index.json").exists()


def test_a_failed_run_on_two_processes_removes_its_partial_files_as_the_local_engine_does(
    tmp_path,
):
    paths = write_jsonl(tmp_path / "in", num_files=4, per_file=100)
    lines = Path(paths[3]).read_text().splitlines()
    lines[90] = "{oops"  # in the last shard: the others are written before it fails
    Path(paths[3]).write_text("\n".join(lines) + "\n")
    for engine, options in (("local", []), ("beam", TWO_PROCESSES)):
        out = tmp_path / engine
        with pytest.raises(DataSourceError, match=r"part-3\.jsonl, line 91: not JSON"):
            convert(paths, str(out / "t"), num_shards=4, engine=engine, pipeline_options=options)
        assert os.listdir(out) == []


def test_write_shards_in_a_users_pipeline_matches_write_shards(tmp_path):
    examples = [{"x": resumax.records.codec.np.int64(i), "name": f"n{i}"} for i in range(103)]
    expected = resumax.write_shards(tmp_path / "plain", examples, 4)
    pairs = list(enumerate(examples))
    random.Random(0).shuffle(pairs)
    options = beam.options.pipeline_options.PipelineOptions(TWO_THREADS)
    with beam.Pipeline(options=options) as pipeline:
        _ = pipeline | beam.Create(pairs) | WriteShards(str(tmp_path / "beam"), 4)
    ours = sorted(str(path) for path in tmp_path.glob("beam-*.array_record"))
    assert file_bytes(ours) == file_bytes(expected)
    index = json.loads((tmp_path / "beam.index.json").read_text())
    assert index["num_records"] == [25, 26, 26, 26] and "metadata" not in index


def test_write_shards_refuses_indices_that_skip_or_repeat(tmp_path):
    pairs = [(0, b"a"), (1, b"b"), (1, b"c")]
    with (
        pytest.raises(Exception, match="index 2 is missing or repeated"),
        beam.Pipeline(
            options=beam.options.pipeline_options.PipelineOptions(IN_PROCESS)
        ) as pipeline,
    ):
        _ = pipeline | beam.Create(pairs) | WriteShards(str(tmp_path / "t"), 1)
    assert not (tmp_path / "t.index.json").exists()


def test_skipped_bad_records_give_the_same_shards_on_beam(tmp_path):
    paths = write_jsonl(tmp_path / "in", num_files=3, per_file=50)
    for path, line in ((paths[0], 49), (paths[1], 0), (paths[1], 20)):
        lines = Path(path).read_text().splitlines()
        lines[line] = "not json"
        Path(path).write_text("\n".join(lines) + "\n")
    local = convert(paths, str(tmp_path / "local/t"), num_shards=4, skip_bad=3)
    on_beam = convert(
        paths,
        str(tmp_path / "beam/t"),
        num_shards=4,
        skip_bad=3,
        engine="beam",
        pipeline_options=TWO_THREADS,
    )
    assert_same_set(on_beam, local)
    assert local.num_records == 147


def test_beam_workers_upload_to_a_bucket_the_local_engines_objects(tmp_path, s3_server, s3_bucket):
    inputs = write_jsonl(tmp_path / "in")
    options = s3_server.storage_options
    local = convert(inputs, f"{s3_bucket}/local/t", num_shards=3, storage_options=options)
    on_beam = convert(
        inputs,
        f"{s3_bucket}/beam/t",
        num_shards=3,
        engine="beam",
        pipeline_options=TWO_THREADS,
        storage_options=options,
    )
    fs = s3_server.filesystem()
    assert [fs.cat_file(url) for url in on_beam.paths] == [fs.cat_file(url) for url in local.paths]
    indexes = [json.loads(fs.cat_file(done.index)) for done in (local, on_beam)]
    for index in indexes:
        index.pop("mtime_ns"), index.pop("names")
    assert indexes[0] == indexes[1] and indexes[1]["metadata"]["sources"][0]["path"] == inputs[0]
