"""Worker processes for `Pipeline(num_workers=N)`: a task function in N processes, ordered results.

Results come back as small pipe messages whose array bytes travel through shared memory slots
(`resumax.shared_memory`).
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import pickle
import secrets
import signal
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection
from typing import Any

from resumax.errors import ConfigError, ResumaxError, WorkerError
from resumax.shared_memory import SlotReader, SlotWriter, payload_bytes, sweep

# "forkserver": workers are forked from a small server process started fresh (not from this
# process, whose JAX runtime may already run threads, which fork does not copy safely), and the
# server has imported resumax and the main module once, so a worker starts in milliseconds
# instead of re-importing jax and flax as "spawn" would.
START_METHOD = "forkserver"
SEGMENT_PREFIX = "resumax"
# Seconds a worker gets to finish its current task and exit after a stop request, then after
# SIGTERM, before it is killed.
_STOP_GRACE, _TERMINATE_GRACE = 1.0, 5.0
# A group of tasks is sized to return about this many bytes (see `WorkerPool.map`).
GROUP_BYTES = 4 << 20
# Shared memory slots per worker whose results the parent hands out without a copy (leased until
# their arrays are garbage collected), beyond the ones results are being computed into.
LEASED_SLOTS = 4


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


def _context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context(START_METHOD)
    # Only the first start of the fork server reads the preload list.
    context.set_forkserver_preload(["__main__", "resumax"])
    return context


# The worker side ------------------------------------------------------------------------------


def _error_message(error: BaseException) -> tuple:
    remote = "".join(traceback.format_exception(error))
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        error = ResumaxError(f"{type(error).__name__}: {error}")
    return ("error", error, remote)


def _raise_system_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _run_group(
    task_fn: Callable[[Any], Any],
    use_allocator: Callable[[Any], None] | None,
    tasks: list[Any],
    writer: SlotWriter,
    slot: int,
) -> tuple:
    """The message answering a group of tasks: their results, up to the first that failed and
    its error (the results before it are still delivered first), or that error alone."""
    results, failure = [], None
    allocate = writer.allocator(slot) if use_allocator is not None else None
    try:
        for task in tasks:
            if use_allocator is not None:
                use_allocator(allocate)
            results.append(task_fn(task))
        return writer.pack((results, None), slot)
    except Exception as error:
        failure = _error_message(error)
    if not results:
        return failure
    try:
        return writer.pack((results, failure), slot)
    except Exception as error:
        return _error_message(error)


def _worker_main(
    connection: Connection,
    make_task_fn: Callable[[], Callable[[Any], Any]],
    prefix: str,
    slots: int,
) -> None:
    """Answers groups of tasks in the order received until told to stop or the parent goes
    away."""
    # Ctrl-C reaches the whole process group: the parent handles it and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM unwinds through `finally`, which removes this worker's unread segments.
    signal.signal(signal.SIGTERM, _raise_system_exit)
    writer = SlotWriter(prefix, slots)
    try:
        try:
            task_fn, startup_error = make_task_fn(), None
        except Exception as error:
            task_fn, startup_error = None, _error_message(error)
        # A task function with `use_allocator` builds its arrays in the result's slot.
        use_allocator = getattr(task_fn, "use_allocator", None)
        while True:
            try:
                group = connection.recv()
            except (EOFError, OSError):
                return
            if group is None:
                return
            slot, tasks = group
            message = startup_error or _run_group(task_fn, use_allocator, tasks, writer, slot)
            try:
                connection.send(message)
            except OSError:
                return
    finally:
        sweep(f"{prefix}-")
        connection.close()


# The parent side ------------------------------------------------------------------------------


class WorkerPool:
    """`num_workers` processes, each running `make_task_fn()` once, then its result per task.

    `map(tasks)` sends tasks to the workers in turn, in groups of consecutive tasks, and yields
    results in task order, so the output never depends on which worker is faster or how tasks
    were grouped. At most `tasks_per_worker` groups per worker are in flight, and results reach
    the caller in place in at most LEASED_SLOTS more slots per worker (then they are copied),
    which bounds memory. Exceptions raised by the task function are re-raised in the caller,
    after the results of the tasks before it, with the worker's traceback as a note.
    """

    def __init__(
        self,
        make_task_fn: Callable[[], Callable[[Any], Any]],
        num_workers: int,
        *,
        tasks_per_worker: int = 2,
    ):
        context = _context()
        slots = tasks_per_worker + LEASED_SLOTS
        self._prefix = f"{SEGMENT_PREFIX}-{os.getpid()}-{secrets.token_hex(4)}"
        self._tasks_per_worker = tasks_per_worker
        self._connections: list[Connection] = []
        self._readers: list[SlotReader] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        try:
            for index in range(num_workers):
                parent_end, child_end = context.Pipe(duplex=True)
                process = context.Process(
                    target=_worker_main,
                    args=(child_end, make_task_fn, f"{self._prefix}-w{index}", slots),
                    name=f"resumax-worker-{index}",
                    daemon=True,
                )
                process.start()
                child_end.close()
                self._connections.append(parent_end)
                self._readers.append(SlotReader(slots, LEASED_SLOTS))
                self._processes.append(process)
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
        in_flight: deque[int] = deque()
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
                in_flight.append((next_worker, slot))
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

    def _receive(self, worker_index: int, slot: int) -> tuple[list[Any], BaseException | None, int]:
        """(results of a group, the error that ended it or None, bytes of its arrays)."""
        reader = self._readers[worker_index]
        try:
            message = self._connections[worker_index].recv()
            if message[0] == "error":
                reader.release(slot)
                return [], self._remote_error(worker_index, message), 0
            results, failure = reader.unpack(message, slot)
        except (EOFError, OSError) as error:
            raise self._died(worker_index) from error
        if failure is not None:
            failure = self._remote_error(worker_index, failure)
        return results, failure, payload_bytes(message)

    @staticmethod
    def _remote_error(worker_index: int, message: tuple) -> BaseException:
        _, error, remote = message
        error.add_note(f"raised in resumax worker process {worker_index}:\n{remote}")
        return error

    def _died(self, worker_index: int) -> WorkerError:
        process = self._processes[worker_index]
        process.join(_STOP_GRACE)
        return WorkerError(
            f"resumax worker process {worker_index} (pid {process.pid}) stopped unexpectedly "
            f"with exit code {process.exitcode}; it may have run out of memory or been killed"
        )

    def stop_workers(self) -> None:
        """Asks every worker to stop, then terminates, then kills the ones still running."""
        for connection in self._connections:
            with contextlib.suppress(OSError):
                connection.send(None)
        for process in self._processes:
            process.join(_STOP_GRACE)
        for process in self._processes:
            if process.is_alive():
                process.terminate()
                process.join(_TERMINATE_GRACE)
            if process.is_alive():
                process.kill()
                process.join()

    def close(self) -> None:
        """Stops the workers, closes the pipes and removes any segment no one has read."""
        self.stop_workers()
        for connection in self._connections:
            connection.close()
        for process in self._processes:
            process.close()
        self._connections, self._processes, self._readers = [], [], []
        sweep(f"{self._prefix}-")
