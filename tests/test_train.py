"""The reference training loop: real digits ArrayRecords, real CheckpointManagers and real
`python -m resumax train` subprocesses stopped with real SIGTERM / SIGKILL.

The contract: a run interrupted and restarted any number of times logs the same per-step losses
and ends with bitwise the same params as an uninterrupted run.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from array_record.python import array_record_data_source

import resumax
import resumax.checkpoint  # noqa: F401 (registers the data item's handler for restores)
from resumax.errors import DataSourceError
from resumax.train.config import load_config
from resumax.train.datasets import prepare_digits
from resumax.train.loop import train
from resumax.train.runlog import read_metrics
from tests import training_runs
from tests.training_runs import (
    REPO,
    Training,
    bucket_overrides,
    committed_steps,
    logged_steps,
    partial_steps,
    upload_dir,
    wait_until,
)

CONFIG = REPO / "configs" / "digits.yaml"
NUM_STEPS = 120
SIGTERM_AT = 30
# Small and fast: a tiny MLP with dropout (keyed by step), a checkpoint every 5 steps.
OVERRIDES = [
    f"train.num_steps={NUM_STEPS}",
    "train.log_every=1",
    "train.eval_every=20",
    "train.checkpoint_every=5",
    "train.max_to_keep=3",
    "model.hidden_sizes=[32]",
    "model.dropout=0.1",
    "data.batch_size=16",
    "optimizer.warmup_steps=10",
]
VARYING_FIELDS = {"records_per_s", "data_wait_s", "data_wait_fraction", "resumed"}


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data") / "digits"
    prepare_digits(directory)
    return directory


def start(run_dir: Path, data_dir: Path, *overrides: str) -> Training:
    """A digits training child with this file's small settings (and `overrides` after them)."""
    return Training(CONFIG, run_dir, data_dir, [*OVERRIDES, *overrides])


def run_to_completion(run_dir: Path, data_dir: Path) -> str:
    return start(run_dir, data_dir).finish()


def assert_same_run(run_dir: Path, reference: tuple[Path, str], stdout: str) -> None:
    training_runs.assert_same_run(run_dir, reference, stdout, NUM_STEPS, VARYING_FIELDS)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits_dir):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    stdout = run_to_completion(run_dir, digits_dir)
    return run_dir, stdout


# Data -------------------------------------------------------------------------------------------


def test_prepared_digits_are_complete_real_records(digits_dir):
    train_source = resumax.ArrayRecordSourceModule(
        resumax.ArrayRecordSourceConfig(), f"{digits_dir}/train-*.array_record"
    )
    test_source = resumax.ArrayRecordSourceModule(
        resumax.ArrayRecordSourceConfig(), f"{digits_dir}/test-*.array_record"
    )
    assert len(train_source) + len(test_source) == 1797
    assert len(test_source) == 359
    record = train_source[0]
    assert record["image"].shape == (8, 8) and record["image"].dtype == np.float32
    assert record["image"].min() >= 0.0 and record["image"].max() <= 1.0
    labels = {int(test_source[i]["label"]) for i in range(len(test_source))}
    assert labels == set(range(10))
    plain = array_record_data_source.ArrayRecordDataSource(
        sorted(str(p) for p in digits_dir.glob("train-*.array_record"))
    )
    assert len(plain) == len(train_source)
    assert resumax.decode(plain[5])["label"] == train_source[5]["label"]


def test_prepare_is_idempotent_and_clears_debris_of_a_dead_preparation(tmp_path, digits_dir):
    target = tmp_path / "digits"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    debris = tmp_path / f"digits.partial-{dead.pid}"
    debris.mkdir()
    (debris / "train-00000-of-00004.array_record").write_bytes(b"half a file")
    assert prepare_digits(target) is True
    assert not debris.exists()
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in digits_dir.iterdir())
    assert prepare_digits(target) is False


def test_missing_data_without_prepare_names_the_glob(tmp_path):
    config = load_config(
        CONFIG,
        [
            *OVERRIDES,
            "data.prepare=null",
            f"data.dir={tmp_path}/absent",
            f"train.run_dir={tmp_path}/run",
        ],
    )
    with pytest.raises(DataSourceError, match=re.escape(f"{tmp_path}/absent/train-*.array_record")):
        train(config)
    assert not (tmp_path / "absent").exists()


# Training ---------------------------------------------------------------------------------------


def test_uninterrupted_run_logs_every_step_learns_and_plots(uninterrupted):
    run_dir, stdout = uninterrupted
    lines = read_metrics(run_dir / "metrics.jsonl")
    assert [line["step"] for line in lines] == list(range(1, NUM_STEPS + 1))
    assert not any(line["resumed"] for line in lines)
    assert all(line["records_per_s"] > 0 for line in lines)
    evals = [line for line in lines if "eval_accuracy" in line]
    assert [line["step"] for line in evals] == list(range(20, NUM_STEPS + 1, 20))
    assert evals[-1]["eval_accuracy"] > 0.5
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert "resumed from step" not in stdout
    assert (run_dir / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert committed_steps(run_dir) == [110, 115, 120]


def test_sigterm_then_restart_is_bitwise_identical(tmp_path, digits_dir, uninterrupted):
    run_dir = tmp_path / "run"
    training = start(run_dir, digits_dir)
    wait_until(lambda: logged_steps(run_dir)[-1:] >= [SIGTERM_AT], training, f"step {SIGTERM_AT}")
    training.send(signal.SIGTERM)
    stdout = training.finish()
    stopped = int(re.search(r"preempted \(SIGTERM\): saved step (\d+)", stdout)[1])
    assert SIGTERM_AT <= stopped < NUM_STEPS
    assert committed_steps(run_dir)[-1] == stopped
    assert logged_steps(run_dir) == list(range(1, stopped + 1))
    assert (run_dir / "loss.png").exists()

    stdout = run_to_completion(run_dir, digits_dir)
    assert f"resumed from step {stopped}" in stdout
    resumed_lines = [
        line["step"] for line in read_metrics(run_dir / "metrics.jsonl") if line["resumed"]
    ]
    assert resumed_lines == [stopped + 1]
    assert_same_run(run_dir, uninterrupted, stdout)


def test_sigkill_during_a_save_and_at_a_random_time_is_bitwise_identical(
    tmp_path, digits_dir, uninterrupted
):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    run_dir = tmp_path / "run"

    # 1. Kill -9 the moment a step directory is being written (after at least one commit).
    training = start(run_dir, digits_dir)
    wait_until(
        lambda: (
            (run_dir / "checkpoints").is_dir()
            and committed_steps(run_dir)
            and partial_steps(run_dir)
        ),
        training,
        "a checkpoint save after a committed one",
    )
    training.send(signal.SIGKILL)
    assert training.wait()[0] == -signal.SIGKILL
    committed = committed_steps(run_dir)
    assert partial_steps(run_dir), "the kill was meant to land during a save"

    # 2. Restart, and kill -9 again at a random moment (startup, restore, a step or a save).
    training = start(run_dir, digits_dir)
    delay = rng.uniform(0.5, 6.0)
    time.sleep(delay)
    training.send(signal.SIGKILL)
    stdout = training.wait()[1]
    resumed = re.search(r"resumed from step (\d+)", stdout)
    if resumed is not None:
        assert int(resumed[1]) == committed[-1], f"seed {seed}, delay {delay:.2f}s"
    committed = committed_steps(run_dir)

    # 3. Restart and finish: resumes from the last committed step, ends identical.
    stdout = run_to_completion(run_dir, digits_dir)
    assert f"resumed from step {committed[-1]}" in stdout, f"seed {seed}, delay {delay:.2f}s"
    assert not partial_steps(run_dir)
    assert_same_run(run_dir, uninterrupted, stdout)


@pytest.mark.slow
def test_reading_in_process_trains_bitwise_the_same_run_as_the_default_worker(
    tmp_path, digits_dir, uninterrupted
):
    run_dir = tmp_path / "run"
    stdout = start(run_dir, digits_dir, "data.num_workers=0").finish()
    assert_same_run(run_dir, uninterrupted, stdout)


def test_cnn_config_trains_in_process_logging_on_log_and_eval_steps(tmp_path, digits_dir):
    run_dir = tmp_path / "cnn"
    config = load_config(
        REPO / "configs" / "digits_cnn.yaml",
        [
            "train.num_steps=7",
            "train.log_every=2",
            "train.eval_every=3",
            "train.checkpoint_every=3",
            "data.batch_size=8",
            f"data.dir={digits_dir}",
            f"train.run_dir={run_dir}",
        ],
    )
    result = train(config)
    assert (result.step, result.preempted, result.resumed_from) == (7, False, None)
    lines = read_metrics(run_dir / "metrics.jsonl")
    assert [line["step"] for line in lines] == [2, 3, 4, 6, 7]
    assert [line["step"] for line in lines if "eval_accuracy" in line] == [3, 6]
    assert result.final_loss == lines[-1]["loss"]
    assert committed_steps(run_dir) == [3, 6, 7]
    again = train(config)
    assert (again.step, again.resumed_from, again.params_sha256) == (7, 7, result.params_sha256)


@pytest.mark.slow
def test_digits_from_an_s3_copy_train_bitwise_the_same_run(
    tmp_path, digits_dir, uninterrupted, s3_server, s3_bucket
):
    upload_dir(s3_server, digits_dir, f"{s3_bucket}/digits")
    run_dir = tmp_path / "run"
    cache_dir = tmp_path / "cache"
    with pytest.raises(resumax.ConfigError, match="data.prepare=null"):
        load_config(CONFIG, [f"data.dir={s3_bucket}/digits"])
    overrides = bucket_overrides(s3_server.storage_options, cache_dir)
    stdout = start(run_dir, f"{s3_bucket}/digits", *overrides)
    assert_same_run(run_dir, uninterrupted, stdout.finish())
    cached = sorted(path.name for path in (cache_dir / "shards").iterdir())
    assert len(cached) == len([p for p in digits_dir.iterdir() if p.suffix == ".array_record"])
