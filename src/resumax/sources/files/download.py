"""One object's download into a local file, retried with backoff on transient errors until a
deadline. An async filesystem (s3fs, gcsfs) downloads as a task on its own event loop, any other in
a daemon thread: a server that stops answering never holds the caller (or the interpreter's exit)
past the deadline, and an abandoned download removes what it wrote.
"""

from __future__ import annotations

import asyncio
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
    url: str, fs: Any, remote_path: str, partial: str, deadline: float, fetch_timeout: float
) -> None:
    """Downloads `url` (`remote_path` on the fsspec filesystem `fs`) into `partial`, retried
    with backoff on transient errors until `deadline`; a missing object or bucket and refused
    credentials fail at once."""
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
    """One object's download into a local file: a task on an async filesystem's event loop (no
    thread of its own, no hand-off through fsspec's sync wrapper), else a daemon thread.
    `abandon()` cancels it and makes it remove what it wrote once it ends."""

    def __init__(self, fs: Any, remote_path: str, partial: str):
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._abandoned = threading.Event()
        self._partial = partial
        self._task = None
        if getattr(fs, "async_impl", False):
            coroutine = self._run_async(fs, remote_path, partial)
            self._task = asyncio.run_coroutine_threadsafe(coroutine, fs.loop)
        else:
            thread = threading.Thread(
                target=self._run, args=(fs, remote_path, partial), name="resumax-download"
            )
            thread.daemon = True
            thread.start()

    async def _run_async(self, fs: Any, remote_path: str, partial: str) -> None:
        try:
            await fs._get_file(remote_path, partial)
        except BaseException as error:  # CancelledError too: the caller has abandoned it
            self.error = error
        finally:
            self._finish()

    def _run(self, fs: Any, remote_path: str, partial: str) -> None:
        try:
            fs.get_file(remote_path, partial)
        except BaseException as error:
            self.error = error
        finally:
            self._finish()

    def _finish(self) -> None:
        # Set, then look: with `abandon` (flag, then look) one of the two removes the file.
        self.done.set()
        if self._abandoned.is_set():
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._partial)

    def abandon(self) -> None:
        self._abandoned.set()
        if self._task is not None:
            self._task.cancel()
        if self.done.is_set():
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._partial)
