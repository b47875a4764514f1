"""When a training loop should save and stop: SIGTERM or Ctrl-C (SIGINT) on one host, Orbax's
agreed step under `jax.distributed` (see REFERENCE.md, "Preemption").
"""

from __future__ import annotations

import os
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp

# Exit status of a run stopped by Ctrl-C, as shells report a SIGINT death (128 + 2).
INTERRUPTED_EXIT_STATUS = 130


class PreemptionWatch:
    """Tells the loop when to save and stop, and keeps a repeated signal from killing the save.

    Single host: SIGTERM and SIGINT handlers that only count and set a flag (saving inside a
    handler could interleave with a save already in progress). The first SIGTERM or SIGINT asks
    the loop to save the current step and stop. A second Ctrl-C says that the run is waiting for
    the commit; a third ends the process at once with exit status 130 (abort: the step being
    saved may be lost, the previous committed step stays the latest). Further SIGTERMs are
    ignored. Once a stop signal has arrived the handlers stay installed until the process exits
    (`close` keeps them), so a signal that lands while the run prints, draws or exits cannot
    kill it.

    Under `jax.distributed`, JAX's preemption service owns SIGTERM and
    `CheckpointManager.reached_preemption` makes all hosts agree on the step, so no Python handler
    is installed (the last installed handler would win).
    """

    def __init__(self) -> None:
        self.distributed = jax.distributed.is_initialized()
        self.signal_received = False
        self.interrupted = False
        self.interrupts = 0
        self._previous: dict[int, Any] = {}
        if not self.distributed:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._terminate)
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._ctrl_c)

    def _terminate(self, signum: int, frame: Any) -> None:
        self.signal_received = True

    def _ctrl_c(self, signum: int, frame: Any) -> None:
        self.interrupts += 1
        if self.interrupts == 1:
            self.interrupted = True
            self.signal_received = True
            _say("\ninterrupt: saving the current step, then stopping (Ctrl-C again to hurry)")
        elif self.interrupts == 2:
            _say(
                "\ninterrupt: waiting for the checkpoint to commit; "
                "Ctrl-C once more aborts (the step being saved may be lost)"
            )
        else:
            # Ends the process here: a KeyboardInterrupt raised from a handler can land in a
            # garbage-collection finalizer or a lock wait, where Python prints and drops it.
            # The committed steps are intact (commits are atomic); the one being saved is lost.
            _say("resumax train: aborted (Ctrl-C)")
            os._exit(INTERRUPTED_EXIT_STATUS)

    @property
    def reason(self) -> str:
        """What stopped the run, for messages: "interrupted" (Ctrl-C) or "preempted (SIGTERM)"."""
        return "interrupted" if self.interrupted else "preempted (SIGTERM)"

    def reached(self, manager: ocp.CheckpointManager, step: int) -> bool:
        """True once the loop should save `step` and stop; call it at every step on every host."""
        if self.distributed:
            return manager.reached_preemption(step)
        return self.signal_received

    def close(self) -> None:
        """Puts back the handlers installed before this watch, unless a stop signal arrived: then
        the process is on its way out and the handlers stay until it exits."""
        if self.signal_received:
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


def ignore_stop_signals_until_exit() -> None:
    """Ignores SIGTERM and SIGINT for the rest of the process, once a run has saved and is exiting.

    While the interpreter shuts down (after `main` returns: modules, JAX's runtime) it puts
    Python-level handlers back to the default action, so a SIGTERM then would kill a run that
    already saved (exit -15), and a late Ctrl-C would print a KeyboardInterrupt traceback; an
    ignored signal stays ignored to the end. The run is saved: there is nothing left to abort.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _say(text: str) -> None:
    """Writes a line to stderr from a signal handler: `print` may be mid-write on the same
    stream, and a buffered stream refuses a reentrant call."""
    os.write(2, (text + "\n").encode())
