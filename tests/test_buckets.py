"""The test servers (moto S3, fake-gcs-server) through resumax.records.storage, and writing record
sets to buckets: the shards first, the index last."""

from __future__ import annotations

import json
import os

import pytest

import resumax
from resumax.errors import DataFileNotFoundError, DataSourceError
from resumax.records import remote, shard_index, storage
from tests.buckets import BucketServer
from tests.conftest import make_examples


@pytest.fixture(params=["s3", "gs"])
def bucket(request) -> tuple[BucketServer, str]:
    """(server, fresh bucket URL) on each of the two servers."""
    kind = "s3" if request.param == "s3" else "gcs"
    return request.getfixturevalue(f"{kind}_server"), request.getfixturevalue(f"{kind}_bucket")


def _objects(server: BucketServer, url: str) -> dict[str, int]:
    """Object name -> size of every object under `url`."""
    fs, path = storage.filesystem(url, server.storage_options)
    fs.invalidate_cache()
    return {
        key.rpartition("/")[2]: info["size"] for key, info in fs.find(path, detail=True).items()
    }


def test_server_listens_on_loopback_and_round_trips(bucket, tmp_path):
    server, url = bucket
    assert server.endpoint_url.startswith("http://127.0.0.1:")
    local = tmp_path / "x.bin"
    local.write_bytes(b"records" * 100)
    remote.upload_file(str(local), f"{url}/dir/x-00000-of-00001.bin", server.storage_options)
    assert storage.read_bytes(f"{url}/dir/x-00000-of-00001.bin", server.storage_options) == (
        b"records" * 100
    )
    fs, path = storage.filesystem(f"{url}/dir/*.bin", server.storage_options)
    listed = fs.glob(path, detail=True)
    (info,) = listed.values()
    assert info["size"] == 700 and info["type"] == "file"
    assert remote.object_mtime_ns(info) > 1_600_000_000 * 10**9


def test_missing_bucket_names_it(bucket):
    server, url = bucket
    missing = f"{server.protocol}://no-such-bucket-{url[-8:]}/x.array_record"
    with pytest.raises(DataFileNotFoundError, match=f"no-such-bucket-{url[-8:]}"):
        storage.read_bytes(missing, server.storage_options)


def test_write_shards_to_bucket_as_locally(bucket, tmp_path):
    server, url = bucket
    examples = make_examples(50)
    local = resumax.write_shards(tmp_path / "train", examples, 3)
    urls = resumax.write_shards(
        f"{url}/data/train", examples, 3, storage_options=server.storage_options
    )
    assert urls == [f"{url}/data/{os.path.basename(path)}" for path in local]
    objects = _objects(server, f"{url}/data")
    assert sorted(objects) == sorted([*map(os.path.basename, local), "train.index.json"])
    for path, shard_url in zip(local, urls, strict=True):
        with open(path, "rb") as file:
            assert storage.read_bytes(shard_url, server.storage_options) == file.read()

    uploaded = json.loads(
        storage.read_bytes(f"{url}/data/train.index.json", server.storage_options)
    )
    written = shard_index.read_index(str(tmp_path / "train.index.json"))
    for column in ("format", "version", "names", "num_records", "sizes", "content_hashes"):
        assert uploaded[column] == written[column], column
    assert shard_index.INODES not in uploaded
    fs, path = storage.filesystem(f"{url}/data", server.storage_options)
    listed = {info["name"].rpartition("/")[2]: info for info in fs.ls(path, detail=True)}
    assert uploaded["mtime_ns"] == [remote.object_mtime_ns(listed[n]) for n in uploaded["names"]]
    assert all(mtime > 0 for mtime in uploaded["mtime_ns"])


def test_write_array_record_to_bucket(bucket, tmp_path):
    server, url = bucket
    examples = make_examples(20)
    assert resumax.write_array_record(tmp_path / "one.array_record", examples) == 20
    count = resumax.write_array_record(
        f"{url}/one.array_record", examples, storage_options=server.storage_options
    )
    assert count == 20
    assert storage.read_bytes(f"{url}/one.array_record", server.storage_options) == (
        (tmp_path / "one.array_record").read_bytes()
    )


def test_missing_bucket_fails_the_write_naming_it(bucket):
    server, url = bucket
    missing = f"{server.protocol}://no-such-bucket-{url[-8:]}"
    with pytest.raises(DataFileNotFoundError, match=f"bucket 'no-such-bucket-{url[-8:]}'"):
        resumax.write_shards(
            f"{missing}/train", make_examples(10), 2, storage_options=server.storage_options
        )
    with pytest.raises(DataFileNotFoundError, match=f"bucket 'no-such-bucket-{url[-8:]}'"):
        resumax.write_array_record(
            f"{missing}/one.array_record", make_examples(3), storage_options=server.storage_options
        )


def test_failure_mid_upload_leaves_no_index_and_no_shards(s3_server, s3_bucket, monkeypatch):
    """An old complete set is replaced; the upload breaks after the first shard: neither the
    old index nor any shard stays, so no mix of old and new shards looks complete."""
    options = s3_server.storage_options
    resumax.write_shards(f"{s3_bucket}/train", make_examples(30), 3, storage_options=options)
    fs = s3_server.filesystem()

    def put_one_then_fail(lpaths, rpaths, **kwargs):
        fs.put_file(lpaths[0], rpaths[0])
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(fs, "put", put_one_then_fail)
    with pytest.raises(DataSourceError, match=r"cannot write .*train-00000-of-00003.*reset"):
        resumax.write_shards(f"{s3_bucket}/train", make_examples(40), 3, storage_options=options)
    assert _objects(s3_server, s3_bucket) == {}


def test_file_url_is_a_local_path(tmp_path):
    paths = resumax.write_shards(f"file://{tmp_path}/train", make_examples(10), 2)
    assert paths == resumax.records.shard_paths(str(tmp_path / "train"), 2)
    assert (tmp_path / "train.index.json").exists()
    assert resumax.write_array_record(f"file://{tmp_path}/one.array_record", make_examples(2)) == 2
    assert (tmp_path / "one.array_record").exists()
