"""The S3 server the bucket benchmarks read from: moto on 127.0.0.1 in a child process (in a
thread of the benchmark's process it would share the GIL with the pipeline it serves), fake
credentials that never reach the metadata server or ~/.aws files, and plain GETs (no resumax) that
measure the server's own limit.

Run as a script, it is that child: it serves on a free port, prints it, and stops when stdin closes.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

LOOPBACK = "127.0.0.1"
# Fake credentials and region for the local server; never the metadata server or ~/.aws files.
S3_ENVIRON = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
S3_UNSET = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL")


def use_fake_credentials() -> None:
    """Points this process's AWS settings at the fake credentials and region (children inherit)."""
    for name, value in S3_ENVIRON.items():
        os.environ[name] = value
    for name in S3_UNSET:
        os.environ.pop(name, None)


# The server ---------------------------------------------------------------------------------


def serve() -> None:
    """Child process: moto's S3 server on 127.0.0.1 (a free port, printed), until stdin closes."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == LOOPBACK, f"moto listens on {host}, not {LOOPBACK}"
    print(port, flush=True)
    sys.stdin.read()
    server.stop()


class S3Server:
    """The moto server child process, its storage options and one bucket."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        port = int(self.process.stdout.readline())
        self.endpoint = f"http://{LOOPBACK}:{port}"
        self.options = {
            "endpoint_url": self.endpoint,
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"},
        }
        self.bucket = f"bench-{uuid.uuid4().hex[:12]}"
        self.filesystem().call_s3("create_bucket", Bucket=self.bucket)

    def filesystem(self) -> Any:
        import fsspec

        return fsspec.filesystem("s3", **self.options)

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def plain_gets(server: S3Server, keys: list[str], threads: int, client: str) -> float:
    """Seconds to GET every object once with `threads` threads (no resumax): boto3 get_object
    (bodies read into memory), or s3fs get_file into local files (the call the shard cache
    makes)."""
    if client == "boto3":
        s3 = server.client()  # botocore clients are thread-safe

        def get(key: str) -> None:
            s3.get_object(Bucket=server.bucket, Key=key)["Body"].read()
    else:
        fs = server.filesystem()
        directory = tempfile.mkdtemp(prefix="resumax-gets-")

        def get(key: str) -> None:
            fs.get_file(f"{server.bucket}/{key}", os.path.join(directory, key))

    get(keys[0])  # connect once, untimed
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(get, keys))
    elapsed = time.perf_counter() - start
    if client != "boto3":
        shutil.rmtree(directory)
    return elapsed


def one_get(server: S3Server, key: str) -> float:
    """Seconds for one GET of one shard (s3fs get_file to a local file, as the cache does)."""
    fs = server.filesystem()
    with tempfile.TemporaryDirectory() as directory:
        target = os.path.join(directory, "shard")
        fs.get_file(f"{server.bucket}/{key}", target)  # connect once, untimed
        start = time.perf_counter()
        fs.get_file(f"{server.bucket}/{key}", target)
        return time.perf_counter() - start


if __name__ == "__main__":
    serve()
