"""Sources over s3:// and gs:// sets, against real servers on 127.0.0.1: the batches of the local
copy, exact resume across copies, the cache bound sampled while reading, downloads per epoch
counted in the server's request log, evicted copies, startup and the cache limit."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time

import pytest

from resumax import write_array_record
from resumax.errors import ConfigError
from resumax.pipeline import Pipeline
from resumax.sources import ArrayRecordSourceConfig, ArrayRecordSourceModule
from resumax.sources.files.remote import parse_bytes
from tests.conftest import assert_batches_equal, batches_and_state, take
from tests.remote_sets import (
    BATCH,
    EXAMPLES,
    NUM_SHARDS,
    ORDERS,
    PER_SHARD,
    SET_BYTES,
    SHARD_BYTES,
    CacheSampler,
    _write_set,
    assert_cache_trustworthy,
    cache_files,
    config,
    evicted_but_open,
    local_batches,
    read_all,
    remote,
    shard_name,
)

pytestmark = pytest.mark.usefixtures("_downloads_end_with_their_test")


# --- The batches of the local copy -----------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("order", ["global", "window", "unshuffled"])
def test_batches_equal_the_local_copy_within_the_cache_limit(
    s3_set, local_set, tmp_path, server_log, order, num_workers
):
    cfg = config(order)
    limit = ORDERS[order][1]
    source = remote(s3_set, cfg, tmp_path / "cache", cache_limit=limit, fetch_threads=4)
    assert source.fingerprint == ArrayRecordSourceModule(cfg, local_set).fingerprint
    with CacheSampler(tmp_path / "cache") as sampler:
        batches = read_all(source, num_workers)
    assert_batches_equal(batches, local_batches(local_set, cfg))
    assert 0 < sampler.peak <= parse_bytes(limit), sampler.at_peak
    assert sampler.samples > 10
    gets = server_log.shard_gets()
    if order == "global":  # the set fits: each shard once, nothing in epoch 2
        assert gets == {shard_name(n): 1 for n in range(NUM_SHARDS)}
    else:  # larger than the limit: at most once per epoch
        assert set(gets) == {shard_name(n) for n in range(NUM_SHARDS)}
        assert max(gets.values()) <= 2, gets
    assert cache_files(tmp_path / "cache", "tmp") == []
    assert_cache_trustworthy(tmp_path / "cache")


@pytest.mark.parametrize(("order", "num_workers"), [("global", 0), ("window", 2)])
def test_gcs_batches_equal_the_local_copy(gcs_set, local_set, tmp_path, order, num_workers):
    cfg = config(order)
    limit = ORDERS[order][1]
    source = remote(gcs_set, cfg, tmp_path / "cache", cache_limit=limit, fetch_threads=4)
    assert source.fingerprint == ArrayRecordSourceModule(cfg, local_set).fingerprint
    with CacheSampler(tmp_path / "cache") as sampler:
        batches = read_all(source, num_workers)
    assert_batches_equal(batches, local_batches(local_set, cfg))
    assert 0 < sampler.peak <= parse_bytes(limit), sampler.at_peak
    if order == "global":
        assert source._cache.downloaded_bytes == SET_BYTES
        again = remote(gcs_set, cfg, tmp_path / "cache", cache_limit=limit)
        assert_batches_equal(read_all(again), batches)
        assert again._cache.downloaded_bytes == 0


# --- Exact resume ----------------------------------------------------------------------------


def test_resume_from_the_bucket_is_exact(s3_set, local_set, tmp_path):
    cfg = config("window")
    limit = ORDERS["window"][1]

    def source(name):
        return remote(s3_set, cfg, tmp_path / name, cache_limit=limit)

    full = local_batches(local_set, cfg)
    first, state = batches_and_state(Pipeline(source("a"), batch_size=BATCH), 70)
    pipeline = Pipeline(source("b"), batch_size=BATCH)
    pipeline.set_state(state)
    assert_batches_equal(first + list(pipeline), full)


@pytest.mark.parametrize("direction", ["local to bucket", "bucket to local"])
def test_resume_across_the_local_and_the_bucket_copy(s3_set, local_set, tmp_path, direction):
    """The state names neither paths nor endpoints: a run saved while reading one copy resumes
    on the other, and the fingerprints agree."""
    cfg = config("window")

    def bucket_source():
        return remote(s3_set, cfg, tmp_path / "cache", cache_limit=ORDERS["window"][1])

    def local_source():
        return ArrayRecordSourceModule(cfg, local_set)

    save, resume = (
        (local_source, bucket_source)
        if direction == "local to bucket"
        else (bucket_source, local_source)
    )
    full = local_batches(local_set, cfg)
    first, state = batches_and_state(Pipeline(save(), batch_size=BATCH), 130)
    assert json.dumps(state).find("127.0.0.1") == -1 and str(tmp_path) not in json.dumps(state)
    pipeline = Pipeline(resume(), batch_size=BATCH)
    pipeline.set_state(state)
    assert_batches_equal(first + list(pipeline), full)


# --- Downloads per epoch ---------------------------------------------------------------------


def test_a_set_that_fits_downloads_nothing_from_epoch_two(s3_set, local_set, tmp_path, server_log):
    cfg = config("global", num_epochs=3)
    source = remote(s3_set, cfg, tmp_path / "cache", cache_limit=SET_BYTES, fetch_threads=3)
    iterator = iter(Pipeline(source, batch_size=BATCH))
    epoch_batches = NUM_SHARDS * PER_SHARD // BATCH
    take(iterator, epoch_batches)
    after_first = sum(server_log.shard_gets().values())
    rest = list(iterator)
    assert len(rest) == 2 * epoch_batches
    assert server_log.shard_gets() == {shard_name(n): 1 for n in range(NUM_SHARDS)}
    assert after_first == NUM_SHARDS
    assert source._cache.downloaded_bytes == SET_BYTES
    # A later run over the same cache directory downloads nothing either.
    again = remote(s3_set, cfg, tmp_path / "cache", cache_limit=SET_BYTES)
    assert_batches_equal(read_all(again), local_batches(local_set, cfg))
    assert again._cache.downloaded_bytes == 0
    assert sum(server_log.shard_gets().values()) == NUM_SHARDS


def test_a_download_renamed_while_the_cache_is_counted_is_counted_once(s3_set, tmp_path):
    """Between the cache's listing of tmp/ and of shards/, a finished download is in both; at a
    limit the whole set just fits, counting it twice evicted a shard still to be read."""
    source = remote(s3_set, config("global"), tmp_path / "cache", cache_limit=SET_BYTES)
    cache = source._cache
    for file_id in range(NUM_SHARDS - 1):
        cache.fetch(file_id)
    renaming = (
        cache.path(0)
        .replace("/shards/", "/tmp/")
        .replace(".array_record", f".{os.getpid()}.0.partial")
    )
    shutil.copyfile(cache.path(0), renaming)  # the state mid-rename: in tmp/ and in shards/
    cache.fetch(NUM_SHARDS - 1, evict_after=0)  # ahead of need: NoRoom if it had to evict
    os.remove(renaming)
    assert all(os.path.exists(cache.path(f)) for f in range(NUM_SHARDS))
    assert cache.downloaded_bytes == SET_BYTES


def test_a_set_larger_than_the_limit_downloads_at_most_once_per_epoch(
    s3_set, local_set, tmp_path, server_log
):
    cfg = config("window", num_epochs=3)
    limit = 5 * SHARD_BYTES
    source = remote(s3_set, cfg, tmp_path / "cache", cache_limit=limit, fetch_threads=4)
    with CacheSampler(tmp_path / "cache") as sampler:
        batches = read_all(source)
    assert_batches_equal(batches, local_batches(local_set, cfg))
    gets = server_log.shard_gets()
    assert max(gets.values()) <= 3 and sum(gets.values()) <= 3 * NUM_SHARDS, gets
    assert sum(gets.values()) > 2 * NUM_SHARDS  # it did have to download again
    assert sampler.peak <= limit, sampler.at_peak


def _children(pid: int) -> list[int]:
    """The processes started by `pid` and their own, recursively."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{name}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            if parent == pid:
                found += [int(name), *_children(int(name))]
    return found


def test_evicted_shards_are_closed_by_the_next_read(s3_set, tmp_path):
    """A reader of an evicted copy is closed at the process's next read: it holds open at most
    the few copies evicted since, never every copy ever evicted (16 here)."""
    limit = ORDERS["window"][1]
    source = remote(
        s3_set,
        config("window", num_epochs=3),
        tmp_path / "cache",
        cache_limit=limit,
        fetch_threads=2,
    )
    iterator = iter(Pipeline(source, batch_size=BATCH, prefetch=0))
    held = []
    try:
        for _ in range(290):
            next(iterator)
            held.append(len(evicted_but_open()))
    finally:
        iterator.close()
    assert max(held) <= 4, held
    assert len(cache_files(tmp_path / "cache", "shards")) * SHARD_BYTES <= limit


def test_workers_hold_no_evicted_shard_open(s3_set, tmp_path):
    limit = ORDERS["window"][1]
    source = remote(s3_set, config("window", num_epochs=3), tmp_path / "cache", cache_limit=limit)
    iterator = iter(Pipeline(source, batch_size=BATCH, num_workers=2))
    try:
        take(iterator, 250)
        held = {pid: len(evicted_but_open(pid)) for pid in _children(os.getpid())}
    finally:
        iterator.close()
        del iterator
    assert sum(held.values()) <= 4, held


def test_closing_the_iterator_stops_reading_ahead(s3_set, tmp_path):
    before = set(threading.enumerate())
    source = remote(
        s3_set,
        config("window"),
        tmp_path / "cache",
        cache_limit=ORDERS["window"][1],
        fetch_threads=2,
    )
    iterator = iter(Pipeline(source, batch_size=BATCH))
    try:
        take(iterator, 20)
        iterator.close()
        deadline = time.monotonic() + 1.5
        while True:
            running = [t for t in set(threading.enumerate()) - before if t.name == "resumax-fetch"]
            if not running or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        pinned = source._cache.pinned()
    finally:
        iterator.close()
        del iterator
    assert running == [] and pinned == set()


# --- Startup ---------------------------------------------------------------------------------


def test_startup_downloads_no_shard_when_the_index_exists(
    s3_server, s3_bucket, tmp_path, server_log
):
    pattern = _write_set(s3_server, s3_bucket)
    server_log.requests.clear()
    source = remote((s3_server, pattern), config("global"), tmp_path / "cache")
    assert len(source) == NUM_SHARDS * PER_SHARD
    assert list(source.file_record_counts()) == [PER_SHARD] * NUM_SHARDS
    assert cache_files(tmp_path / "cache", "shards") == []
    assert cache_files(tmp_path / "cache", "tmp") == []
    name = s3_bucket.split("://")[1]
    requests = [request for request in server_log.requests if name in request[1]]
    assert [path for _, path, _ in requests if ".array_record" in path.split("?")[0]] == []
    gets = [path for method, path, _ in requests if method == "GET"]
    assert sum("train.index.json" in path for path in gets) == 1
    assert len(requests) <= 3, requests  # one listing, one index GET (and its HEAD)


def test_without_an_index_one_log_line_points_to_resumax_index(
    s3_server, s3_bucket, local_set, tmp_path, caplog
):
    pattern = _write_set(s3_server, s3_bucket)
    s3_server.filesystem().rm(f"{s3_bucket}/train.index.json".split("://")[1])
    s3_server.filesystem().invalidate_cache()
    cfg = config("global")
    with caplog.at_level(logging.INFO, logger="resumax"):
        source = remote((s3_server, pattern), cfg, tmp_path / "cache", cache_limit="4MB")
    lines = [record for record in caplog.records if "resumax index" in record.getMessage()]
    assert len(lines) == 1 and lines[0].name == "resumax"
    assert list(source.file_record_counts()) == [PER_SHARD] * NUM_SHARDS
    assert source.fingerprint == ArrayRecordSourceModule(cfg, local_set).fingerprint
    assert_batches_equal(read_all(source), local_batches(local_set, cfg))
    assert_cache_trustworthy(tmp_path / "cache")


def test_without_an_index_objects_not_named_as_shards_are_not_sent_to_resumax_index(
    s3_server, s3_bucket, tmp_path, caplog
):
    options = s3_server.storage_options
    write_array_record(f"{s3_bucket}/one.array_record", EXAMPLES[:20], storage_options=options)
    with caplog.at_level(logging.INFO, logger="resumax"):
        source = remote((s3_server, f"{s3_bucket}/one.array_record"), config("global"), tmp_path)
    (line,) = [r.getMessage() for r in caplog.records if "no shard index" in str(r.msg)]
    assert "indexes -NNNNN-of-MMMMM sets only" in line and "write_shards" in line
    assert len(source) == 20


# --- The cache limit -------------------------------------------------------------------------


def test_a_limit_too_small_for_the_global_shuffle_is_refused_naming_both_ways_out(
    s3_set, tmp_path, server_log
):
    with pytest.raises(ConfigError) as caught:
        remote(s3_set, config("global"), tmp_path / "cache", cache_limit="1MB")
    message = str(caught.value)
    assert str(SET_BYTES) in message and "1000000" in message
    assert "shuffle_window" in message and "cache_limit" in message
    assert server_log.shard_gets() == {}
    # The same limit reads the set with a shuffle_window.
    remote(s3_set, config("window"), tmp_path / "cache", cache_limit="1MB")


def test_a_limit_too_small_for_one_window_is_refused(s3_set, tmp_path):
    cfg = ArrayRecordSourceConfig(seed=5, shuffle_files=True, shuffle_window=400)
    with pytest.raises(ConfigError, match=r"shuffle_window.*cache_limit"):
        remote(s3_set, cfg, tmp_path / "cache", cache_limit=3 * SHARD_BYTES)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("20GB", 20 * 10**9), ("512MiB", 512 * 2**20), ("1.5 TB", 15 * 10**11), ("4096", 4096)],
)
def test_cache_limit_strings_parse(s3_set, tmp_path, text, expected):
    assert parse_bytes(text) == expected
    if expected >= SET_BYTES:
        source = remote(s3_set, config("global"), tmp_path / "cache", cache_limit=text)
        assert source._cache.settings.limit == expected


@pytest.mark.parametrize(
    "keywords",
    [
        {"cache_limit": "20 parsecs"},
        {"cache_limit": ""},
        {"cache_limit": "-5GB"},
        {"cache_limit": 0},
        {"cache_limit": -1},
        {"cache_limit": True},
        {"cache_limit": 1.5e9},
        {"fetch_threads": 0},
        {"fetch_threads": 2.0},
        {"fetch_timeout": 0},
        {"fetch_timeout": "10"},
    ],
)
def test_bad_cache_settings_are_config_errors(s3_set, tmp_path, keywords):
    name = next(iter(keywords))
    with pytest.raises(ConfigError, match=name):
        remote(s3_set, config("window"), tmp_path / "cache", **keywords)
