"""The language-model reference run: stdlib prose + code token records, packed, mixed, and a
tiny Transformer trained by real `python -m resumax train` subprocesses stopped with real SIGTERM /
SIGKILL; a resumed run logs the same losses and ends with bitwise the same params.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import resumax
from resumax.errors import ConfigError
from resumax.train.config import load_config
from resumax.train.runlog import read_metrics
from resumax.train.text_data import prepare_stdlib_text

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "lm_mixture.yaml"
NUM_STEPS = 60
SIGTERM_AT = 15
TIMEOUT = 180
# A tiny model on short rows, a checkpoint every 5 steps: each run takes seconds.
OVERRIDES = [
    f"train.num_steps={NUM_STEPS}",
    "train.log_every=1",
    "train.checkpoint_every=5",
    "optimizer.warmup_steps=5",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.embed_dim=32",
    "data.batch_size=4",
    "data.sequence_length=32",
    "data.window=64",
]
VARYING_FIELDS = {"tokens_per_s", "data_wait_s", "data_wait_fraction", "resumed"}


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data") / "stdlib_text"
    assert prepare_stdlib_text(directory) is True
    return directory


class Training:
    """A `python -m resumax train` child; stdout / stderr go to files, so no pipe can fill up."""

    def __init__(self, run_dir: Path, data_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        attempt = len(list(run_dir.glob("stdout-*.txt")))
        self.stdout_path = run_dir / f"stdout-{attempt}.txt"
        self.stderr_path = run_dir / f"stderr-{attempt}.txt"
        command = [
            sys.executable,
            "-m",
            "resumax",
            "train",
            "--config",
            str(CONFIG),
            *OVERRIDES,
            f"data.dir={data_dir}",
            f"train.run_dir={run_dir}",
        ]
        with open(self.stdout_path, "w") as stdout, open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=stdout, stderr=stderr)

    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self) -> tuple[int, str]:
        status = self.process.wait(timeout=TIMEOUT)
        return status, self.stdout_path.read_text()

    def finish(self) -> str:
        status, stdout = self.wait()
        assert status == 0, f"exit {status}\n{stdout}\n{self.stderr_path.read_text()}"
        return stdout


def wait_until(condition, training: Training, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert training.running(), f"the training process exited before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def logged_steps(run_dir: Path) -> list[int]:
    return [line["step"] for line in read_metrics(run_dir / "metrics.jsonl")]


def committed_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def partial_steps(run_dir: Path) -> list[str]:
    return [p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.isdigit()]


def final_leaves(run_dir: Path) -> tuple[int, list[tuple[str, np.ndarray]]]:
    with ocp.CheckpointManager(run_dir / "checkpoints") as manager:
        step = manager.latest_step()
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    flat = jax.tree_util.tree_flatten_with_path(restored.state)[0]
    return step, [(jax.tree_util.keystr(path), np.asarray(leaf)) for path, leaf in flat]


def stable_metrics(run_dir: Path) -> list[dict]:
    lines = read_metrics(run_dir / "metrics.jsonl")
    return [{k: v for k, v in line.items() if k not in VARYING_FIELDS} for line in lines]


def params_digest(stdout: str) -> str:
    return re.search(r"params sha256 ([0-9a-f]{64})", stdout)[1]


def assert_same_run(run_dir: Path, reference: tuple[Path, str], stdout: str) -> None:
    """Per-step metrics and every saved leaf (params, optimizer state) are bitwise equal."""
    reference_dir, reference_stdout = reference
    assert logged_steps(run_dir) == list(range(1, NUM_STEPS + 1))
    assert stable_metrics(run_dir) == stable_metrics(reference_dir)
    step, leaves = final_leaves(run_dir)
    reference_step, reference_leaves = final_leaves(reference_dir)
    assert step == reference_step == NUM_STEPS
    assert [name for name, _ in leaves] == [name for name, _ in reference_leaves]
    for (name, value), (_, expected) in zip(leaves, reference_leaves, strict=True):
        assert value.dtype == expected.dtype and np.array_equal(value, expected), name
    assert params_digest(stdout) == params_digest(reference_stdout)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, text_dir):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    return run_dir, Training(run_dir, text_dir).finish()


# Data and config --------------------------------------------------------------------------------


def test_prepared_corpora_are_byte_token_records_of_prose_and_code(text_dir):
    corpora = {
        name: resumax.ArrayRecordSourceModule(
            resumax.ArrayRecordSourceConfig(), f"{text_dir}/{name}-*.array_record"
        )
        for name in ("prose", "code")
    }
    assert len(corpora["prose"]) > 1000 and len(corpora["code"]) > 1000
    for source in corpora.values():
        record = source[0]
        assert set(record) == {"tokens"} and record["tokens"].dtype == np.uint8
    prose = b"".join(bytes(corpora["prose"][i]["tokens"]) for i in range(200)).decode()
    code = b"".join(bytes(corpora["code"][i]["tokens"]) for i in range(200)).decode()
    assert " the " in prose and "def " in code and "import " in code
    assert prepare_stdlib_text(text_dir) is False


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.embed_dim=30", "model.embed_dim"),
        ("model.num_layers=0", "model.num_layers"),
        ("data.weights.code=0", "data.weights.code"),
        ("data.sequence_length=1", "data.sequence_length"),
        ("data.window=0", "data.window"),
        ("data.num_epochs=2", "data.num_epochs"),
    ],
)
def test_bad_language_model_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(CONFIG, [override])


# Training ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_uninterrupted_run_logs_loss_tokens_per_s_and_packing_efficiency(uninterrupted):
    run_dir, stdout = uninterrupted
    lines = read_metrics(run_dir / "metrics.jsonl")
    assert [line["step"] for line in lines] == list(range(1, NUM_STEPS + 1))
    assert all(line["tokens_per_s"] > 0 for line in lines)
    assert all(0.9 <= line["packing_efficiency"] <= 1.0 for line in lines)
    assert np.mean([m["loss"] for m in lines[-10:]]) < np.mean([m["loss"] for m in lines[:10]])
    assert (run_dir / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert committed_steps(run_dir)[-1] == NUM_STEPS
    assert "resumed from step" not in stdout


@pytest.mark.slow
def test_sigterm_then_restart_is_bitwise_identical(tmp_path, text_dir, uninterrupted):
    run_dir = tmp_path / "run"
    training = Training(run_dir, text_dir)
    wait_until(lambda: logged_steps(run_dir)[-1:] >= [SIGTERM_AT], training, f"step {SIGTERM_AT}")
    os.kill(training.process.pid, signal.SIGTERM)
    stdout = training.finish()
    stopped = int(re.search(r"preempted \(SIGTERM\): saved step (\d+)", stdout)[1])
    assert SIGTERM_AT <= stopped < NUM_STEPS
    assert committed_steps(run_dir)[-1] == stopped
    stdout = Training(run_dir, text_dir).finish()
    assert f"resumed from step {stopped}" in stdout
    assert_same_run(run_dir, uninterrupted, stdout)


@pytest.mark.slow
def test_sigkill_during_a_save_then_restart_is_bitwise_identical(tmp_path, text_dir, uninterrupted):
    run_dir = tmp_path / "run"
    training = Training(run_dir, text_dir)
    wait_until(
        lambda: (
            (run_dir / "checkpoints").is_dir()
            and committed_steps(run_dir)
            and partial_steps(run_dir)
        ),
        training,
        "a checkpoint save after a committed one",
    )
    os.kill(training.process.pid, signal.SIGKILL)
    assert training.wait()[0] == -signal.SIGKILL
    committed = committed_steps(run_dir)
    stdout = Training(run_dir, text_dir).finish()
    assert f"resumed from step {committed[-1]}" in stdout
    assert not partial_steps(run_dir)
    assert_same_run(run_dir, uninterrupted, stdout)
