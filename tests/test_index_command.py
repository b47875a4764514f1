"""`resumax index PATTERN`: the shard index of a set made by other tools, local or in a bucket,
equal to the one `write_shards` writes for the same records."""

from __future__ import annotations

import json
import logging
import os
import warnings

import numpy as np
import pytest

import resumax
from resumax import cli
from resumax.errors import DataFileNotFoundError, DataSourceError
from resumax.records import indexing, remote, shard_index, storage
from resumax.sources import ArrayRecordSourceConfig, ArrayRecordSourceModule
from tests.buckets import BucketServer
from tests.conftest import make_examples

# The columns that describe the records, the same wherever the set lives.
_CONTENT = ("format", "version", "names", "num_records", "sizes", "content_hashes")


def _write_without_index(prefix: str, examples: list, num_shards: int, **options) -> list[str]:
    """The shards `write_shards` would write, one `write_array_record` each (as another tool
    would write a set): no index."""
    bounds = np.linspace(0, len(examples), num_shards + 1).astype(int)
    paths = resumax.records.shard_paths(prefix, num_shards)
    for path, start, stop in zip(paths, bounds[:-1], bounds[1:], strict=True):
        resumax.write_array_record(path, examples[start:stop], **options)
    return paths


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(["index", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_a_local_set_indexed_matches_write_shards_and_is_not_opened(tmp_path, capsys, caplog):
    examples = make_examples(50)
    resumax.write_shards(tmp_path / "ref" / "train", examples, 3)
    paths = _write_without_index(str(tmp_path / "data" / "train"), examples, 3)
    pattern = str(tmp_path / "data" / "train-*.array_record")
    with caplog.at_level(logging.INFO, logger="resumax"):
        ArrayRecordSourceModule(ArrayRecordSourceConfig(), pattern)
    assert "no shard index describes 3 of 3" in caplog.text
    caplog.clear()

    status, out, _ = _run(capsys, pattern)
    assert status == 0
    index = tmp_path / "data" / "train.index.json"
    assert f"wrote {index} (3 files, 50 records)" in out
    assert not os.path.exists(f"{index}.partial")
    written = shard_index.read_index(str(index))
    reference = shard_index.read_index(str(tmp_path / "ref" / "train.index.json"))
    for column in _CONTENT:
        assert written[column] == reference[column], column
    stats = [os.stat(path) for path in paths]
    assert written["mtime_ns"] == [stat.st_mtime_ns for stat in stats]
    assert written[shard_index.INODES] == [stat.st_ino for stat in stats]

    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="resumax"):
        warnings.simplefilter("error")
        source = ArrayRecordSourceModule(ArrayRecordSourceConfig(), pattern)
    assert "no shard index describes" not in caplog.text
    assert len(source) == 50 and int(source[49]["id"]) == 49


def test_tfds_names_get_the_index_a_source_looks_for(tmp_path):
    for split in range(2):
        resumax.write_array_record(
            tmp_path / f"mnist-train.array_record-{split:05d}-of-00002", make_examples(5)
        )
    written = indexing.index_set(str(tmp_path / "mnist-train.array_record-*"))
    assert written == indexing.IndexedSet(
        str(tmp_path / "mnist-train.array_record.index.json"), 2, 10
    )
    lookup = shard_index.look_up(
        [str(tmp_path / f"mnist-train.array_record-{k:05d}-of-00002") for k in range(2)],
        [f"mnist-train.array_record-{k:05d}-of-00002" for k in range(2)],
        [os.path.getsize(tmp_path / f"mnist-train.array_record-{k:05d}-of-00002") for k in (0, 1)],
        [
            os.stat(tmp_path / f"mnist-train.array_record-{k:05d}-of-00002").st_mtime_ns
            for k in (0, 1)
        ],
    )
    assert lookup.counts == [5, 5] and not lookup.stale


def test_refuses_what_is_not_one_complete_set(tmp_path, capsys):
    paths = _write_without_index(str(tmp_path / "train"), make_examples(9), 3)
    _write_without_index(str(tmp_path / "test"), make_examples(4), 2)
    resumax.write_array_record(tmp_path / "extra.array_record", make_examples(1))

    status, _, err = _run(capsys, str(tmp_path / "*-of-*"))
    assert status == 2 and "matches 2 shard sets" in err and "once per set" in err
    status, _, err = _run(capsys, str(tmp_path / "t*"))
    assert status == 2 and "matches 2 shard sets" in err
    status, _, err = _run(capsys, str(tmp_path / "*.array_record"))
    assert status == 2 and "not named as shards" in err and "extra.array_record" in err
    status, _, err = _run(capsys, str(tmp_path / "nothing-*"))
    assert status == 2 and "DataFileNotFoundError" in err
    os.remove(paths[1])
    status, _, err = _run(capsys, str(tmp_path / "train-*"))
    assert status == 2 and "incomplete shard set" in err
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["extra.array_record", *map(os.path.basename, [paths[0], paths[2]])]
        + [f"test-0000{k}-of-00002.array_record" for k in range(2)]
    )


def test_a_file_that_is_not_array_record_is_named(tmp_path):
    _write_without_index(str(tmp_path / "train"), make_examples(4), 2)
    (tmp_path / "train-00001-of-00002.array_record").write_bytes(b"not a record file")
    with pytest.raises(DataSourceError, match="train-00001-of-00002.array_record"):
        indexing.index_set(str(tmp_path / "train-*"))
    assert not (tmp_path / "train.index.json").exists()


@pytest.fixture(params=["s3", "gs"])
def bucket(request) -> tuple[BucketServer, str]:
    """(server, fresh bucket URL) on each of the two servers."""
    kind = "s3" if request.param == "s3" else "gcs"
    return request.getfixturevalue(f"{kind}_server"), request.getfixturevalue(f"{kind}_bucket")


def test_a_remote_set_indexed_matches_write_shards(bucket, tmp_path, capsys):
    server, url = bucket
    examples = make_examples(40)
    resumax.write_shards(tmp_path / "train", examples, 4)
    urls = _write_without_index(
        f"{url}/data/train", examples, 4, storage_options=server.storage_options
    )
    options = json.dumps(server.storage_options)

    status, out, err = _run(capsys, f"{url}/data/train-*", "--storage-options", options)
    assert status == 0, err
    index_url = f"{url}/data/train.index.json"
    assert f"wrote {index_url} (4 files, 40 records)" in out
    uploaded = json.loads(storage.read_bytes(index_url, server.storage_options))
    reference = shard_index.read_index(str(tmp_path / "train.index.json"))
    for column in _CONTENT:
        assert uploaded[column] == reference[column], column
    assert shard_index.INODES not in uploaded
    fs, path = storage.filesystem(f"{url}/data", server.storage_options)
    listed = {info["name"]: info for info in fs.ls(path, detail=True, refresh=True)}
    keys = [storage.filesystem(shard, server.storage_options)[1] for shard in urls]
    assert uploaded["mtime_ns"] == [remote.object_mtime_ns(listed[key]) for key in keys]


def test_a_remote_incomplete_set_gets_no_index(s3_server, s3_bucket):
    options = s3_server.storage_options
    urls = _write_without_index(f"{s3_bucket}/train", make_examples(6), 3, storage_options=options)
    s3_server.filesystem().rm_file(storage.filesystem(urls[2], options)[1])
    with pytest.raises(DataSourceError, match="incomplete shard set"):
        indexing.index_set(f"{s3_bucket}/train-*", storage_options=options)
    with pytest.raises(DataFileNotFoundError, match="train.index.json"):
        storage.read_bytes(f"{s3_bucket}/train.index.json", options)


def test_a_missing_bucket_is_named(s3_server):
    with pytest.raises(DataFileNotFoundError, match="bucket 'no-such-bucket' does not exist"):
        indexing.index_set("s3://no-such-bucket/train-*", s3_server.storage_options)


def test_bad_storage_options_are_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["index", "s3://b/train-*", "--storage-options", "[1]"])
    assert "must be a JSON object" in capsys.readouterr().err
