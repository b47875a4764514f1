"""`make demo`: trains the digits MLP twice, once straight through and once stopped part-way by a
real SIGTERM and restarted, then shows that both runs end with bitwise the same losses and params.

Usage: python examples/train_demo.py [--config configs/digits.yaml] [--stop-at 0.37] [key=value ...]
Outputs go to runs/demo/{uninterrupted,preempted}/ (metrics.jsonl, loss.png, checkpoints/).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

import resumax.checkpoint  # noqa: F401 (registers the data item's handler)
from resumax.train.config import load_config
from resumax.train.runlog import read_metrics

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = ROOT / "runs" / "demo"


def train_command(config: Path, run_dir: Path, overrides: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "resumax",
        "train",
        "--config",
        str(config),
        *overrides,
        f"train.run_dir={run_dir}",
    ]


def run(command: list[str]) -> float:
    """Runs a training process to completion in the foreground; returns its wall time."""
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    return time.perf_counter() - start


def run_and_preempt(command: list[str], run_dir: Path, stop_step: int) -> int:
    """Starts training, sends it SIGTERM once it has logged `stop_step`; returns the saved step."""
    metrics = run_dir / "metrics.jsonl"
    process = subprocess.Popen(command, cwd=ROOT)
    while not [line for line in read_metrics(metrics) if line["step"] >= stop_step]:
        if process.poll() is not None:
            raise SystemExit(f"training ended before step {stop_step}; lower --stop-at")
        time.sleep(0.01)
    print(f"\n>>> sending SIGTERM to the training process (pid {process.pid})", flush=True)
    process.send_signal(signal.SIGTERM)
    if process.wait() != 0:
        raise SystemExit(f"the preempted process exited with status {process.returncode}")
    return max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def final_params(run_dir: Path) -> tuple[int, list[np.ndarray]]:
    """The latest checkpoint's step and model parameters, as restored by Orbax."""
    with ocp.CheckpointManager(run_dir / "checkpoints") as manager:
        step = manager.latest_step()
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    leaves = sorted(_flatten(state.state["model"]).items())
    return step, [np.asarray(value) for _, value in leaves]


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}"
        flat.update(_flatten(value, name) if isinstance(value, dict) else {name: value})
    return flat


def compare(uninterrupted: Path, preempted: Path) -> bool:
    """Prints the comparison of the two runs; True if losses and params are bitwise equal."""
    reference = read_metrics(uninterrupted / "metrics.jsonl")
    resumed = read_metrics(preempted / "metrics.jsonl")
    same_steps = [m["step"] for m in reference] == [m["step"] for m in resumed]
    same_losses = same_steps and all(
        a["loss"] == b["loss"] for a, b in zip(reference, resumed, strict=True)
    )
    step_a, params_a = final_params(uninterrupted)
    step_b, params_b = final_params(preempted)
    same_params = step_a == step_b and all(
        a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(params_a, params_b, strict=True)
    )
    digest = [
        hashlib.sha256(b"".join(p.tobytes() for p in ps)).hexdigest()[:16]
        for ps in (params_a, params_b)
    ]
    print(f"  final loss, uninterrupted:       {reference[-1]['loss']!r} (step {step_a})")
    print(f"  final loss, SIGTERM + resume:    {resumed[-1]['loss']!r} (step {step_b})")
    print(f"  per-step losses identical:       {same_losses} ({len(reference)} logged steps)")
    print(f"  final params bitwise identical:  {same_params} (sha256 {digest[0]} / {digest[1]})")
    if "eval_accuracy" in reference[-1]:
        print(f"  test accuracy at the end:        {reference[-1]['eval_accuracy']:.4f}")
    for run_dir in (uninterrupted, preempted):
        print(f"  plot: {run_dir / 'loss.png'}   metrics: {run_dir / 'metrics.jsonl'}")
    return same_losses and same_params


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "digits.yaml")
    parser.add_argument("--stop-at", type=float, default=0.37, help="fraction of num_steps")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    num_steps = load_config(args.config, args.overrides).train.num_steps
    uninterrupted, preempted = DEMO_DIR / "uninterrupted", DEMO_DIR / "preempted"
    for run_dir in (uninterrupted, preempted):
        shutil.rmtree(run_dir, ignore_errors=True)

    print(f">>> 1/3 uninterrupted run of {num_steps} steps -> {uninterrupted}", flush=True)
    seconds = run(train_command(args.config, uninterrupted, args.overrides))
    print(f"    took {seconds:.1f} s", flush=True)

    stop_step = max(1, int(num_steps * args.stop_at))
    print(f">>> 2/3 the same run, preempted with SIGTERM after step {stop_step}", flush=True)
    command = train_command(args.config, preempted, args.overrides)
    saved = run_and_preempt(command, preempted, stop_step)
    print(f"    it saved step {saved} and exited 0", flush=True)

    print(">>> 3/3 restarting it: it resumes from the checkpoint and finishes", flush=True)
    run(command)

    print(">>> result")
    if compare(uninterrupted, preempted):
        print("The resumed run's final loss and params equal the uninterrupted run's, bit for bit.")
        return 0
    print("MISMATCH: the resumed run differs from the uninterrupted one.")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
