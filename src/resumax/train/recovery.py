"""Getting a run past a bad stretch of data: `resumax train --rewind-to S --skip-batches K` and
`train.spike_recovery` restore an earlier checkpoint, set aside what came after it, and skip
batches. Each logs an event line in metrics.jsonl at the restored step, which a later resume
from that same step replays, so the rewound run is as exact under preemption as any other.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import statistics
from collections import deque
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from tqdm import tqdm

from resumax.errors import ConfigError, ResumaxError
from resumax.pipeline import Pipeline
from resumax.train import distributed
from resumax.train.checks import FiniteLossGuard
from resumax.train.config import Config, SpikeRecoveryConfig
from resumax.train.runlog import METRICS_FILE, MetricsLog, read_metrics
from resumax.train.saving import checkpoint_call

ABANDONED_DIR = "abandoned"
SKIP_EVENTS = ("rewind", "spike_recovery")


class SpikeRecoveryError(ResumaxError):
    """A loss spike after `train.spike_recovery.max_recoveries` recoveries: the run stops."""


class LossWatch:
    """Calls a spike: a non-finite loss, or one above `factor` x the median of the previous
    `window` steps' losses (once `window` are known). Its losses are saved with each checkpoint,
    so a resumed run calls the same spikes as an uninterrupted one."""

    def __init__(self, config: SpikeRecoveryConfig, losses: Sequence[float] = ()):
        self.config = config
        self.losses: deque[float] = deque(losses, maxlen=config.window)

    def trigger(self, loss: float) -> str | None:
        """Why `loss` is a spike, or None (then it joins the window)."""
        if not math.isfinite(loss):
            return f"non-finite loss {loss}"
        if len(self.losses) == self.config.window:
            median = statistics.median(self.losses)
            if loss > self.config.factor * median:
                return (
                    f"loss {loss:.6g} > {self.config.factor:g} x {median:.6g} (the median of the "
                    f"previous {self.config.window} steps' losses)"
                )
        self.losses.append(loss)
        return None

    def to_json(self) -> dict[str, Any]:
        return {"losses": list(self.losses)}

    def restore(self, saved: dict[str, Any] | None) -> None:
        """Takes the losses saved with a checkpoint (None: none saved, start empty)."""
        self.losses = deque((saved or {}).get("losses", ()), maxlen=self.config.window)


def checkpoint_steps(directory: str) -> list[int]:
    """The committed steps in an Orbax checkpoint directory (tmp directories have other names)."""
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted(int(name) for name in names if name.isdigit())


def rewind_step(steps: Sequence[int], rewind_to: int) -> int:
    """The newest checkpoint step at or before `rewind_to`; ConfigError listing those kept."""
    candidates = [step for step in steps if step <= rewind_to]
    if not candidates:
        kept = ", ".join(map(str, sorted(steps))) or "none"
        raise ConfigError(
            f"--rewind-to {rewind_to}: no checkpoint at or before step {rewind_to} was kept "
            f"(steps kept: {kept}); rewind to one of those, or raise train.max_to_keep for "
            "later runs"
        )
    return max(candidates)


def abandon_after(run_dir: str, checkpoint_dir: str, step: int, steps: Sequence[int]) -> str | None:
    """Moves the checkpoint steps after `step` and the metrics lines after it into
    `<run_dir>/abandoned/<UTC time>/` (nothing is deleted); returns that directory, or None
    when there was nothing to move."""
    later = sorted(s for s in steps if s > step)
    metrics_path = os.path.join(run_dir, METRICS_FILE)
    lines = read_metrics(metrics_path)
    dropped = [line for line in lines if line.get("step", 0) > step]
    if not later and not dropped:
        return None
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    target = os.path.join(run_dir, ABANDONED_DIR, stamp)
    os.makedirs(os.path.join(target, "checkpoints"))
    with open(os.path.join(target, METRICS_FILE), "w", encoding="utf-8") as file:
        file.writelines(json.dumps(line) + "\n" for line in dropped)
    for moved in later:
        shutil.move(
            os.path.join(checkpoint_dir, str(moved)),
            os.path.join(target, "checkpoints", str(moved)),
        )
    kept = [line for line in lines if line.get("step", 0) <= step]
    with open(f"{metrics_path}.partial", "w", encoding="utf-8") as file:
        file.writelines(json.dumps(line) + "\n" for line in kept)
    os.replace(f"{metrics_path}.partial", metrics_path)
    return target


def last_step_reached(run_dir: str, steps: Sequence[int]) -> int:
    """The furthest step a run got to: its newest checkpoint or metrics line."""
    lines = read_metrics(os.path.join(run_dir, METRICS_FILE))
    return max([*steps, *(line.get("step", 0) for line in lines), 0])


def skip_events(run_dir: str, step: int) -> list[dict[str, Any]]:
    """The rewind and spike-recovery events logged at `step`, in order."""
    lines = read_metrics(os.path.join(run_dir, METRICS_FILE))
    return [e for e in lines if e.get("step") == step and e.get("event") in SKIP_EVENTS]


def logged_events(run_dir: str, kind: str) -> list[dict[str, Any]]:
    """The events of one kind in metrics.jsonl, in order."""
    lines = read_metrics(os.path.join(run_dir, METRICS_FILE))
    return [line for line in lines if line.get("event") == kind]


def replay_skips(pipeline: Pipeline, events: Sequence[dict[str, Any]]) -> None:
    """Makes again the skips of events logged at the step just restored: its checkpoint was
    saved before them."""
    for event in events:
        pipeline.skip(int(event["skipped_batches"]))
    if events:
        counts = ", ".join(f"{e['skipped_batches']} ({e['event']})" for e in events)
        print(
            f"replayed the skips logged at step {events[0]['step']}: {counts} batches", flush=True
        )


def skip_and_describe(pipeline: Pipeline, num_batches: int) -> dict[str, Any]:
    """Skips `num_batches` batches; returns the event fields that describe the skip:
    `skipped_batches` and `skipped_positions` [first, last] (global, inclusive)."""
    before = pipeline.global_position
    pipeline.skip(num_batches)
    return {
        "skipped_batches": num_batches,
        "skipped_positions": [before, pipeline.global_position - 1],
    }


# Rewind and spike recovery in a run ----------------------------------------------------------


def set_aside_for_rewind(config: Config, rewind_to: int) -> int:
    """Moves the checkpoints and metrics lines after the newest checkpoint at or before
    `rewind_to` aside (process 0; the others wait); returns the step the run had reached."""
    directory = os.path.abspath(config.train.checkpoint_dir)
    steps = checkpoint_steps(directory)
    target = rewind_step(steps, rewind_to)
    reached = last_step_reached(config.train.run_dir, steps)
    if jax.process_index() == 0:
        moved = abandon_after(config.train.run_dir, directory, target, steps)
        if moved is not None:
            print(f"rewind: set aside what came after step {target} in {moved}", flush=True)
    distributed.barrier("resumax: rewind set aside")
    return reached


def log_rewind(
    pipeline: Pipeline, metrics: MetricsLog | None, step: int, reached: int, num_batches: int
) -> None:
    """Skips `num_batches` after the restored `step` and logs the rewind event."""
    skipped = skip_and_describe(pipeline, num_batches)
    if metrics is not None:
        metrics.write({"step": step, "event": "rewind", "from_step": reached, **skipped})
    first, last = skipped["skipped_positions"]
    print(
        f"rewound from step {reached} to step {step} and skipped {num_batches} batches "
        f"(positions {first}..{last})",
        flush=True,
    )


def recover(run: Any, spike_step: int, reason: str) -> int:
    """After a spike at `spike_step` of a training run (`resumax.train.loop`): restores the
    latest committed checkpoint (or the state before step 1), sets aside the metrics lines
    after it, skips the batches from it through the spike plus `skip_batches`, and logs the
    event; returns the restored step. SpikeRecoveryError after `max_recoveries`."""
    spike = run.config.train.spike_recovery
    run_dir = run.config.train.run_dir
    made = logged_events(run_dir, "spike_recovery")
    if len(made) >= spike.max_recoveries:
        raise SpikeRecoveryError(
            f"at step {spike_step}, {reason}, after {len(made)} spike recoveries (from steps "
            f"{', '.join(str(e['from_step']) for e in made)}; train.spike_recovery."
            f"max_recoveries is {spike.max_recoveries}): stopped without saving that state"
        )
    checkpoint_call(run.manager, "committing", run.manager.wait_until_finished)
    run.loss_guard = FiniteLossGuard()
    restored = run.restore_latest()
    if restored is None:
        tree, data_state = run.initial
        nnx.replace_by_pure_dict(run.state, {0: tree["model"], 1: tree["optimizer"]})
        run.pipeline.set_state(data_state)
        run.loss_watch.restore(None)
        replay_skips(run.pipeline, skip_events(run_dir, 0))
        restored = 0
    skipped = skip_and_describe(run.pipeline, spike_step - restored + spike.skip_batches)
    line = {"step": restored, "event": "spike_recovery", "from_step": spike_step}
    line.update(trigger=reason, **skipped, recovery=len(made) + 1)
    if run.metrics is not None:
        abandon_after(run_dir, run.config.train.checkpoint_dir, restored, [])
        run.metrics.close()
        run.metrics = MetricsLog(run_dir, restored, tensorboard=run.config.train.tensorboard)
        run.metrics.write(line)
    first, last = skipped["skipped_positions"]
    tqdm.write(
        f"spike recovery {len(made) + 1}: at step {spike_step}, {reason}; restored step "
        f"{restored} and skipped {skipped['skipped_batches']} batches (positions "
        f"{first}..{last})"
    )
    return restored
