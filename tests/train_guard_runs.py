"""The `resumax train` runs the guard tests make: the digits config with a tiny model, its data,
a child process to signal and watch, the same training in-process, and what a run left on disk."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from resumax.train.config import load_config
from resumax.train.datasets import prepare_digits
from resumax.train.loop import train
from resumax.train.runlog import read_metrics

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "digits.yaml"
TIMEOUT = 120
# A tiny MLP, a checkpoint every 5 steps: a run reaches its first step in a few seconds.
OVERRIDES = [
    "train.log_every=1",
    "train.eval_every=1000",
    "train.checkpoint_every=5",
    "model.hidden_sizes=[16]",
    "model.dropout=0.0",
    "data.batch_size=16",
    "optimizer.schedule=constant",
]
ENDLESS = 100_000


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data") / "digits"
    prepare_digits(directory)
    return directory


class Training:
    """A `resumax train` child process; stdout / stderr go to pipes read at the end."""

    def __init__(
        self, run_dir, data_dir, *overrides, num_steps=20, launcher=(), config=CONFIG, **popen
    ):
        command = [
            sys.executable,
            *(launcher or ["-m", "resumax", "train"]),
            "--config",
            str(config),
            *OVERRIDES,
            f"train.num_steps={num_steps}",
            f"data.dir={data_dir}",
            f"train.run_dir={run_dir}",
            *overrides,
        ]
        self.run_dir = Path(run_dir)
        popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
        self.process = subprocess.Popen(command, cwd=REPO, text=True, **popen)

    def send(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self) -> tuple[int, str, str]:
        stdout, stderr = self.process.communicate(timeout=TIMEOUT)
        return self.process.returncode, stdout, stderr

    def wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not condition():
            assert self.running(), f"exited before {what}: {self.wait()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.005)

    def logged(self) -> list[int]:
        return [line["step"] for line in read_metrics(self.run_dir / "metrics.jsonl")]


def train_in_process(run_dir: Path, data_dir: Path, *overrides: str, num_steps: int = 5):
    """The same training as the subprocesses run, in this process (no interpreter start-up)."""
    config = load_config(
        CONFIG,
        [
            *OVERRIDES,
            f"train.num_steps={num_steps}",
            f"data.dir={data_dir}",
            f"train.run_dir={run_dir}",
            *overrides,
        ],
    )
    return train(config)


def committed_steps(run_dir: Path) -> list[int]:
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def restore_latest(run_dir: Path) -> tuple[int, list[np.ndarray]]:
    """The latest committed step and its arrays, read by a plain Orbax CheckpointManager."""
    with ocp.CheckpointManager(run_dir / "checkpoints") as manager:
        step = manager.latest_step()
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    import jax

    return step, [np.asarray(leaf) for leaf in jax.tree.leaves(restored.state)]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "Error" in line or "Traceback" in line]
