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
from resumax.shared_memory import SlotReader, SlotWriter, payload_bytes, sweep

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
# A group of tasks is sized to return about this many bytes (see `WorkerPool.map`).
GROUP_BYTES = 4 << 20
# Shared memory slots per worker whose results the parent hands out without a copy (leased until
# their arrays are garbage collected), beyond the ones results are being computed into.
LEASED_SLOTS = 4
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
            report_activity(_IDLE)
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
    report_activity(_SENDING)
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


# The parent side ------------------------------------------------------------------------------


class WorkerPool:
    """`num_workers` processes, each running `make_task_fn()` once, then its result per task.

    `map(tasks)` sends tasks to the workers in turn, in groups of consecutive tasks, and yields
    results in task order, so the output never depends on which worker is faster or how tasks
    were grouped. At most `tasks_per_worker` groups per worker are in flight, and results reach
    the caller in place in at most LEASED_SLOTS more slots per worker (then they are copied),
    which bounds memory. Exceptions raised by the task function are re-raised in the caller,
    after the results of the tasks before it, with the worker's traceback as a note.

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
        slots = tasks_per_worker + LEASED_SLOTS
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
                        slots,
                        cell,
                    ),
                    name=f"resumax-worker-{index}",
                    daemon=True,
                )
                process.start()
                child_end.close()
                self._connections.append(parent_end)
                self._readers.append(SlotReader(slots, LEASED_SLOTS))
                self._processes.append(process)
                self._activity_cells.append(cell)
        except BaseException:
            self.close()
            raise

    @property
    def worker_pids(self) -> tuple[int, ...]:
        """Process ids of the workers (for monitoring and tests)."""
        return tuple(process.pid for process in self._processes if process.pid is not None)

    def map(
        self, tasks: Iterable[Any], max_group: int = 1, group_bytes: int = GROUP_BYTES
    ) -> Iterator[Any]:
        """Results of the task function for `tasks`, in task order.

        Each message to a worker carries a group of up to `max_group` consecutive tasks: fewer
        messages and process wake-ups per task (about 0.1 ms of CPU each, on both sides). The
        first groups hold one task (a quick first result); later ones as many as keep a group's
        results near `group_bytes`, judged from the results received so far.
        """
        tasks = iter(tasks)
        in_flight: deque[tuple[int, int, list[Any]]] = deque()
        next_worker = 0
        capacity = len(self._connections) * self._tasks_per_worker
        group_size, exhausted = 1, False
        while True:
            while not exhausted and len(in_flight) < capacity:
                group = list(itertools.islice(tasks, group_size))
                exhausted = len(group) < group_size
                if not group:
                    break
                slot = self._readers[next_worker].pick_slot()
                self._send(next_worker, (slot, group))
                in_flight.append((next_worker, slot, group))
                next_worker = (next_worker + 1) % len(self._connections)
            if not in_flight:
                return
            results, failure, nbytes = self._receive(*in_flight.popleft())
            bytes_per_task = max(1, nbytes // max(1, len(results)))
            group_size = max(1, min(max_group, group_bytes // bytes_per_task))
            yield from results
            if failure is not None:
                raise failure

    def _send(self, worker_index: int, task: Any) -> None:
        try:
            self._connections[worker_index].send(task)
        except OSError as error:
            raise self._died(worker_index) from error

    def _receive(
        self, worker_index: int, slot: int, group: list[Any]
    ) -> tuple[list[Any], BaseException | None, int]:
        """(results of a group, the error that ended it or None, bytes of its arrays)."""
        self._wait_for(worker_index, group)
        reader = self._readers[worker_index]
        try:
            message = self._connections[worker_index].recv()
        except (EOFError, OSError) as error:
            raise self._died(worker_index) from error
        if message[0] == "error":
            reader.release(slot)
            return [], self._remote_error(worker_index, message), 0
        try:
            results, failure = reader.unpack(message, slot)
        except Exception as error:
            raise WorkerError(
                f"the result of resumax worker process {worker_index} for "
                f"{self._describe_group(group)} cannot be read in this process ({error!r}): "
                "a stage returned an object that pickles but does not unpickle here; "
                "return numpy arrays and plain Python values"
            ) from error
        if failure is not None:
            failure = self._remote_error(worker_index, failure)
        return results, failure, payload_bytes(message)

    @staticmethod
    def _remote_error(worker_index: int, message: tuple) -> BaseException:
        _, error, remote = message
        error.add_note(f"raised in resumax worker process {worker_index}:\n{remote}")
        return error

    def _describe_group(self, group: list[Any]) -> str:
        if len(group) == 1:
            return self._describe_task(group[0])
        first, last = self._describe_task(group[0]), self._describe_task(group[-1])
        return f"{len(group)} tasks from {first} to {last}"

    def _wait_for(self, worker_index: int, group: list[Any]) -> None:
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
                    f"{self._describe_worker(worker_index, group)} did not answer within "
                    f"worker_timeout={self._timeout} s. A stage may hang (a network read "
                    "without a timeout?); if it is only slow, raise worker_timeout"
                )
            if waited >= next_warning:
                logger.warning(
                    "%s has not answered for %.1f s; the pipeline waits for it. Pass "
                    "Pipeline(worker_timeout=seconds) to make this an error",
                    self._describe_worker(worker_index, group),
                    waited,
                )
                next_warning += WORKER_WAIT_WARNING_SECONDS

    @staticmethod
    def _since(started: float) -> float:
        return time.monotonic() - started

    def _describe_worker(self, worker_index: int, group: list[Any]) -> str:
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
            f"{self._describe_group(group)},"
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
