"""Worker processes for `Pipeline(num_workers=N)`: a task function in N processes, ordered results.

Results come back as small pipe messages whose array bytes travel through shared memory slots
(`resumax.shared_memory`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import secrets
import signal
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from multiprocessing.connection import Connection
from typing import Any

from resumax.errors import ConfigError, ResumaxError, WorkerError
from resumax.shared_memory import SlotReader, SlotWriter, sweep

logger = logging.getLogger(__name__)

# "forkserver": workers are forked from a small server process started fresh (not from this
# process, whose JAX runtime may already run threads, which fork does not copy safely), and the
# server has imported resumax and the main module once, so a worker starts in milliseconds
# instead of re-importing jax and flax as "spawn" would.
START_METHOD = "forkserver"
SEGMENT_PREFIX = "resumax"
# Seconds the parent waits for one result before it logs a warning naming the worker (and again
# after each further such wait) when the pipeline has no `worker_timeout`. Read at each wait:
# assign `resumax.workers.WORKER_WAIT_WARNING_SECONDS` to change it.
WORKER_WAIT_WARNING_SECONDS = 60.0
# Seconds `stop_workers` takes at most by default: the first half for workers to finish their
# task and exit, the second after SIGTERM; then the ones left are killed.
STOP_TIMEOUT = 2.0
# Seconds the parent waits for a dead worker's exit code, for its error message.
_EXIT_CODE_WAIT = 1.0
_NO_TASK = object()
# What a worker reports before its first task, between tasks and while it sends a result (see
# report_activity); codes >= 0 index the pool's `activities`.
_STARTING, _IDLE, _SENDING = -3, -1, -2
# The worker's activity cell, shared with the parent; None in any other process.
_activity: Any = None


def require_picklable(value: Any, description: str) -> None:
    """Raises ConfigError naming `description` unless `value` can be sent to a worker process."""
    try:
        pickle.dumps(value)
    except Exception as error:
        raise ConfigError(
            f"{description} cannot be sent to worker processes ({error}); workers receive "
            "functions by reference, so define it at module level (not a lambda, closure or "
            "local function), or use num_workers=0 to run it in this process"
        ) from error


def check_worker_timeout(worker_timeout: Any) -> None:
    """Raises ConfigError unless `worker_timeout` is None or a number of seconds > 0."""
    number = isinstance(worker_timeout, (int, float)) and not isinstance(worker_timeout, bool)
    if worker_timeout is not None and not (number and worker_timeout > 0):
        raise ConfigError(
            f"worker_timeout must be None or a number of seconds > 0, got {worker_timeout!r}"
        )


def _context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context(START_METHOD)
    # Only the first start of the fork server reads the preload list.
    context.set_forkserver_preload(["__main__", "resumax"])
    return context


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


def _worker_main(
    connection: Connection,
    make_task_fn: Callable[[], Callable[[Any], Any]],
    prefix: str,
    slots: int,
    activity: Any,
) -> None:
    """Answers tasks in the order received until told to stop or the parent goes away.

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
        for count in itertools.count():
            report_activity(_IDLE)
            try:
                task = connection.recv()
            except (EOFError, OSError):
                return
            if task is None:
                return
            message = startup_error
            if startup_error is None:
                message = _answer(task_fn, task, writer, count % slots)
            try:
                connection.send(message)
            except OSError:
                return
    finally:
        sweep(f"{prefix}-")
        connection.close()


def _answer(task_fn: Callable[[Any], Any], task: Any, writer: SlotWriter, slot: int) -> tuple:
    """The message for one task: its packed result, or the error it raised."""
    try:
        result = task_fn(task)
    except BaseException as error:
        return _error_message(error)
    report_activity(_SENDING)
    try:
        return writer.pack(result, slot)
    except Exception as error:
        return _error_message(_unsendable(task_fn, task, result, error))


# The parent side ------------------------------------------------------------------------------


class WorkerPool:
    """`num_workers` processes, each running `make_task_fn()` once, then its result per task.

    `map(tasks)` sends task k to worker k mod num_workers and yields results in task order, so
    the output never depends on which worker is faster. At most `tasks_per_worker` tasks per
    worker are in flight, which bounds memory. Exceptions raised by the task function are
    re-raised in the caller with the worker's traceback as a note.

    A worker that does not answer within `timeout` seconds is a WorkerError naming it, the task
    (`describe_task`) and what it was doing (`activities[code]` of its last `report_activity`);
    without a timeout, a warning is logged after each WORKER_WAIT_WARNING_SECONDS of waiting.
    """

    def __init__(
        self,
        make_task_fn: Callable[[], Callable[[Any], Any]],
        num_workers: int,
        *,
        tasks_per_worker: int = 2,
        timeout: float | None = None,
        activities: Sequence[str] = (),
        describe_task: Callable[[Any], str] = repr,
    ):
        context = _context()
        self._prefix = f"{SEGMENT_PREFIX}-{os.getpid()}-{secrets.token_hex(4)}"
        self._tasks_per_worker = tasks_per_worker
        self._timeout = timeout
        self._activities = list(activities)
        self._describe_task = describe_task
        self._connections: list[Connection] = []
        self._readers: list[SlotReader] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._activity_cells: list[Any] = []
        try:
            for index in range(num_workers):
                parent_end, child_end = context.Pipe(duplex=True)
                cell = context.RawValue("i", _STARTING)
                process = context.Process(
                    target=_worker_main,
                    args=(
                        child_end,
                        make_task_fn,
                        f"{self._prefix}-w{index}",
                        tasks_per_worker,
                        cell,
                    ),
                    name=f"resumax-worker-{index}",
                    daemon=True,
                )
                process.start()
                child_end.close()
                self._connections.append(parent_end)
                self._readers.append(SlotReader(tasks_per_worker))
                self._processes.append(process)
                self._activity_cells.append(cell)
        except BaseException:
            self.close()
            raise

    @property
    def worker_pids(self) -> tuple[int, ...]:
        """Process ids of the workers (for monitoring and tests)."""
        return tuple(process.pid for process in self._processes if process.pid is not None)

    def map(self, tasks: Iterable[Any]) -> Iterator[Any]:
        """Results of the task function for `tasks`, in task order."""
        tasks = iter(tasks)
        in_flight: deque[tuple[int, Any]] = deque()
        next_worker = 0
        capacity = len(self._connections) * self._tasks_per_worker
        exhausted = False
        while True:
            while not exhausted and len(in_flight) < capacity:
                task = next(tasks, _NO_TASK)
                if task is _NO_TASK:
                    exhausted = True
                    break
                self._send(next_worker, task)
                in_flight.append((next_worker, task))
                next_worker = (next_worker + 1) % len(self._connections)
            if not in_flight:
                return
            yield self._receive(*in_flight.popleft())

    def _send(self, worker_index: int, task: Any) -> None:
        try:
            self._connections[worker_index].send(task)
        except OSError as error:
            raise self._died(worker_index) from error

    def _receive(self, worker_index: int, task: Any) -> Any:
        self._wait_for(worker_index, task)
        try:
            message = self._connections[worker_index].recv()
        except (EOFError, OSError) as error:
            raise self._died(worker_index) from error
        if message[0] != "error":
            try:
                return self._readers[worker_index].unpack(message)
            except Exception as error:
                raise WorkerError(
                    f"the result of resumax worker process {worker_index} for "
                    f"{self._describe_task(task)} cannot be read in this process ({error!r}): "
                    "a stage returned an object that pickles but does not unpickle here; "
                    "return numpy arrays and plain Python values"
                ) from error
        _, error, remote = message
        error.add_note(f"raised in resumax worker process {worker_index}:\n{remote}")
        raise error

    def _wait_for(self, worker_index: int, task: Any) -> None:
        """Waits until the worker answers (or dies); WorkerError after `timeout` seconds, a
        logged warning after each WORKER_WAIT_WARNING_SECONDS without one."""
        connection = self._connections[worker_index]
        started = time.monotonic()
        next_warning = WORKER_WAIT_WARNING_SECONDS
        limit = float("inf") if self._timeout is None else self._timeout
        while not connection.poll(max(0.0, min(next_warning, limit) - self._since(started))):
            waited = self._since(started)
            if waited >= limit:
                raise WorkerError(
                    f"{self._describe_worker(worker_index, task)} did not answer within "
                    f"worker_timeout={self._timeout} s. A stage may hang (a network read "
                    "without a timeout?); if it is only slow, raise worker_timeout"
                )
            if waited >= next_warning:
                logger.warning(
                    "%s has not answered for %.1f s; the pipeline waits for it. Pass "
                    "Pipeline(worker_timeout=seconds) to make this an error",
                    self._describe_worker(worker_index, task),
                    waited,
                )
                next_warning += WORKER_WAIT_WARNING_SECONDS

    @staticmethod
    def _since(started: float) -> float:
        return time.monotonic() - started

    def _describe_worker(self, worker_index: int, task: Any) -> str:
        """Names the worker, what it reported doing and its task, for messages."""
        code = self._activity_cells[worker_index].value
        doings = {
            _STARTING: "still starting (importing, opening the source)",
            _IDLE: "between tasks",
            _SENDING: "sending its result",
        }
        if 0 <= code < len(self._activities):
            doing = f"running {self._activities[code]}"
        else:
            doing = doings.get(code, f"at step {code}")
        pid = self._processes[worker_index].pid
        return (
            f"resumax worker process {worker_index} (pid {pid}), {doing} for "
            f"{self._describe_task(task)},"
        )

    def _died(self, worker_index: int) -> WorkerError:
        process = self._processes[worker_index]
        process.join(_EXIT_CODE_WAIT)
        return WorkerError(
            f"resumax worker process {worker_index} (pid {process.pid}) stopped unexpectedly "
            f"with exit code {process.exitcode}; it may have run out of memory or been killed"
        )

    def stop_workers(self, timeout: float = STOP_TIMEOUT) -> None:
        """Asks every worker to stop, then terminates, then kills the ones still running, in at
        most about `timeout` seconds whatever their stages are doing."""
        deadline = time.monotonic() + timeout
        for connection in self._connections:
            with contextlib.suppress(OSError):
                connection.send(None)
        alive = _wait_for_exit(self._processes, deadline - timeout / 2)
        for process in alive:
            process.terminate()
        for process in _wait_for_exit(alive, deadline):
            process.kill()
            process.join(_EXIT_CODE_WAIT)

    def close(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stops the workers, closes the pipes and removes any segment no one has read."""
        self.stop_workers(timeout)
        for connection in self._connections:
            connection.close()
        for process in self._processes:
            if process.exitcode is not None:
                process.close()
        self._connections, self._processes, self._readers = [], [], []
        sweep(f"{self._prefix}-")


def _wait_for_exit(
    processes: list[multiprocessing.process.BaseProcess], deadline: float
) -> list[multiprocessing.process.BaseProcess]:
    """Waits until the processes have exited or `deadline` (monotonic) passed; those alive."""
    while True:
        alive = [process for process in processes if process.is_alive()]
        remaining = deadline - time.monotonic()
        if not alive or remaining <= 0:
            return alive
        multiprocessing.connection.wait([process.sentinel for process in alive], remaining)
