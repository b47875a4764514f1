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


def _from_orbax(trace: Any) -> bool:
    """Whether a traceback passes through Orbax, TensorStore's asyncio glue or asyncio."""
    while trace is not None:
        name = trace.tb_frame.f_code.co_filename
        if any(part in name for part in ("orbax", "asyncio", "tensorstore")):
            return True
        trace = trace.tb_next
    return False


@contextlib.contextmanager
def orbax_errors_contained() -> Iterator[None]:
    """While active, Orbax's error logs and the exceptions its threads and callbacks print are
    held back; anything else goes to the hooks installed before.

    A failed save makes Orbax's threads log one traceback each (30 for one full disk) and
    TensorStore's callbacks hit "Event loop is closed"; the training loop reports the failure
    once, as a CheckpointError. After a CheckpointError the hooks stay installed, since Orbax's
    threads go on failing until the process exits. If the block ends otherwise, what was held
    back is printed after all, so nothing is hidden from a run that goes on.
    """
    log_filter = _OrbaxLogFilter()
    absl_logger = logging.getLogger("absl")
    held: list[str] = []
    previous = (threading.excepthook, sys.excepthook, sys.unraisablehook)

    def thread_hook(args: Any) -> None:
        if not _from_orbax(args.exc_traceback):
            previous[0](args)
            return
        name = args.thread.name if args.thread is not None else "?"
        held.append(f"thread {name}: {args.exc_type.__name__}: {args.exc_value}")

    def hook(exc_type: type, value: BaseException, trace: Any) -> None:
        if not _from_orbax(trace):
            previous[1](exc_type, value, trace)
            return
        held.append(f"{exc_type.__name__}: {value}")

    def unraisable_hook(args: Any) -> None:
        # TensorStore's callbacks report "Event loop is closed" this way, from C++ threads.
        if not _from_orbax(args.exc_traceback):
            previous[2](args)
            return
        held.append(f"{args.exc_type.__name__}: {args.exc_value}")

    absl_logger.addFilter(log_filter)
    threading.excepthook, sys.excepthook, sys.unraisablehook = thread_hook, hook, unraisable_hook
    try:
        yield
    except CheckpointError:
        raise
    except BaseException:
        _restore(absl_logger, log_filter, held, previous)
        raise
    _restore(absl_logger, log_filter, held, previous)


def _restore(
    absl_logger: logging.Logger, log_filter: _OrbaxLogFilter, held: list[str], previous: tuple
) -> None:
    """Puts the hooks back and prints what was held back."""
    absl_logger.removeFilter(log_filter)
    threading.excepthook, sys.excepthook, sys.unraisablehook = previous
    for record in log_filter.held:
        absl_logger.handle(record)
    for line in held:
        print(line, file=sys.stderr)
