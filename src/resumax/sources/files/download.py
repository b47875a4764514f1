"""One object's download into a local file, retried with backoff on transient errors until a
deadline, in a daemon thread: a server that stops answering never holds the caller (or the
interpreter's exit) past the deadline, and an abandoned download removes what it wrote.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

from resumax.errors import DataSourceError
from resumax.records import storage

# The first retry of a failed download waits this long, each next one twice as long.
_FIRST_BACKOFF = 0.2


def download(
    url: str, partial: str, storage_options: dict[str, Any], deadline: float, fetch_timeout: float
) -> None:
    """Downloads `url` into `partial`, retried with backoff on transient errors until
    `deadline`; a missing object or bucket and refused credentials fail at once. The download
    runs in a daemon thread, so a server that stops answering never holds the caller (or the
    interpreter's exit) past the deadline."""
    fs, remote_path = storage.filesystem(url, storage_options)
    backoff = _FIRST_BACKOFF
    while True:
        attempt = _Download(fs, remote_path, partial)
        try:
            finished = attempt.done.wait(max(deadline - time.monotonic(), 0.0))
        except BaseException:
            attempt.abandon()
            raise
        if not finished:
            attempt.abandon()
            raise DataSourceError(
                f"cannot fetch {url!r}: no complete download within fetch_timeout="
                f"{fetch_timeout} s (is the server reachable?)"
            )
        if attempt.error is None:
            return
        error = attempt.error
        failure = storage.storage_error(url, error, doing="fetch")
        if storage.is_persistent(error, failure):
            raise failure from error
        if time.monotonic() + backoff > deadline:
            raise DataSourceError(f"{failure} (retried until fetch_timeout)") from error
        time.sleep(backoff)
        backoff *= 2


class _Download:
    """One object's download into a local file, in a daemon thread; `abandon()` makes the thread
    remove what it wrote once it ends."""

    def __init__(self, fs: Any, remote_path: str, partial: str):
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._abandoned = threading.Event()
        self._args = (fs, remote_path, partial)
        threading.Thread(target=self._run, name="resumax-download", daemon=True).start()

    def _run(self) -> None:
        fs, remote_path, partial = self._args
        try:
            fs.get_file(remote_path, partial)
        except BaseException as error:
            self.error = error
        finally:
            if self._abandoned.is_set():
                with contextlib.suppress(FileNotFoundError):
                    os.remove(partial)
            self.done.set()

    def abandon(self) -> None:
        self._abandoned.set()
        if self.done.is_set():
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._args[2])
