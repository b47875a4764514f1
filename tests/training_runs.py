"""Real `python -m resumax train` child processes and what they leave in their run directory,
shared by the digits and language-model resume tests.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from resumax.train.runlog import read_metrics

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 180


class Training:
    """A `python -m resumax train --config CONFIG key=value...` child; stdout / stderr go to
    numbered files in the run directory, so no pipe can fill up and every attempt is kept."""

    def __init__(self, config: Path, run_dir: Path, data_dir: Path, overrides: Iterable[str]):
        run_dir.mkdir(parents=True, exist_ok=True)
        attempt = len(list(run_dir.glob("stdout-*.txt")))
        self.stdout_path = run_dir / f"stdout-{attempt}.txt"
        self.stderr_path = run_dir / f"stderr-{attempt}.txt"
        command = [
            sys.executable,
            *("-m", "resumax", "train", "--config", str(config)),
            *overrides,
            f"data.dir={data_dir}",
            f"train.run_dir={run_dir}",
        ]
        with open(self.stdout_path, "w") as stdout, open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=stdout, stderr=stderr)

    def running(self) -> bool:
        return self.process.poll() is None

    def send(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def wait(self) -> tuple[int, str]:
        status = self.process.wait(timeout=TIMEOUT)
        return status, self.stdout_path.read_text()

    def finish(self) -> str:
        """Waits for a process that must succeed; returns its stdout."""
        status, stdout = self.wait()
        assert status == 0, f"exit {status}\n{stdout}\n{self.stderr_path.read_text()}"
        return stdout


def wait_until(condition: Callable[[], bool], training: Training, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert training.running(), f"the training process exited before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def logged_steps(run_dir: Path) -> list[int]:
    return [line["step"] for line in read_metrics(run_dir / "metrics.jsonl")]


def committed_steps(run_dir: Path) -> list[int]:
    """Steps Orbax has committed: their directory was renamed from `<step>.orbax-checkpoint-tmp`."""
    directory = run_dir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def partial_steps(run_dir: Path) -> list[str]:
    return [p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.isdigit()]


def final_leaves(run_dir: Path) -> tuple[int, list[tuple[str, np.ndarray]]]:
    """(latest step, [(path, array)] of its params and optimizer state) from the checkpoints."""
    with ocp.CheckpointManager(run_dir / "checkpoints") as manager:
        step = manager.latest_step()
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    flat = jax.tree_util.tree_flatten_with_path(restored.state)[0]
    return step, [(jax.tree_util.keystr(path), np.asarray(leaf)) for path, leaf in flat]


def stable_metrics(run_dir: Path, varying: set[str]) -> list[dict]:
    """The metrics lines without the `varying` fields (throughput, data wait, resumed flag)."""
    lines = read_metrics(run_dir / "metrics.jsonl")
    return [{k: v for k, v in line.items() if k not in varying} for line in lines]


def params_digest(stdout: str) -> str:
    return re.search(r"params sha256 ([0-9a-f]{64})", stdout)[1]


def assert_same_run(
    run_dir: Path, reference: tuple[Path, str], stdout: str, num_steps: int, varying: set[str]
) -> None:
    """Per-step metrics (but the `varying` fields) and every saved leaf (params, optimizer state)
    are bitwise equal, and the metrics file holds exactly one line per step."""
    reference_dir, reference_stdout = reference
    assert logged_steps(run_dir) == list(range(1, num_steps + 1))
    assert stable_metrics(run_dir, varying) == stable_metrics(reference_dir, varying)
    step, leaves = final_leaves(run_dir)
    reference_step, reference_leaves = final_leaves(reference_dir)
    assert step == reference_step == num_steps
    assert [name for name, _ in leaves] == [name for name, _ in reference_leaves]
    for (name, value), (_, expected) in zip(leaves, reference_leaves, strict=True):
        assert value.dtype == expected.dtype, name
        assert np.array_equal(value, expected), f"{name} differs"
    assert params_digest(stdout) == params_digest(reference_stdout)


def upload_dir(server, directory: Path, url: str) -> None:
    """Copies every file of `directory` to `url` on a test bucket server (tests/buckets.py)."""
    fs = server.filesystem()
    for path in sorted(directory.iterdir()):
        fs.put_file(str(path), f"{url}/{path.name}")


def bucket_overrides(storage_options: dict, cache_dir: Path) -> list[str]:
    """The training config's keys that read data from a test bucket server: its
    `storage_options` as `data.storage_options.*`, no `data.prepare`, and `data.cache_dir`."""
    overrides = [
        f"data.storage_options.{key}={value}"
        for key, value in storage_options.items()
        if key != "client_kwargs"
    ]
    region = storage_options.get("client_kwargs", {}).get("region_name")
    if region is not None:
        overrides.append(f"data.storage_options.client_kwargs.region_name={region}")
    return [*overrides, "data.prepare=null", f"data.cache_dir={cache_dir}"]
