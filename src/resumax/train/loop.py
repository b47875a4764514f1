"""The reference training loop: a Flax NNX model, an Optax optimizer and a resumax pipeline, with
params, optimizer state and data position saved together in one Orbax step and resumed bit-exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

from resumax.checkpoint import CheckpointRestore, CheckpointSave
from resumax.errors import CheckpointError, ResumaxError, StageError
from resumax.train import distributed
from resumax.train.checks import FiniteLossGuard, check_output_dirs, unwrap_config_error
from resumax.train.classifier import ClassifierTask
from resumax.train.config import Config, OptimizerConfig
from resumax.train.lm import LanguageModelTask
from resumax.train.preemption import PreemptionWatch
from resumax.train.recovery import (
    LossWatch,
    log_rewind,
    recover,
    replay_skips,
    set_aside_for_rewind,
    skip_events,
)
from resumax.train.resume_checks import check_same_data, check_same_model
from resumax.train.run_lock import RunLock
from resumax.train.runlog import METRICS_FILE, MetricsLog, plot_metrics, read_metrics, record_config
from resumax.train.saving import checkpoint_call, orbax_errors_contained
from resumax.train.timing import LineTimer


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """How a call to `train` ended: the last step reached and whether it was cut short."""

    step: int
    resumed_from: int | None
    preempted: bool
    final_loss: float | None
    params_sha256: str
    interrupted: bool = False  # stopped by Ctrl-C (SIGINT) rather than SIGTERM


def make_task(config: Config) -> ClassifierTask | LanguageModelTask:
    """The task a config trains: a language model for model.name: transformer, else digits."""
    if config.model.name == "transformer":
        return LanguageModelTask(config)
    return ClassifierTask(config)


def prepare_task_data(task: ClassifierTask | LanguageModelTask) -> None:
    """Process 0 writes the task's data set if it is missing; the others wait for the atomic
    rename."""
    if jax.process_index() == 0:
        task.prepare_data()
    distributed.barrier("resumax: data prepared")


def build_optimizer(config: OptimizerConfig, num_steps: int) -> optax.GradientTransformation:
    """`optax.<name>` with the configured schedule; weight decay is passed to optimizers that
    take it (decoupled, e.g. adamw) and otherwise added to the gradient (`add_decayed_weights`)."""
    peak = config.learning_rate
    if config.schedule == "cosine":
        schedule = optax.cosine_decay_schedule(peak, decay_steps=num_steps)
    elif config.schedule == "warmup_cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, peak, config.warmup_steps, num_steps)
    else:
        schedule = optax.constant_schedule(peak)
    factory = getattr(optax, config.name)
    if "weight_decay" in inspect.signature(factory).parameters:
        return factory(learning_rate=schedule, weight_decay=config.weight_decay)
    if config.weight_decay:
        decay = optax.add_decayed_weights(config.weight_decay)
        return optax.chain(decay, factory(learning_rate=schedule))
    return factory(learning_rate=schedule)


def checkpoint_tree(state: nnx.State) -> dict[str, Any]:
    """The (model, optimizer) state as the plain dict Orbax stores: {"model", "optimizer"}."""
    pure = nnx.to_pure_dict(state)
    return {"model": pure[0], "optimizer": pure[1]}


def params_sha256(tree: dict[str, Any]) -> str:
    """A digest of the model's parameter bytes, to compare runs at a glance."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(tree["model"]):
        digest.update(distributed.host_array(leaf).tobytes())
    return digest.hexdigest()


class _Run:
    """One process's share of a run: builds everything from the config and owns the outputs."""

    def __init__(self, config: Config):
        self.config = config
        train = config.train
        self.task = make_task(config)
        prepare_task_data(self.task)
        # Data parallel over every device of every process: each process reads its slice of the
        # global batch, which arrives as one jax.Array split along the batch axis.
        mesh = distributed.data_parallel_mesh()
        self.pipeline = self.task.build_pipeline(distributed.pipeline_sharding(mesh))
        model = self.task.build_model()
        optimizer = nnx.Optimizer(
            model, build_optimizer(config.optimizer, train.num_steps), wrt=nnx.Param
        )
        self.graphdef, self.state = nnx.split((model, optimizer))
        self.place: Callable[[Any], Any] = lambda tree: tree
        if jax.process_count() > 1:
            self.place = functools.partial(distributed.replicate, mesh=mesh)
            self.state = self.place(self.state)
        self.loss_guard = FiniteLossGuard()
        spike = train.spike_recovery
        self.loss_watch = LossWatch(spike) if spike is not None else None
        # Where a recovery with no checkpoint yet goes back to: the state before step 1.
        self.initial = None
        if spike is not None:
            self.initial = (checkpoint_tree(self.state), self.pipeline.get_state())
        self.metrics: MetricsLog | None = None
        self.train_step, self.eval_step = self.task.make_steps(self.graphdef)
        self.primary = jax.process_index() == 0
        os.makedirs(train.run_dir, exist_ok=True)
        self.manager = ocp.CheckpointManager(
            os.path.abspath(train.checkpoint_dir),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=train.max_to_keep,
                create=True,
                cleanup_tmp_directories=True,
                enable_async_checkpointing=True,
            ),
        )
        self.saved_step: int | None = None

    def restore_latest(self) -> int | None:
        """Restores params, optimizer state and data position of the latest committed step (and
        the skips logged at that step, made after it was saved)."""
        step = self.manager.latest_step()
        if step is None:
            replay_skips(self.pipeline, skip_events(self.config.train.run_dir, 0))
            return None
        step_dir = self.manager.directory / str(step)
        check_same_model(step_dir, checkpoint_tree(self.state))
        data = self.config.data
        check_same_data(step_dir, self.pipeline.get_state(), {"data.train_paths": data.train_paths})
        items = {
            "state": ocp.args.StandardRestore(checkpoint_tree(self.state)),
            "data": CheckpointRestore(self.pipeline),
        }
        if self.loss_watch is not None and (step_dir / "loss_watch").is_dir():
            items["loss_watch"] = ocp.args.JsonRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except ResumaxError:
            raise
        except Exception as error:
            raise CheckpointError(
                f"cannot restore step {step} from {self.manager.directory}: {error}; was it "
                "written with another model or optimizer config? Use a new train.run_dir"
            ) from error
        pure = {0: restored.state["model"], 1: restored.state["optimizer"]}
        nnx.replace_by_pure_dict(self.state, pure)
        if self.loss_watch is not None:
            self.loss_watch.restore(restored.get("loss_watch"))
        replay_skips(self.pipeline, skip_events(self.config.train.run_dir, step))
        self.saved_step = step
        return step

    def save(self, step: int) -> None:
        """Starts an async save of step `step` (params, optimizer state, data position)."""
        if step == self.saved_step:
            return
        self.loss_guard.check(self.saved_step)
        items = {
            "state": ocp.args.StandardSave(checkpoint_tree(self.state)),
            "data": CheckpointSave(self.pipeline),
        }
        if self.loss_watch is not None:
            items["loss_watch"] = ocp.args.JsonSave(self.loss_watch.to_json())
        args = ocp.args.Composite(**items)
        # Orbax's save waits for the previous one anyway; waiting first names the failed step.
        previous = f"committing step {self.saved_step}"
        checkpoint_call(self.manager, previous, self.manager.wait_until_finished)
        save = functools.partial(self.manager.save, step, args=args, force=True)
        checkpoint_call(self.manager, f"saving step {step}", save)
        self.saved_step = step

    def close(self) -> None:
        """Waits for the last save to commit, closes the manager; CheckpointError if it failed."""
        checkpoint_call(self.manager, f"committing step {self.saved_step}", self.manager.close)

    def metrics_line(
        self, step: int, loss: jax.Array, step_metrics: dict[str, jax.Array]
    ) -> dict[str, Any] | None:
        """The metrics of `step` if it is logged (every log_every and eval_every, and the last)."""
        train = self.config.train
        evaluating = self.task.evaluates and step % train.eval_every == 0
        if step % train.log_every and not evaluating and step != train.num_steps:
            return None
        self.loss_guard.check(self.saved_step)
        line = {"step": step, "loss": float(distributed.host_array(loss))}
        line.update((k, float(distributed.host_array(v))) for k, v in step_metrics.items())
        if evaluating:
            line.update(self.task.evaluate(self.eval_step, self.state, self.place))
        return line

    def loop(self, start: int, watch: PreemptionWatch) -> tuple[int, bool]:
        """Trains from step `start`; returns (last step, whether preemption stopped it).

        Checks for preemption before each step, so the step it returns is fully applied.
        """
        train = self.config.train
        step, resumed = start, start > 0
        timer, mark_step = LineTimer(), step
        batches = iter(self.pipeline)
        with tqdm(total=train.num_steps, initial=step, unit="step", disable=None) as bar:
            while step < train.num_steps:
                if watch.reached(self.manager, step):
                    return step, True
                try:
                    batch = timer.next_batch(batches)
                except StageError as error:
                    raise unwrap_config_error(error) from error
                if batch is None:
                    bar.write(f"the data ended after step {step} (data.num_epochs)")
                    break
                self.state, loss, step_metrics = self.train_step(
                    self.state, *self.task.inputs(batch), np.int32(step)
                )
                step += 1
                self.loss_guard.observe(step, loss)
                if self.loss_watch is not None:
                    reason = self.loss_watch.trigger(float(distributed.host_array(loss)))
                    if reason is not None:
                        step = mark_step = recover(self, step, reason)
                        batches = iter(self.pipeline)
                        bar.n = step
                        bar.refresh()
                        continue
                bar.update(1)
                line = self.metrics_line(step, loss, step_metrics)
                if line is not None:
                    seconds, waits = timer.lap()
                    rates = self.task.throughput(step - mark_step, seconds)
                    line.update(rates, **waits, resumed=resumed)
                    if self.metrics is not None:
                        self.metrics.write(line)
                    postfix = {name: f"{rate:.0f}" for name, rate in rates.items()}
                    bar.set_postfix(
                        loss=f"{line['loss']:.4f}",
                        **postfix,
                        data_wait_fraction=f"{waits['data_wait_fraction']:.2f}",
                    )
                    mark_step, resumed = step, False
                if step % train.checkpoint_every == 0:
                    self.save(step)
        return step, False


def train(config: Config, rewind: tuple[int, int] | None = None) -> TrainResult:
    """Runs (or resumes) the configured training to `train.num_steps`, or until SIGTERM / Ctrl-C.

    Before step 1 it checks that the output directories are writable and the labels fit the
    model (ConfigError), and locks `train.run_dir` against a second process (ConfigError naming
    its pid). Prints "resumed from step N" when it restores a checkpoint. On SIGTERM or a first
    Ctrl-C it saves the current step, waits for the commit and returns with `preempted=True`
    (`interrupted=True` for Ctrl-C). A failed save raises CheckpointError and a NaN or infinite
    loss NonFiniteLossError (unless `train.spike_recovery` recovers from it); either way the
    latest committed step is a finite, complete one.
    `rewind=(step, num_batches)`: first restore the newest checkpoint at or before `step`, set
    the later checkpoints and metrics lines aside in `<run_dir>/abandoned/`, and skip
    `num_batches` batches (see `resumax.train.recovery`).
    Must run on the main thread (it installs the signal handlers).
    """
    train_config = config.train
    if train_config.distributed:
        distributed.initialize(
            train_config.coordinator_address, train_config.num_processes, train_config.process_id
        )
    check_output_dirs(config)
    lock = RunLock(train_config.run_dir) if jax.process_index() == 0 else None
    watch = PreemptionWatch()
    run = None
    try:
        with orbax_errors_contained():
            try:
                reached = set_aside_for_rewind(config, rewind[0]) if rewind is not None else None
                run = _Run(config)
                resumed_from = run.restore_latest()
                if resumed_from is not None:
                    print(f"resumed from step {resumed_from}", flush=True)
                if run.primary:
                    record_config(train_config.run_dir, config)
                    run.metrics = MetricsLog(
                        train_config.run_dir,
                        resumed_from or 0,
                        tensorboard=train_config.tensorboard,
                    )
                if rewind is not None:
                    log_rewind(run.pipeline, run.metrics, resumed_from or 0, reached, rewind[1])
                step, preempted = run.loop(resumed_from or 0, watch)
                if step > 0:
                    run.save(step)
            except (CheckpointError, KeyboardInterrupt):
                raise  # Orbax's threads may never finish a failed or aborted save: no waiting.
            except BaseException:
                if run is not None:
                    # The earlier, finite steps still being saved become the latest committed.
                    with contextlib.suppress(ResumaxError):
                        run.close()
                raise
            run.close()
        return _finish(run, step, resumed_from, preempted, watch)
    finally:
        if run is not None and run.metrics is not None:
            run.metrics.close()
        if lock is not None:
            lock.close()
        watch.close()


def _finish(
    run: _Run, step: int, resumed_from: int | None, preempted: bool, watch: PreemptionWatch
) -> TrainResult:
    """Redraws the plot and reports how the run ended, once the last step is committed."""
    train_config = run.config.train
    lines = read_metrics(os.path.join(train_config.run_dir, METRICS_FILE))
    plot = plot_metrics(train_config.run_dir) if run.primary and lines else None
    result = TrainResult(
        step=step,
        resumed_from=resumed_from,
        preempted=preempted,
        final_loss=next((m["loss"] for m in reversed(lines) if "loss" in m), None),
        params_sha256=params_sha256(checkpoint_tree(run.state)),
        interrupted=preempted and watch.interrupted,
    )
    checkpoints = os.path.abspath(train_config.checkpoint_dir)
    if preempted and step == 0:
        print(f"{watch.reason} before the first step: nothing to save", flush=True)
    elif preempted:
        print(
            f"{watch.reason}: saved step {step} to {checkpoints} and waited for the commit; "
            "run the same command again to resume",
            flush=True,
        )
    print(
        f"{'stopped' if preempted else 'finished'} at step {step}: last logged loss "
        f"{result.final_loss!r}, params sha256 {result.params_sha256}",
        flush=True,
    )
    if plot is not None:
        print(
            f"metrics: {os.path.join(train_config.run_dir, METRICS_FILE)}  plot: {plot}", flush=True
        )
    return result
