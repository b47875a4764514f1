"""When a training loop should save and stop: SIGTERM on one host, Orbax's agreed step under
`jax.distributed` (see REFERENCE.md, "Preemption").
"""

from __future__ import annotations

import signal
from typing import Any

import jax
import orbax.checkpoint as ocp


class PreemptionWatch:
    """Tells the loop when to save and stop.

    Single host: a SIGTERM handler that only sets a flag (saving inside a handler could interleave
    with a save already in progress). Under `jax.distributed`, JAX's preemption service owns
    SIGTERM and `CheckpointManager.reached_preemption` makes all hosts agree on the step, so no
    Python handler is installed (the last installed handler would win).
    """

    def __init__(self) -> None:
        self.distributed = jax.distributed.is_initialized()
        self.signal_received = False
        self._previous = None if self.distributed else signal.signal(signal.SIGTERM, self._flag)

    def _flag(self, signum: int, frame: Any) -> None:
        self.signal_received = True

    def reached(self, manager: ocp.CheckpointManager, step: int) -> bool:
        """True once the loop should save `step` and stop; call it at every step on every host."""
        if self.distributed:
            return manager.reached_preemption(step)
        return self.signal_received

    def close(self) -> None:
        """Puts back the SIGTERM handler that was installed before this watch."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
