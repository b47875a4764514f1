"""Sharding and elastic resume across real JAX processes on 127.0.0.1 (gloo collectives).

Each run starts tests/multihost_worker.py once per process; a 2-process run joins one JAX
distributed runtime. The reference is the same pipeline in this process with the whole global
batch.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.multihost_worker import build_pipeline

ROOT = Path(__file__).resolve().parent.parent
GLOBAL_BATCH = 8
SAVED_STEPS = 6
RESUMED_STEPS = 10


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_processes(count: int, data_glob: str, steps: int, out: Path, *extra: str) -> list[dict]:
    """Runs `count` worker processes to completion; returns what each received."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    outputs = [out.with_name(f"{out.name}-{i}.json") for i in range(count)]
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.multihost_worker",
                str(i),
                str(count),
                str(port),
                data_glob,
                str(GLOBAL_BATCH // count),
                str(steps),
                str(outputs[i]),
                *extra,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(count)
    ]
    try:
        logs = [worker.communicate(timeout=120)[0] for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    for worker, log in zip(workers, logs, strict=True):
        assert worker.returncode == 0, log[-3000:]
    return [json.loads(path.read_text()) for path in outputs]


def union_per_step(results: list[dict]) -> list[list[int]]:
    return [sum(step, []) for step in zip(*(r["steps"] for r in results), strict=True)]


@pytest.fixture(scope="module")
def reference_and_data(tmp_path_factory):
    import resumax
    from tests.conftest import make_examples

    directory = tmp_path_factory.mktemp("multihost")
    resumax.write_shards(directory / "train", make_examples(100), num_shards=3)
    data_glob = str(directory / "train-*.array_record")
    pipeline = build_pipeline(data_glob, GLOBAL_BATCH)
    steps = SAVED_STEPS + RESUMED_STEPS
    reference = [b["id"].tolist() for b in itertools.islice(pipeline, steps)]
    return reference, data_glob, directory


def test_two_processes_split_each_global_batch_then_one_process_resumes(reference_and_data):
    reference, data_glob, directory = reference_and_data
    checkpoints = directory / "saved_by_2"
    two = run_processes(2, data_glob, SAVED_STEPS, directory / "two", "--save", str(checkpoints))
    for step, (first, second) in enumerate(zip(two[0]["steps"], two[1]["steps"], strict=True)):
        assert len(first) == len(second) == GLOBAL_BATCH // 2
        assert not set(first) & set(second)
        assert first + second == reference[step]
    assert two[0]["state"] == two[1]["state"]
    saved = sorted(p.name for p in (checkpoints / str(SAVED_STEPS) / "data").glob("*.json"))
    assert saved == ["process_0-of-2.json", "process_1-of-2.json"]
    one = run_processes(
        1, data_glob, RESUMED_STEPS, directory / "one", "--restore", str(checkpoints)
    )
    assert one[0]["steps"] == reference[SAVED_STEPS:]


def test_one_process_saves_and_two_processes_resume(reference_and_data):
    reference, data_glob, directory = reference_and_data
    checkpoints = directory / "saved_by_1"
    run_processes(1, data_glob, SAVED_STEPS, directory / "alone", "--save", str(checkpoints))
    two = run_processes(
        2, data_glob, RESUMED_STEPS, directory / "pair", "--restore", str(checkpoints)
    )
    assert union_per_step(two) == reference[SAVED_STEPS:]


def test_sigterm_to_one_training_process_makes_both_save_the_same_step_and_exit_0(tmp_path):
    from resumax.train.datasets import prepare_digits

    prepare_digits(tmp_path / "digits")
    run_dir = tmp_path / "run"
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    processes = []
    for index in range(2):
        log = open(tmp_path / f"process-{index}.txt", "w")  # noqa: SIM115 (closed below)
        command = [
            sys.executable,
            "-m",
            "resumax",
            "train",
            "--config",
            str(ROOT / "configs" / "digits.yaml"),
            "train.num_steps=100000",
            "train.log_every=1",
            "train.checkpoint_every=25",
            "train.eval_every=1000",
            "model.hidden_sizes=[32]",
            "data.batch_size=8",
            f"data.dir={tmp_path / 'digits'}",
            f"train.run_dir={run_dir}",
            "train.distributed=true",
            f"train.coordinator_address=127.0.0.1:{port}",
            "train.num_processes=2",
            f"train.process_id={index}",
        ]
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        processes.append((process, log))
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 40):
            assert all(p.poll() is None for p, _ in processes), "a process exited early"
            assert time.monotonic() < deadline, "training did not reach step 40"
            time.sleep(0.05)
        os.kill(processes[1][0].pid, signal.SIGTERM)
        codes = [process.wait(timeout=120) for process, _ in processes]
    finally:
        for process, log in processes:
            process.kill()
            log.close()
    outputs = [(tmp_path / f"process-{i}.txt").read_text() for i in range(2)]
    assert codes == [0, 0], outputs
    saved = [re.search(r"preempted \(SIGTERM\): saved step (\d+)", out) for out in outputs]
    assert all(saved), outputs
    step = int(saved[0][1])
    assert int(saved[1][1]) == step
    assert step >= 40
    step_dir = run_dir / "checkpoints" / str(step)
    assert sorted(p.name for p in (step_dir / "data").glob("*.json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    states = [
        json.loads((step_dir / "data" / f"process_{i}-of-2.json").read_text()) for i in (0, 1)
    ]
    assert states[0] == states[1]
    assert states[0]["batches_emitted"] == step
