"""Worker processes for `Pipeline(num_workers=N)`: the loop each worker runs (a task function over
groups of tasks, results packed into shared memory slots), the activity it reports, and the
checks that what a pipeline sends to workers can get there. The parent side is `worker_pool`.
"""

from __future__ import annotations

import functools
import os
import pickle
import signal
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from resumax.errors import ConfigError, ResumaxError, WorkerError
from resumax.workers.shared_memory import SlotWriter, sweep

# What a worker reports before its first task, between tasks and while it sends a result (see
# report_activity); codes >= 0 index the pool's `activities`.
STARTING, IDLE, SENDING = -3, -1, -2
# The worker's activity cell, shared with the parent; None in any other process.
_activity: Any = None


def require_picklable(value: Any, description: str, advice: str | None = None) -> None:
    """Raises ConfigError naming `description` unless `value` can be sent to a worker process;
    `advice` says what to do instead (by default: define the function at module level)."""
    error = pickling_error(value)
    if error is not None:
        advice = advice or (
            "workers receive functions by reference, so define it at module level (not a "
            "lambda, closure or local function), or use num_workers=0 to run it in this process"
        )
        raise ConfigError(
            f"{description} cannot be sent to worker processes ({error}); {advice}"
        ) from error


def pickling_error(value: Any) -> Exception | None:
    """Why `value` cannot be pickled to or from a worker process, or None when it can."""
    try:
        pickle.dumps(value)
    except Exception as error:
        return error
    return None


def check_worker_timeout(worker_timeout: Any) -> None:
    """Raises ConfigError unless `worker_timeout` is None or a number of seconds > 0."""
    number = isinstance(worker_timeout, (int, float)) and not isinstance(worker_timeout, bool)
    if worker_timeout is not None and not (number and worker_timeout > 0):
        raise ConfigError(
            f"worker_timeout must be None or a number of seconds > 0, got {worker_timeout!r}"
        )


# The worker side ------------------------------------------------------------------------------


def _error_message(error: BaseException) -> tuple:
    """An error for the parent; one that is not an Exception (SystemExit, KeyboardInterrupt from
    user code outside a stage) arrives as a WorkerError, never as the parent's own interrupt."""
    remote = "".join(traceback.format_exception(error))
    if not isinstance(error, Exception):
        error = WorkerError(
            f"a worker process task raised {type(error).__name__}({error}); the worker goes on, "
            "but the pipeline stops"
        )
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        error = ResumaxError(f"{type(error).__name__}: {error}")
    return ("error", error, remote)


def report_activity(code: int) -> None:
    """In a worker process, tells the parent what it is doing (an index into the pool's
    `activities`); a no-op elsewhere. Costs a memory write: call it per stage, not per record."""
    if _activity is not None:
        _activity.value = code


def _exit_on_sigterm(prefix: str, signum: int, frame: Any) -> None:
    """Exits at once, removing this worker's unread segments: a stage in a long call (or one that
    catches SystemExit) cannot delay the stop, and SystemExit seen by a stage is its own."""
    sweep(f"{prefix}-")
    os._exit(128 + signum)


def _unsendable(task_fn: Any, task: Any, result: Any, error: Exception) -> BaseException:
    """The error for a result that cannot be pickled to the parent: the task function's own
    account (`unsendable_error(result, error)`, naming the stage and record) if it has one."""
    explain = getattr(task_fn, "unsendable_error", None)
    if explain is not None:
        return explain(result, error)
    return WorkerError(
        f"the result of a worker task ({task!r}) cannot be sent to the pipeline's process: "
        f"{error!r}; return numpy arrays and plain Python values, or use num_workers=0"
    )


def worker_main(
    connection: Connection,
    make_task_fn: Callable[[], Callable[[Any], Any]],
    prefix: str,
    slots: int,
    activity: Any,
) -> None:
    """Answers groups of tasks in the order received until told to stop or the parent goes away.

    Whatever a task raises, even SystemExit or KeyboardInterrupt from a stage, goes back to the
    parent as an error: a worker ends only when told to, when the parent goes away or on SIGTERM.
    """
    global _activity
    _activity = activity
    # Ctrl-C reaches the whole process group: the parent handles it and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, functools.partial(_exit_on_sigterm, prefix))
    writer = SlotWriter(prefix, slots)
    try:
        try:
            task_fn, startup_error = make_task_fn(), None
        except BaseException as error:
            task_fn, startup_error = None, _error_message(error)
        # A task function with `use_allocator` builds its arrays in the result's slot.
        use_allocator = getattr(task_fn, "use_allocator", None)
        while True:
            report_activity(IDLE)
            try:
                group = connection.recv()
            except (EOFError, OSError):
                return
            if group is None:
                return
            slot, tasks = group
            message = startup_error
            if startup_error is None:
                message = _answer(task_fn, use_allocator, tasks, writer, slot)
            try:
                connection.send(message)
            except OSError:
                return
    finally:
        sweep(f"{prefix}-")
        connection.close()


def _answer(
    task_fn: Callable[[Any], Any],
    use_allocator: Callable[[Any], None] | None,
    tasks: list[Any],
    writer: SlotWriter,
    slot: int,
) -> tuple:
    """The message for a group of tasks: their packed results up to the first task that failed
    and its error (the results before it still reach the caller first), or that error alone."""
    allocate = writer.allocator(slot) if use_allocator is not None else None
    results, failure = [], None
    for task in tasks:
        if use_allocator is not None:
            use_allocator(allocate)
        try:
            results.append(task_fn(task))
        except BaseException as error:
            failure = _error_message(error)
            break
    if not results:
        return failure
    report_activity(SENDING)
    try:
        return writer.pack((results, failure), slot)
    except Exception as error:
        bad = next((i for i, result in enumerate(results) if not _picklable(result)), 0)
        failure = _error_message(_unsendable(task_fn, tasks[bad], results[bad], error))
    if bad == 0:
        return failure
    try:
        return writer.pack((results[:bad], failure), slot)
    except Exception:
        return failure


def _picklable(result: Any) -> bool:
    try:
        pickle.dumps(result, protocol=5, buffer_callback=lambda buffer: None)
    except Exception:
        return False
    return True
