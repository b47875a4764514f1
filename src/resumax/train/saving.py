"""Orbax's CheckpointManager as the training run uses it: a failed save becomes one
CheckpointError line, and the tracebacks Orbax's background threads print meanwhile are held back.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import orbax.checkpoint as ocp

from resumax.errors import CheckpointError, ResumaxError

T = TypeVar("T")


def checkpoint_call(manager: ocp.CheckpointManager, what: str, call: Callable[[], T]) -> T:
    """Runs `call` (a save, a wait for the commit, a close) and turns any failure into one
    CheckpointError naming the directory, the cause and the step a restart resumes from."""
    try:
        return call()
    except ResumaxError:
        raise
    except Exception as error:
        cause = (str(error).strip().splitlines() or [type(error).__name__])[0]
        # Orbax has dropped the failed step from its list by now.
        latest = manager.latest_step()
        kept = (
            f"the latest committed step stays {latest}: run the same command again to resume "
            "from it once the cause (e.g. a full disk or missing permissions) is fixed"
            if latest is not None
            else "no step is committed yet"
        )
        raise CheckpointError(
            f"{what} in {manager.directory} failed: {type(error).__name__}: {cause} ({kept})"
        ) from error


class _OrbaxLogFilter(logging.Filter):
    """Holds back Orbax's error records (each with a background thread's traceback)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "orbax" in record.pathname:
            self.held.append(record)
            return False
        return True


@contextlib.contextmanager
def orbax_errors_contained() -> Iterator[None]:
    """While active, Orbax's error logs and exceptions escaping its threads are held back.

    A failed save makes Orbax's threads log one traceback each (30 for one full disk) and
    asyncio callbacks raise "Event loop is closed"; the training loop reports the failure once,
    as a CheckpointError. If the block ends without a CheckpointError (Orbax recovered), what was
    held back is printed after all, so nothing is hidden from a run that goes on.
    """
    log_filter = _OrbaxLogFilter()
    absl_logger = logging.getLogger("absl")
    held_threads: list[str] = []
    previous_thread_hook = threading.excepthook
    previous_hook = sys.excepthook

    def thread_hook(args: Any) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        held_threads.append(f"thread {name}: {args.exc_type.__name__}: {args.exc_value}")

    def hook(exc_type: type, value: BaseException, trace: Any) -> None:
        # Called from C code (e.g. a future's callback on a closed event loop) outside the main
        # program's control flow; the main program's own uncaught exceptions come after the block.
        held_threads.append(f"{exc_type.__name__}: {value}")

    absl_logger.addFilter(log_filter)
    threading.excepthook = thread_hook
    sys.excepthook = hook
    failed = False
    try:
        yield
    except CheckpointError:
        failed = True
        raise
    finally:
        absl_logger.removeFilter(log_filter)
        threading.excepthook = previous_thread_hook
        sys.excepthook = previous_hook
        if not failed:
            for record in log_filter.held:
                absl_logger.handle(record)
            for line in held_threads:
                print(line, file=sys.stderr)
