"""TFDS directories, `resumax inspect` and `resumax profile` on bucket URLs: the same records and
summaries as the local copy, with no shard downloaded to build a source."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import resumax
from resumax import ArrayRecordSourceConfig
from resumax.cli import main
from resumax.sources import tfds_source
from tests.conftest import make_examples
from tests.test_tfds import write_tfds_directory
from tests.training_runs import REPO


def upload_tree(server, local: str, url: str) -> None:
    fs = server.filesystem()
    for name in sorted(os.listdir(local)):
        fs.put_file(os.path.join(local, name), f"{url}/{name}")


@pytest.fixture(params=["s3", "gcs"])
def bucket(request):
    """(server, bucket URL) on S3 and on GCS."""
    server = request.getfixturevalue(f"{request.param}_server")
    return server, request.getfixturevalue(f"{request.param}_bucket")


def test_a_tfds_directory_in_a_bucket_reads_as_the_local_one(tmp_path, bucket):
    server, url = bucket
    local = write_tfds_directory(tmp_path / "local")
    upload_tree(server, local, f"{url}/tensorflow_datasets/digits/1.0.0")
    cache = tmp_path / "cache"
    config = ArrayRecordSourceConfig(seed=3, shuffle_files=True)
    remote = tfds_source(
        f"{url}/tensorflow_datasets/digits",
        "train",
        config,
        storage_options=server.storage_options,
        cache_dir=cache,
    )
    assert not os.listdir(cache / "shards")  # counts from dataset_info.json, no shard read
    with tfds_source(local, "train", config) as expected:
        assert remote.fingerprint == expected.fingerprint
        for index in range(len(expected)):
            got, want = remote[index], expected[index]
            assert got.keys() == want.keys()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
    remote.close()


def test_inspect_and_profile_take_urls(tmp_path, capsys, s3_server, s3_bucket):
    options = json.dumps(s3_server.storage_options)
    resumax.write_shards(
        f"{s3_bucket}/set/train",
        make_examples(40),
        num_shards=2,
        storage_options=s3_server.storage_options,
    )
    os.environ["RESUMAX_CACHE_DIR"] = str(tmp_path / "cache")
    try:
        glob = f"{s3_bucket}/set/train-*.array_record"
        assert main(["inspect", glob, "--storage-options", options]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["files"] == 2 and summary["records"] == 40
        assert summary["fields"]["image"]["shape"] == [4, 4, 3]
        arguments = ["profile", glob, "--storage-options", options, "--seconds", "0.2"]
        assert main([*arguments, "--batch-size", "8"]) == 0
        assert "records/s" in capsys.readouterr().out
        window = ["--shuffle-window", "8", "--cache-limit", "1MB", "--batch-size", "8"]
        assert main([*arguments, *window]) == 0
        assert "records/s" in capsys.readouterr().out
        assert main([*arguments, "--shuffle-window", "8", "--cache-limit", "10B"]) == 2
        assert "cache_limit=10 bytes is too small" in capsys.readouterr().err
    finally:
        del os.environ["RESUMAX_CACHE_DIR"]


@pytest.mark.parametrize(
    "flag", ["--shuffle-window=8", "--cache-limit=1GB", "--storage-options={}"]
)
def test_profile_refuses_path_options_with_a_config(capsys, flag):
    assert main(["profile", "--config", str(REPO / "configs" / "digits.yaml"), flag]) == 2
    assert f"give {flag.split('=')[0]} as an override of the config" in capsys.readouterr().err


def test_inspect_names_a_missing_bucket(capsys, s3_server):
    options = json.dumps(s3_server.storage_options)
    status = main(
        ["inspect", "s3://no-such-bucket-here/x-*.array_record", "--storage-options", options]
    )
    assert status == 2
    error = capsys.readouterr().err
    assert "the bucket 'no-such-bucket-here' does not exist" in error
    assert "DataFileNotFoundError" in error
