"""Shared by the remote-source tests: a small set written locally and to S3 and GCS servers on
127.0.0.1, sources over them, and what observes the cache and the server (a sampler of the cache's
bytes, the server's request log, a TCP proxy that can stop or throttle the server). Registered as
a pytest plugin in conftest.py, so its fixtures reach every test module."""

from __future__ import annotations

import collections
import contextlib
import fcntl
import gc
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import pytest

import resumax
from resumax.pipeline import Pipeline
from resumax.records import shard_index
from resumax.sources import ArrayRecordSourceConfig, ArrayRecordSourceModule
from tests.buckets import LOOPBACK, BucketServer
from tests.conftest import make_examples

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


@pytest.fixture
def _downloads_end_with_their_test() -> Any:
    """Waits (10 s at most) for the read-ahead threads a test started (one stopped with a
    download under way finishes it), so that the next test's request log holds its own.
    Downloads abandoned at fetch_timeout (on a server that stopped) are not waited for."""
    before = set(threading.enumerate())
    yield
    started = [t for t in set(threading.enumerate()) - before if t.name == "resumax-fetch"]
    if not started and not evicted_but_open():
        return  # a full collection costs ~0.5 s in a process that has imported JAX
    gc.collect()  # an iterator nobody holds stops its read-ahead threads and closes its readers
    deadline = time.monotonic() + 10
    for thread in started:
        thread.join(max(0.0, deadline - time.monotonic()))


def evicted_but_open(pid: int | str = "self") -> list[str]:
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
