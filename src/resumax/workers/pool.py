"""The parent side of `resumax.workers`: `WorkerPool` starts the worker processes, sends them
groups of tasks and hands out their results in order, naming a worker that dies or hangs.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from multiprocessing.connection import Connection
from typing import Any

from resumax.errors import WorkerError
from resumax.workers.shared_memory import SlotReader, payload_bytes, sweep
from resumax.workers.worker import IDLE, SENDING, STARTING, worker_main

# Named for the module users know from the README: they may filter its warnings.
logger = logging.getLogger("resumax.workers")

# "forkserver": workers are forked from a small server process started fresh (not from this
# process, whose JAX runtime may already run threads, which fork does not copy safely), and the
# server has imported the main module and what a worker unpickles (the pipeline, sources and
# stages, and with them jax and flax) once, so a worker starts in milliseconds instead of
# re-importing them as "spawn" would. Named one by one: `import resumax` loads its names lazily.
START_METHOD = "forkserver"
_PRELOAD = ["__main__", "resumax.pipeline", "resumax.sources", "resumax.stages"]
SEGMENT_PREFIX = "resumax"
# Seconds the parent waits for one result before it logs a warning naming the worker (and again
# after each further such wait) when the pipeline has no `worker_timeout`. Read at each wait:
# assign `resumax.workers.pool.WORKER_WAIT_WARNING_SECONDS` to change it.
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


def _context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context(START_METHOD)
    # Only the first start of the fork server reads the preload list.
    context.set_forkserver_preload(_PRELOAD)
    return context


# Groups of tasks each worker holds at once (one computing, one queued).
TASKS_PER_WORKER = 2


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
        tasks_per_worker: int = TASKS_PER_WORKER,
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
                cell = context.RawValue("i", STARTING)
                process = context.Process(
                    target=worker_main,
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
        received: tuple[list[Any], BaseException | None] | None = None
        while True:
            # Refilled before the caller takes the last group's results, so that the workers
            # keep `capacity` groups in flight (not one fewer) while it does.
            while not exhausted and len(in_flight) < capacity:
                group = list(itertools.islice(tasks, group_size))
                exhausted = len(group) < group_size
                if not group:
                    break
                slot = self._readers[next_worker].pick_slot()
                self._send(next_worker, (slot, group))
                in_flight.append((next_worker, slot, group))
                next_worker = (next_worker + 1) % len(self._connections)
            if received is not None:
                results, failure = received
                yield from results
                if failure is not None:
                    raise failure
            if not in_flight:
                return
            results, failure, nbytes = self._receive(*in_flight.popleft())
            bytes_per_task = max(1, nbytes // max(1, len(results)))
            group_size = max(1, min(max_group, group_bytes // bytes_per_task))
            received = (results, failure)

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
            STARTING: "still starting (importing, opening the source)",
            IDLE: "between tasks",
            SENDING: "sending its result",
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
