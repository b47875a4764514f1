"""Sources over s3:// and gs:// sets when things go wrong: a server lost mid-epoch, a replaced
object, a missing bucket, one cache directory shared by sources and processes, and crashes
(kill -9, Ctrl-C) mid-download."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from resumax.errors import DataFileNotFoundError, DataSourceError, StateMismatchError
from resumax.pipeline import Pipeline
from resumax.sources import ArrayRecordSourceModule
from tests.buckets import LOOPBACK, BucketServer
from tests.conftest import assert_batches_equal, batches_and_state, make_examples, take
from tests.remote_sets import (
    BATCH,
    NUM_SHARDS,
    ORDERS,
    SET_BYTES,
    SHARD_BYTES,
    CacheSampler,
    Proxy,
    _write_set,
    assert_cache_trustworthy,
    cache_files,
    config,
    local_batches,
    read_all,
    remote,
    shard_name,
    within,
)

pytestmark = pytest.mark.usefixtures("_downloads_end_with_their_test")


# --- Faults ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("how", "num_workers"), [("stopped", 0), ("stopped", 2), ("hung", 0)])
def test_a_server_lost_mid_epoch_raises_naming_the_url_within_fetch_timeout(
    s3_server, tmp_path, how, num_workers
):
    """A separate server behind a proxy: stopped (every connection closed, none accepted) or
    hung (nothing answered); reading on to a shard not yet cached raises DataSourceError naming
    its URL within fetch_timeout and a few seconds, in the main process."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
    server.start()
    proxy = Proxy(server.get_host_and_port())
    iterator = None
    try:
        options = {**s3_server.storage_options, "endpoint_url": proxy.url}
        lost = BucketServer("s3", proxy.url, options, s3_server._create)
        bucket = lost.make_bucket()
        pattern = _write_set(lost, bucket)
        timeout = 1.0
        source = remote(
            (lost, pattern),
            config("window"),
            tmp_path / "cache",
            cache_limit=5 * SHARD_BYTES,
            fetch_timeout=timeout,
            fetch_threads=2,
        )
        iterator = iter(Pipeline(source, batch_size=BATCH, num_workers=num_workers))
        take(iterator, 3)
        if how == "stopped":
            proxy.stop()
            server.stop()
        else:
            proxy.freeze()
        started = time.monotonic()
        with pytest.raises(DataSourceError) as caught:
            within(timeout + 20, lambda: take(iterator, 10**6))
        elapsed = time.monotonic() - started
        assert re.search(
            rf"{bucket}/train-\d{{5}}-of-{NUM_SHARDS:05d}\.array_record", str(caught.value)
        )
        assert elapsed < timeout + 5, elapsed
    finally:
        if iterator is not None:
            within(10, iterator.close)
        proxy.stop()
        if how != "stopped":
            server.stop()


def test_an_object_replaced_with_the_same_size_is_refused_naming_it(
    s3_server, s3_bucket, local_set, tmp_path
):
    pattern = _write_set(s3_server, s3_bucket)
    fs = s3_server.filesystem()
    root = s3_bucket.split("://")[1]
    fs.pipe_file(f"{root}/{shard_name(3)}", fs.cat_file(f"{root}/{shard_name(4)}"))
    fs.invalidate_cache()
    source = remote(
        (s3_server, pattern), config("global"), tmp_path / "cache", fetch_timeout=5
    )  # the index is unchanged, sizes agree: construction cannot tell
    with pytest.raises(DataSourceError, match=rf"{s3_bucket}/{shard_name(3)}.*replaced"):
        within(30, lambda: read_all(source))
    assert shard_name(3) not in str(cache_files(tmp_path / "cache", "shards"))
    assert cache_files(tmp_path / "cache", "tmp") == []
    assert_cache_trustworthy(tmp_path / "cache")


def test_an_object_of_another_size_is_refused_at_construction(s3_server, s3_bucket, tmp_path):
    pattern = _write_set(s3_server, s3_bucket)
    fs = s3_server.filesystem()
    root = s3_bucket.split("://")[1]
    cfg = config("global")
    remote((s3_server, pattern), cfg, tmp_path / "cache")  # lists the set once in this process
    fs.pipe_file(f"{root}/{shard_name(2)}", fs.cat_file(f"{root}/{shard_name(2)}") + b"x")
    with pytest.raises(DataSourceError, match=rf"{s3_bucket}/{shard_name(2)}.*131073"):
        remote((s3_server, pattern), cfg, tmp_path / "cache")
    assert cache_files(tmp_path / "cache", "shards") == []


def test_a_reindexed_changed_object_fails_the_saved_state(s3_server, s3_bucket, tmp_path):
    """Once `resumax index` records the new content, the set's fingerprint changes: a state saved
    on the old content is refused with StateMismatchError."""
    from resumax.records import indexing

    pattern = _write_set(s3_server, s3_bucket)
    cfg = config("window")
    limit = ORDERS["window"][1]
    _, state = batches_and_state(
        Pipeline(
            remote((s3_server, pattern), cfg, tmp_path / "a", cache_limit=limit), batch_size=BATCH
        ),
        3,
    )
    fs = s3_server.filesystem()
    root = s3_bucket.split("://")[1]
    fs.pipe_file(f"{root}/{shard_name(3)}", fs.cat_file(f"{root}/{shard_name(4)}"))
    fs.invalidate_cache()
    indexing.index_set(pattern, storage_options=s3_server.storage_options)
    fs.invalidate_cache()
    pipeline = Pipeline(
        remote((s3_server, pattern), cfg, tmp_path / "b", cache_limit=limit), batch_size=BATCH
    )
    with pytest.raises(StateMismatchError):
        pipeline.set_state(state)


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_a_missing_bucket_is_one_error_naming_it(request, kind, tmp_path):
    server = request.getfixturevalue(f"{kind}_server")
    name = f"no-such-bucket-{os.urandom(4).hex()}"
    for pattern in (
        f"{server.protocol}://{name}/train-*.array_record",
        f"{server.protocol}://{name}/x.array_record",
    ):
        with pytest.raises(DataFileNotFoundError, match=f"bucket '{name}'"):
            ArrayRecordSourceModule(
                config("global"),
                pattern,
                storage_options=server.storage_options,
                cache_dir=str(tmp_path / "cache"),
            )


def test_a_missing_object_is_no_refusal_when_its_names_hold_a_status_code(s3_server, tmp_path):
    """Names such as `test-403...` or `x-401` are no HTTP status: the error says the object is
    missing, not that credentials were refused."""
    bucket = s3_server.make_bucket(f"test-403-{os.urandom(4).hex()}")
    try:
        with pytest.raises(DataFileNotFoundError, match="no such object") as caught:
            ArrayRecordSourceModule(
                config("global"),
                f"{bucket}/x-401.array_record",
                storage_options=s3_server.storage_options,
                cache_dir=str(tmp_path / "cache"),
            )
        assert "refused" not in str(caught.value)
    finally:
        s3_server.remove_bucket(bucket)


# --- Sharing one cache directory -------------------------------------------------------------


def test_two_sources_sharing_a_cache_dir_download_each_shard_once(
    s3_set, local_set, tmp_path, server_log
):
    cfg = config("global")
    sources = [remote(s3_set, cfg, tmp_path / "cache", cache_limit="4MB") for _ in range(2)]
    assert sources[0]._cache is not sources[1]._cache
    results = [None, None]

    def read(number):
        results[number] = read_all(sources[number])

    threads = [threading.Thread(target=read, args=(number,)) for number in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    expected = local_batches(local_set, cfg)
    for batches in results:
        assert_batches_equal(batches, expected)
    assert server_log.shard_gets() == {shard_name(n): 1 for n in range(NUM_SHARDS)}
    assert sum(source._cache.downloaded_bytes for source in sources) == SET_BYTES
    assert cache_files(tmp_path / "cache", "locks") == []  # removed by their last holders


def test_two_datasets_share_a_cache_dir(
    s3_server, s3_bucket, s3_set, local_set, tmp_path, server_log
):
    """Shards are named by content, so two sets never collide; reading one set evicts the
    other set's shards first."""
    other_examples = make_examples(1400)[1000:]
    other = (s3_server, _write_set(s3_server, s3_bucket, other_examples, "other", num_shards=8))
    cfg = config("global", num_epochs=1)
    limit = 20 * SHARD_BYTES  # the first set (16 shards) and half the other one (8)
    with CacheSampler(tmp_path / "cache") as sampler:
        first = read_all(remote(s3_set, cfg, tmp_path / "cache", cache_limit=limit))
        second_source = remote(other, cfg, tmp_path / "cache", cache_limit=limit)
        second = read_all(second_source)
        before = server_log.shard_gets()
        again = remote(s3_set, cfg, tmp_path / "cache", cache_limit=limit)
        third = read_all(again)
        refetched = server_log.shard_gets() - before
    expected = local_batches(local_set, cfg)
    assert_batches_equal(first, expected)
    assert_batches_equal(third, expected)
    ids = np.concatenate([batch["id"] for batch in second])
    assert sorted(ids.tolist()) == list(range(1000, 1400))
    assert second_source._cache.downloaded_bytes == 8 * SHARD_BYTES
    # The other set took the room of 4 of the first set's shards: only those come back.
    assert sum(refetched.values()) == 4 and set(refetched) < {shard_name(n) for n in range(16)}
    assert again._cache.downloaded_bytes == 4 * SHARD_BYTES
    assert sampler.peak <= limit, sampler.at_peak
    assert_cache_trustworthy(tmp_path / "cache")


# --- Crashes ---------------------------------------------------------------------------------


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_leftovers_of_a_crash_are_never_trusted(s3_set, local_set, tmp_path):
    """A partial download of a dead process is removed, never used; files in shards/ that name
    no shard of the set are never read, and give way when the set needs the room."""
    cache = tmp_path / "cache"
    for name in ("shards", "tmp", "locks"):
        (cache / name).mkdir(parents=True)
    index = json.loads(
        s3_set[0]
        .filesystem()
        .cat_file(s3_set[1].split("://")[1].replace("-*.array_record", ".index.json"))
    )
    key = f"{index['content_hashes'][0]}-{SHARD_BYTES}"
    partial = cache / "tmp" / f"{key}.{_dead_pid()}.0.partial"
    partial.write_bytes(b"\0" * SHARD_BYTES)  # as long as the shard, but zeros
    stranger = cache / "shards" / f"{'0' * 32}-{SHARD_BYTES}.array_record"
    stranger.write_bytes(b"\1" * SHARD_BYTES)
    junk = cache / "shards" / "notes.txt"
    junk.write_bytes(b"x" * 100)
    cfg = config("global")
    source = remote(s3_set, cfg, cache, cache_limit=SET_BYTES + 200)
    assert_batches_equal(read_all(source), local_batches(local_set, cfg))
    assert not partial.exists()
    assert not stranger.exists()  # evicted: the set needed its room
    assert cache_files(cache, "tmp") == []


_READER = r"""
import hashlib, json, sys
from resumax.pipeline import Pipeline
from resumax.sources import ArrayRecordSourceConfig, ArrayRecordSourceModule

pattern, options, cache_dir, wait = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
config = ArrayRecordSourceConfig(seed=5, num_epochs=2, shuffle_files=True)
source = ArrayRecordSourceModule(
    config, pattern, storage_options=options, cache_dir=cache_dir, cache_limit="4MB",
    fetch_threads=2, fetch_timeout=60,
)
print("ready", flush=True)
if wait == "wait":
    sys.stdin.readline()
digest = hashlib.sha256()
for batch in Pipeline(source, batch_size=8, prefetch=0):
    digest.update(batch["id"].tobytes())
print(json.dumps({"digest": digest.hexdigest(), "downloaded": source._cache.downloaded_bytes}))
"""


def _reader(pattern: str, options: dict, cache_dir, wait: bool = False) -> subprocess.Popen:
    """A process reading the set (global shuffle, 2 epochs) through `cache_dir`: it prints
    "ready" once built, then (with `wait`) reads once a line comes on its stdin, and prints
    the digest of its batches' ids and the bytes it downloaded."""
    arguments = [pattern, json.dumps(options), str(cache_dir), "wait" if wait else "go"]
    return subprocess.Popen(
        [sys.executable, "-c", _READER, *arguments],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def _digest(batches: list[dict]) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        digest.update(batch["id"].tobytes())
    return digest.hexdigest()


def _wait_for_partial(cache_dir, process: subprocess.Popen, seconds: float = 30) -> None:
    """Until the process is writing a download into cache_dir/tmp."""
    deadline = time.monotonic() + seconds
    tmp = os.path.join(cache_dir, "tmp")
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        with contextlib.suppress(FileNotFoundError):
            if any(os.path.getsize(os.path.join(tmp, name)) > 0 for name in os.listdir(tmp)):
                return
        time.sleep(0.005)
    process.kill()
    pytest.fail("no download started")


@pytest.mark.slow
def test_two_processes_sharing_a_cache_dir_download_each_shard_once(
    s3_set, local_set, tmp_path, server_log
):
    """A subprocess and this process read the set at once through one cache directory."""
    server, pattern = s3_set
    process = _reader(pattern, server.storage_options, tmp_path / "cache", wait=True)
    try:
        assert process.stdout.readline().strip() == "ready", process.communicate()
        source = remote(s3_set, config("global"), tmp_path / "cache", cache_limit="4MB")
        process.stdin.write("go\n")
        process.stdin.flush()
        batches = read_all(source)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    output = json.loads(out.splitlines()[-1])
    expected = local_batches(local_set, config("global"))
    assert_batches_equal(batches, expected)
    assert output["digest"] == _digest(expected)
    assert output["downloaded"] + source._cache.downloaded_bytes == SET_BYTES
    assert server_log.shard_gets() == {shard_name(n): 1 for n in range(NUM_SHARDS)}
    assert cache_files(tmp_path / "cache", "locks") == []


@pytest.mark.slow
def test_kill_9_mid_download_leaves_nothing_a_later_run_trusts(s3_set, local_set, tmp_path):
    server, pattern = s3_set
    host, port = server.endpoint_url.removeprefix("http://").split(":")
    proxy = Proxy((host, int(port)), rate=100_000)
    try:
        options = {**server.storage_options, "endpoint_url": proxy.url}
        process = _reader(pattern, options, tmp_path / "cache")
        _wait_for_partial(tmp_path / "cache", process)
        process.kill()
        process.wait(10)
    finally:
        proxy.stop()
    assert cache_files(tmp_path / "cache", "tmp") != []  # the dead process's partial download
    assert_cache_trustworthy(tmp_path / "cache")
    cfg = config("global")
    source = remote(s3_set, cfg, tmp_path / "cache", cache_limit="4MB")
    assert_batches_equal(read_all(source), local_batches(local_set, cfg))
    assert cache_files(tmp_path / "cache", "tmp") == []
    assert len(cache_files(tmp_path / "cache", "shards")) == NUM_SHARDS
    assert_cache_trustworthy(tmp_path / "cache")


@pytest.mark.slow
def test_ctrl_c_mid_download_exits_promptly_leaving_no_temporary_file(s3_set, tmp_path):
    server, pattern = s3_set
    host, port = server.endpoint_url.removeprefix("http://").split(":")
    proxy = Proxy((host, int(port)), rate=50_000)
    try:
        options = {**server.storage_options, "endpoint_url": proxy.url}
        process = _reader(pattern, options, tmp_path / "cache")
        _wait_for_partial(tmp_path / "cache", process)
        process.send_signal(signal.SIGINT)
        started = time.monotonic()
        try:
            _, err = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail("Ctrl-C did not end the process within 10 s")
        elapsed = time.monotonic() - started
    finally:
        proxy.stop()
    assert process.returncode != 0
    assert "KeyboardInterrupt" in err, err
    assert elapsed < 5, elapsed
    assert cache_files(tmp_path / "cache", "tmp") == []
    assert_cache_trustworthy(tmp_path / "cache")
