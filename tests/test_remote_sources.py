"""Sources over s3:// and gs:// sets, against real servers on 127.0.0.1 (moto's S3 server,
fake-gcs-server): the batches of the local copy, exact resume across copies, the cache bound
sampled while reading, downloads per epoch counted in the server's request log, faults (a
server lost mid-epoch, a replaced object, a missing bucket), sharing one cache directory, and
crashes (kill -9, Ctrl-C) mid-download."""

from __future__ import annotations

import collections
import contextlib
import fcntl
import gc
import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import numpy as np
import pytest

import resumax
from resumax.errors import ConfigError, DataFileNotFoundError, DataSourceError, StateMismatchError
from resumax.pipeline import Pipeline
from resumax.records import shard_index
from resumax.sources import ArrayRecordSourceConfig, ArrayRecordSourceModule
from resumax.sources.files.remote import parse_bytes
from tests.buckets import LOOPBACK, BucketServer
from tests.conftest import assert_batches_equal, batches_and_state, make_examples, take

NUM_SHARDS, PER_SHARD = 16, 50
SHARD_BYTES = 131072  # ArrayRecord pads each of these small shards to 128 KiB
SET_BYTES = NUM_SHARDS * SHARD_BYTES
EXAMPLES = make_examples(NUM_SHARDS * PER_SHARD)
BATCH = 8

# Each read order with its cache_limit: the global shuffle holds the whole set; shuffle_window
# and file order read through a limit of 3/8 and 1/4 of the set.
ORDERS = {
    "global": (dict(shuffle_files=True), "4MB"),
    "window": (dict(shuffle_files=True, shuffle_window=16), 6 * SHARD_BYTES),
    "unshuffled": (dict(shuffle_files=False), 4 * SHARD_BYTES),
}


def config(order: str, num_epochs: int = 2, seed: int = 5) -> ArrayRecordSourceConfig:
    return ArrayRecordSourceConfig(seed=seed, num_epochs=num_epochs, **ORDERS[order][0])


# --- Sets ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_set(tmp_path_factory) -> str:
    """The set on local disk: its glob."""
    directory = tmp_path_factory.mktemp("local")
    paths = resumax.write_shards(directory / "train", EXAMPLES, NUM_SHARDS)
    assert [os.path.getsize(path) for path in paths] == [SHARD_BYTES] * NUM_SHARDS
    return str(directory / "train-*.array_record")


def _write_set(
    server: BucketServer,
    bucket: str,
    examples: list = EXAMPLES,
    name: str = "train",
    num_shards: int = NUM_SHARDS,
) -> str:
    resumax.write_shards(
        f"{bucket}/{name}", examples, num_shards, storage_options=server.storage_options
    )
    server.filesystem().invalidate_cache()
    return f"{bucket}/{name}-*.array_record"


@pytest.fixture(scope="module")
def s3_set(s3_server) -> Any:
    """(server, glob) of the set in an S3 bucket that no test changes."""
    bucket = s3_server.make_bucket()
    yield s3_server, _write_set(s3_server, bucket)
    s3_server.remove_bucket(bucket)


@pytest.fixture(scope="module")
def gcs_set(gcs_server) -> Any:
    """(server, glob) of the set in a GCS bucket that no test changes."""
    bucket = gcs_server.make_bucket()
    yield gcs_server, _write_set(gcs_server, bucket)
    gcs_server.remove_bucket(bucket)


def remote(server_set, cfg, cache_dir, **kwargs) -> ArrayRecordSourceModule:
    server, pattern = server_set
    return ArrayRecordSourceModule(
        cfg, pattern, storage_options=server.storage_options, cache_dir=str(cache_dir), **kwargs
    )


def read_all(source, num_workers: int = 0, **kwargs) -> list[dict]:
    return list(Pipeline(source, batch_size=BATCH, num_workers=num_workers, **kwargs))


def local_batches(local_set: str, cfg) -> list[dict]:
    return read_all(ArrayRecordSourceModule(cfg, local_set))


def shard_name(number: int, name: str = "train") -> str:
    return f"{name}-{number:05d}-of-{NUM_SHARDS:05d}.array_record"


# --- Observing the cache and the server ------------------------------------------------------


class CacheSampler:
    """While active, a thread sums the bytes of the files in cache_dir/shards and cache_dir/tmp
    every 2 ms; `peak` is the largest sum seen. Each sample holds the cache directory's lock
    (the one processes take to evict and reserve), so that it never sees an eviction and the
    download it made room for half-done; a rename from tmp/ to shards/ can only be missed."""

    def __init__(self, cache_dir):
        self.cache_dir = str(cache_dir)
        self.peak, self.samples = 0, 0
        self.at_peak: dict[str, list[str]] = {}  # the files when the peak was sampled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def total(self) -> int:
        total = 0
        for name in ("shards", "tmp"):
            with (
                contextlib.suppress(FileNotFoundError),
                os.scandir(os.path.join(self.cache_dir, name)) as entries,
            ):
                for entry in entries:
                    with contextlib.suppress(FileNotFoundError):
                        total += entry.stat().st_size
        return total

    def listing(self) -> dict[str, list[str]]:
        return {name: cache_files(self.cache_dir, name) for name in ("shards", "tmp")}

    def _run(self) -> None:
        os.makedirs(self.cache_dir, exist_ok=True)
        fd = os.open(os.path.join(self.cache_dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while not self._stop.is_set():
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    total = self.total()
                    if total > self.peak:
                        self.peak, self.at_peak = total, self.listing()
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                self.samples += 1
                time.sleep(0.002)
        finally:
            os.close(fd)

    def __enter__(self) -> CacheSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REQUEST = re.compile(r'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d+)')


class RequestLog(logging.Handler):
    """The requests moto's server (in this process) logs through werkzeug: (method, path,
    status), whichever process sent them."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.requests: list[tuple[str, str, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = _REQUEST.search(_ANSI.sub("", record.getMessage()))
        if match:
            method, path, status = match.groups()
            self.requests.append((method, unquote(path), int(status)))

    def shard_gets(self) -> collections.Counter:
        """Successful GETs of each shard object (by object name)."""
        return collections.Counter(
            path.split("?")[0].rpartition("/")[2]
            for method, path, status in self.requests
            if method == "GET" and status in (200, 206) and ".array_record" in path.split("?")[0]
        )


@pytest.fixture
def server_log(s3_server) -> Any:
    log = RequestLog()
    logger = logging.getLogger("werkzeug")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(log)
    yield log
    logger.removeHandler(log)
    logger.setLevel(level)


@pytest.fixture(autouse=True)
def _downloads_end_with_their_test() -> Any:
    """Waits (10 s at most) for the read-ahead threads a test started (one stopped with a
    download under way finishes it), so that the next test's request log holds its own.
    Downloads abandoned at fetch_timeout (on a server that stopped) are not waited for."""
    before = set(threading.enumerate())
    yield
    gc.collect()  # an iterator nobody holds stops its read-ahead threads
    deadline = time.monotonic() + 10
    for thread in set(threading.enumerate()) - before:
        if thread.name == "resumax-fetch":
            thread.join(max(0.0, deadline - time.monotonic()))


def cache_files(cache_dir, name: str) -> list[str]:
    directory = os.path.join(cache_dir, name)
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def assert_cache_trustworthy(cache_dir) -> None:
    """Every complete shard in the cache holds the content its name records."""
    for name in cache_files(cache_dir, "shards"):
        path = os.path.join(cache_dir, "shards", name)
        content, size = name[: -len(".array_record")].rsplit("-", 1)
        assert os.path.getsize(path) == int(size), name
        assert shard_index.content_hash(path) == content, name


def within(seconds: float, function: Callable[[], Any]) -> Any:
    """`function()`, run in a thread: its result or exception, or a failure after `seconds`
    (the test must never hang)."""
    outcome: dict[str, Any] = {}

    def run():
        try:
            outcome["value"] = function()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still running after {seconds} s: it hangs")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of a server: its answers pass at `rate` bytes/s at
    most (None: as they come). `freeze()` makes a server that stops answering (connections
    accepted, nothing forwarded); `stop()` closes the listening socket and every connection."""

    def __init__(self, target: tuple[str, int], rate: int | None = None):
        self._target, self._rate = target, rate
        self._listener = socket.create_server((LOOPBACK, 0))
        self.url = f"http://{LOOPBACK}:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._frozen, self._stopped = threading.Event(), threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _keep(self, sock: socket.socket) -> bool:
        with self._lock:
            if self._stopped.is_set():
                sock.close()
                return False
            self._sockets.append(sock)
            return True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._keep(client) or self._frozen.is_set():
                continue  # frozen: accepted, never answered
            try:
                upstream = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            if not self._keep(upstream):
                continue
            for source, sink, rate in ((client, upstream, None), (upstream, client, self._rate)):
                threading.Thread(target=self._pump, args=(source, sink, rate), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, rate: int | None) -> None:
        chunk = 65536 if rate is None else max(1024, rate // 20)
        try:
            while True:
                data = source.recv(chunk)
                while self._frozen.is_set() and not self._stopped.is_set():
                    time.sleep(0.01)
                if not data or self._stopped.is_set():
                    break
                if rate:
                    time.sleep(len(data) / rate)
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def freeze(self) -> None:
        self._frozen.set()

    def stop(self) -> None:
        with self._lock:
            self._stopped.set()
            sockets, self._sockets = self._sockets, []
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


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


def _evicted_but_open(pid: int | str = "self") -> list[str]:
    """Shards a process holds open although they were removed from the cache (their disk space
    is not freed while they are open)."""
    found = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.endswith(".array_record (deleted)"):
                    found.append(target)
    return found


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
            held.append(len(_evicted_but_open()))
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
        held = {pid: len(_evicted_but_open(pid)) for pid in _children(os.getpid())}
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
