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
from resumax.shared_memory import SlotReader, SlotWriter, sweep

# "forkserver": workers are forked from a small server process started fresh (not from this
# process, whose JAX runtime may already run threads, which fork does not copy safely), and the
# server has imported resumax and the main module once, so a worker starts in milliseconds
# instead of re-importing jax and flax as "spawn" would.
START_METHOD = "forkserver"
SEGMENT_PREFIX = "resumax"
# Seconds a worker gets to finish its current task and exit after a stop request, then after
# SIGTERM, before it is killed.
_STOP_GRACE, _TERMINATE_GRACE = 1.0, 5.0
_NO_TASK = object()


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


def _worker_main(
    connection: Connection,
    make_task_fn: Callable[[], Callable[[Any], Any]],
    prefix: str,
    slots: int,
) -> None:
    """Answers tasks in the order received until told to stop or the parent goes away."""
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
        for count in itertools.count():
            try:
                task = connection.recv()
            except (EOFError, OSError):
                return
            if task is None:
                return
            if startup_error is not None:
                message = startup_error
            else:
                try:
                    if use_allocator is not None:
                        use_allocator(writer.allocator(count % slots))
                    message = writer.pack(task_fn(task), count % slots)
                except Exception as error:
                    message = _error_message(error)
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

    `map(tasks)` sends task k to worker k mod num_workers and yields results in task order, so
    the output never depends on which worker is faster. At most `tasks_per_worker` tasks per
    worker are in flight, which bounds memory. Exceptions raised by the task function are
    re-raised in the caller with the worker's traceback as a note.
    """

    def __init__(
        self,
        make_task_fn: Callable[[], Callable[[Any], Any]],
        num_workers: int,
        *,
        tasks_per_worker: int = 2,
    ):
        context = _context()
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
                    args=(child_end, make_task_fn, f"{self._prefix}-w{index}", tasks_per_worker),
                    name=f"resumax-worker-{index}",
                    daemon=True,
                )
                process.start()
                child_end.close()
                self._connections.append(parent_end)
                self._readers.append(SlotReader(tasks_per_worker))
                self._processes.append(process)
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
        in_flight: deque[int] = deque()
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
                in_flight.append(next_worker)
                next_worker = (next_worker + 1) % len(self._connections)
            if not in_flight:
                return
            yield self._receive(in_flight.popleft())

    def _send(self, worker_index: int, task: Any) -> None:
        try:
            self._connections[worker_index].send(task)
        except OSError as error:
            raise self._died(worker_index) from error

    def _receive(self, worker_index: int) -> Any:
        try:
            message = self._connections[worker_index].recv()
            if message[0] != "error":
                return self._readers[worker_index].unpack(message)
        except (EOFError, OSError) as error:
            raise self._died(worker_index) from error
        _, error, remote = message
        error.add_note(f"raised in resumax worker process {worker_index}:\n{remote}")
        raise error

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
