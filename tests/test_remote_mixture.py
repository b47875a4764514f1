"""A mixture of bucket sources gives the batches of the same mixture over local copies, each
component fetching its own shards ahead of its own draws."""

from __future__ import annotations

import os

import numpy as np
import pytest

import resumax
from resumax import ArrayRecordSourceConfig, ArrayRecordSourceModule, MixtureSource, Pipeline
from resumax.errors import ConfigError
from tests.conftest import assert_batches_equal, batches_and_state

WINDOWED = ArrayRecordSourceConfig(seed=3, shuffle_files=True, shuffle_window=30)


def corpus(name: str, count: int) -> list[dict]:
    offset = 1000 if name == "code" else 0
    return [
        {"id": np.int64(offset + i), "tokens": np.full((64,), i, np.int32)} for i in range(count)
    ]


@pytest.fixture(scope="module")
def copies(tmp_path_factory, s3_server):
    """The two corpora as local shard sets and as the same sets in a bucket."""
    local = tmp_path_factory.mktemp("mixture")
    bucket = s3_server.make_bucket()
    for name, count in (("prose", 240), ("code", 120)):
        resumax.write_shards(local / name, corpus(name, count), num_shards=6)
        resumax.write_shards(
            f"{bucket}/{name}", corpus(name, count), 6, storage_options=s3_server.storage_options
        )
    yield local, bucket
    s3_server.remove_bucket(bucket)


def mixture(where: str, remote: dict | None = None, **options) -> Pipeline:
    components = {
        name: ArrayRecordSourceModule(WINDOWED, f"{where}/{name}-*.array_record", **(remote or {}))
        for name in ("prose", "code")
    }
    source = MixtureSource(ArrayRecordSourceConfig(seed=1), components, {"prose": 2, "code": 1})
    return Pipeline(source, batch_size=8, rngs=0, **options)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_mixture_of_bucket_sources_reads_as_the_local_one_and_resumes(
    tmp_path, s3_server, copies, num_workers
):
    local, bucket = copies
    shard_size = os.path.getsize(local / "prose-00000-of-00006.array_record")
    remote = {
        "storage_options": s3_server.storage_options,
        "cache_dir": tmp_path / "cache",
        "cache_limit": 12 * shard_size,
    }
    expected, _ = batches_and_state(mixture(str(local)), 40)
    first, state = batches_and_state(mixture(bucket, remote, num_workers=num_workers), 15)
    rest, _ = batches_and_state(mixture(bucket, remote, num_workers=num_workers), 25, state)
    assert_batches_equal(first + rest, expected)
    held = sum(entry.stat().st_size for entry in os.scandir(tmp_path / "cache" / "shards"))
    assert held <= 12 * shard_size


def test_components_sharing_a_cache_dir_are_checked_together(tmp_path, s3_server, copies):
    """Each component alone fits cache_limit (prose needs 4 shards at once, code 6), but a
    mixture reads both at once through the one directory: refused, unless each has its own."""
    local, bucket = copies
    limit = 8 * os.path.getsize(local / "prose-00000-of-00006.array_record")

    def components(cache_dirs: dict[str, str]) -> dict[str, ArrayRecordSourceModule]:
        return {
            name: ArrayRecordSourceModule(
                WINDOWED,
                f"{bucket}/{name}-*.array_record",
                storage_options=s3_server.storage_options,
                cache_dir=cache_dirs[name],
                cache_limit=limit,
            )
            for name in ("prose", "code")
        }

    shared = components({"prose": tmp_path / "cache", "code": tmp_path / "cache"})
    refused = r"together need .*'code' \d+, 'prose' \d+.* own cache_dir"
    with pytest.raises(ConfigError, match=refused):
        MixtureSource(ArrayRecordSourceConfig(seed=1), shared, {"prose": 2, "code": 1})
    apart = components({"prose": tmp_path / "prose", "code": tmp_path / "code"})
    source = MixtureSource(ArrayRecordSourceConfig(seed=1), apart, {"prose": 2, "code": 1})
    batches, _ = batches_and_state(Pipeline(source, batch_size=8, rngs=0), 5)
    assert len(batches) == 5


def test_components_whose_sets_fit_only_apart_keep_only_their_windows_pinned(
    tmp_path, s3_server, copies
):
    """Each set (6 shards) fits a limit of 10 shards, both do not: neither keeps all its shards
    pinned, so the two read through one directory without waiting for room."""
    local, bucket = copies
    shard_size = os.path.getsize(local / "prose-00000-of-00006.array_record")
    remote = {
        "storage_options": s3_server.storage_options,
        "cache_dir": tmp_path / "cache",
        "cache_limit": 10 * shard_size,
        "fetch_timeout": 10,
    }
    expected, _ = batches_and_state(mixture(str(local)), 60)
    batches, _ = batches_and_state(mixture(bucket, remote), 60)
    assert_batches_equal(batches, expected)
