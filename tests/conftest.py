"""Shared fixtures: small real ArrayRecord datasets written to a temp dir."""

from __future__ import annotations

import itertools
import os

import jax
import numpy as np
import pytest

import resumax


def make_examples(count: int) -> list[dict]:
    """Distinct records: an int64 id, a small float32 feature and a uint8 image."""
    return [
        {
            "id": np.int64(i),
            "feature": np.full((3,), i, dtype=np.float32),
            "image": np.full((4, 4, 3), i % 256, dtype=np.uint8),
        }
        for i in range(count)
    ]


def take(iterator, count: int) -> list:
    """The next `count` items of a pipeline or iterator."""
    return list(itertools.islice(iterator, count))


def batches_and_state(pipeline, count: int, state: dict | None = None, skip: int = 0):
    """(`count` batches after skipping `skip`, the state after them) of `pipeline`, restored to
    `state` first when given; the iterator is closed afterwards."""
    if state is not None:
        pipeline.set_state(state)
    iterator = iter(pipeline)
    take(iterator, skip)
    batches = take(iterator, count)
    iterator.close()
    return batches, pipeline.get_state()


def assert_batches_equal(actual: list[dict], expected: list[dict]) -> None:
    """Same number of batches, same fields, dtypes and values, bit for bit."""
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype
            np.testing.assert_array_equal(got[key], want[key])


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent JAX compilation cache for the session's processes: this one, and the
    `resumax train` children and workers, which inherit the environment (a training child spends
    more time compiling its programs than training). An entry is keyed by the program and the
    backend, so a process that builds another program still compiles it."""
    directory = str(tmp_path_factory.mktemp("jax-compilation-cache"))
    settings = {
        "jax_compilation_cache_dir": directory,
        "jax_persistent_cache_min_compile_time_secs": 0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    before = {name.upper(): os.environ.get(name.upper()) for name in settings}
    for name, value in settings.items():
        os.environ[name.upper()] = str(value)
        jax.config.update(name, value)
    yield directory
    for name, value in before.items():
        if value is None:
            del os.environ[name]
        else:
            os.environ[name] = value


@pytest.fixture
def shards(tmp_path):
    """100 records over 3 shard files; returns the glob."""
    resumax.write_shards(tmp_path / "train", make_examples(100), num_shards=3)
    return str(tmp_path / "train-*.array_record")


@pytest.fixture
def single_file(tmp_path):
    """50 records in one file; returns its path."""
    path = tmp_path / "single.array_record"
    resumax.write_array_record(path, make_examples(50))
    return str(path)


# Object storage servers on 127.0.0.1 (s3_server, s3_bucket, gcs_server, gcs_bucket), the remote
# sets, and the guard tests' digits data (digits_dir).
pytest_plugins = ["tests.buckets", "tests.remote_sets", "tests.train_guard_runs"]
