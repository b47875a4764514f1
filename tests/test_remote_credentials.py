"""Credentials a bucket refuses, or none at all: one DataSourceError naming the bucket and how to
set credentials, when a source is built, while it reads, and when a set is written. moto's S3
server (in this process) checks credentials once its auth is turned on, and then knows no key."""

from __future__ import annotations

import pytest

import resumax
from resumax.errors import DataSourceError
from resumax.pipeline import Pipeline
from resumax.sources import ArrayRecordSourceConfig, ArrayRecordSourceModule
from tests.conftest import make_examples

HOW = r"set AWS credentials \(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"


@pytest.fixture
def refuse_credentials(monkeypatch):
    """Calling it turns on the auth of moto's server: every request is refused from then on."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    def refuse() -> None:
        monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
        monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)

    return refuse


@pytest.fixture
def s3_set_in_bucket(s3_server, s3_bucket) -> str:
    """A small set written to a fresh bucket (auth off): its glob."""
    options = s3_server.storage_options
    resumax.write_shards(f"{s3_bucket}/train", make_examples(40), 2, storage_options=options)
    return f"{s3_bucket}/train-*.array_record"


def _source(pattern: str, storage_options: dict, tmp_path) -> ArrayRecordSourceModule:
    return ArrayRecordSourceModule(
        ArrayRecordSourceConfig(num_epochs=1),
        pattern,
        storage_options=storage_options,
        cache_dir=str(tmp_path / "cache"),
        fetch_timeout=20,
    )


def test_a_refused_key_is_one_error_naming_the_bucket_and_how_to_set_credentials(
    s3_server, s3_bucket, s3_set_in_bucket, refuse_credentials, tmp_path
):
    refuse_credentials()
    wrong = {**s3_server.storage_options, "key": "wrong", "secret": "wrong"}
    bucket = s3_bucket.removeprefix("s3://")
    refused = f"access was refused for the bucket '{bucket}'.*{HOW}"
    with pytest.raises(DataSourceError, match=refused):
        _source(s3_set_in_bucket, wrong, tmp_path)


def test_credentials_refused_while_reading_stop_the_read_naming_the_bucket(
    s3_server, s3_bucket, s3_set_in_bucket, refuse_credentials, tmp_path
):
    source = _source(s3_set_in_bucket, s3_server.storage_options, tmp_path)
    refuse_credentials()
    bucket = s3_bucket.removeprefix("s3://")
    with pytest.raises(DataSourceError, match=f"refused for the bucket '{bucket}'.*{HOW}"):
        list(Pipeline(source, batch_size=8))


def test_missing_credentials_are_one_error_naming_the_bucket_and_how_to_set_them(
    s3_server, s3_bucket, s3_set_in_bucket, monkeypatch, tmp_path
):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    options = dict(s3_server.storage_options)
    del options["key"], options["secret"]
    bucket = s3_bucket.removeprefix("s3://")
    with pytest.raises(
        DataSourceError, match=f"no credentials were found for the bucket '{bucket}'.*{HOW}"
    ):
        _source(s3_set_in_bucket, options, tmp_path)


def test_a_write_with_a_refused_key_names_the_bucket(
    s3_server, s3_bucket, refuse_credentials, tmp_path
):
    refuse_credentials()
    wrong = {**s3_server.storage_options, "key": "wrong", "secret": "wrong"}
    bucket = s3_bucket.removeprefix("s3://")
    with pytest.raises(DataSourceError, match=f"refused for the bucket '{bucket}'.*{HOW}"):
        resumax.write_shards(f"{s3_bucket}/train", make_examples(10), 2, storage_options=wrong)
