"""One training process per run directory: an exclusive `flock` on `<run_dir>/.resumax.lock`,
released by the operating system when the holder exits or dies (even by SIGKILL).
"""

from __future__ import annotations

import fcntl
import os

from resumax.errors import ConfigError

LOCK_FILE = ".resumax.lock"


class RunLock:
    """Holds the run directory's lock from construction until `close()` or process exit.

    Raises ConfigError naming the directory and the holder's pid when another process holds it:
    two runs writing one directory would commit steps without their data item and lose metrics
    lines. The pid is written into the lock file after the lock is taken, for that message.
    """

    def __init__(self, run_dir: str | os.PathLike, key: str = "train.run_dir"):
        self.path = os.path.join(os.fspath(run_dir), LOCK_FILE)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            self.close()
            raise ConfigError(
                f"{key} {os.fspath(run_dir)!r} is in use by another resumax train process "
                f"(pid {holder}); wait for it to end, stop it, or set another {key}"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def close(self) -> None:
        """Releases the lock (closing the descriptor drops the flock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
