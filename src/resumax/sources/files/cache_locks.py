"""Locks and leftovers of a shard cache directory shared by the processes of a host: `flock`s held
with a deadline, per-shard download locks removed by their holder, and this process's partial
downloads removed at its exit (those of dead processes are recognized by their pid).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import time
from collections.abc import Iterator

# Seconds between two tries of a lock held by another process.
_POLL = 0.05

# This process's downloads in progress: (pid, partial path). At exit (Ctrl-C included) the ones
# still going, in daemon threads that never reach their cleanup, are removed.
PARTIALS: set[tuple[int, str]] = set()


@atexit.register
def _remove_partials() -> None:
    for pid, partial in list(PARTIALS):
        if pid == os.getpid():  # never a parent's, in a forked child
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial)


def alive(pid: int) -> bool:
    """Whether a process `pid` runs: a partial download of one that does not is a leftover."""
    try:
        return pid > 0 and os.kill(pid, 0) is None  # never kill(-1 or 0): whole groups
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


@contextlib.contextmanager
def flock(path: str, mode: int, deadline: float | None = None) -> Iterator[None]:
    """Holds `flock(mode)` on `path` (created if missing), polling until `deadline` if given."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        lock(fd, path, mode, deadline)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def download_lock(path: str, deadline: float) -> Iterator[None]:
    """Holds an exclusive `flock` on the lock file `path` until `deadline`, and removes the file
    before releasing it, so that locks/ holds only the files of downloads under way. A process
    that waited on a file removed meanwhile locks a new one (the inode at `path` is checked)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            lock(fd, path, fcntl.LOCK_EX, deadline)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # removed by its last holder: lock the file now at `path`
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        os.close(fd)


def lock(fd: int, path: str, mode: int, deadline: float | None) -> None:
    """`flock(fd, mode)`, polling until `deadline` if given (then TimeoutError naming `path`)."""
    while True:
        try:
            fcntl.flock(fd, mode | (fcntl.LOCK_NB if deadline is not None else 0))
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(path) from None
            time.sleep(_POLL)
