"""The language-model reference run: stdlib prose + code token records, packed, mixed, and a
tiny Transformer trained by real `python -m resumax train` subprocesses stopped with real SIGTERM /
SIGKILL; a resumed run logs the same losses and ends with bitwise the same params.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest

import resumax
from resumax.errors import ConfigError
from resumax.train.config import load_config
from resumax.train.runlog import read_metrics
from resumax.train.text_data import prepare_stdlib_text
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

CONFIG = REPO / "configs" / "lm_mixture.yaml"
NUM_STEPS = 40
SIGTERM_AT = 15
# A tiny model on short rows, a checkpoint every 10 steps: each run takes seconds.
OVERRIDES = [
    f"train.num_steps={NUM_STEPS}",
    "train.log_every=1",
    "train.checkpoint_every=10",
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


def start(run_dir: Path, data_dir: Path | str, *overrides: str) -> Training:
    """A language-model training child with this file's small settings (and `overrides`)."""
    return Training(CONFIG, run_dir, data_dir, [*OVERRIDES, *overrides])


def assert_same_run(run_dir: Path, reference: tuple[Path, str], stdout: str) -> None:
    training_runs.assert_same_run(run_dir, reference, stdout, NUM_STEPS, VARYING_FIELDS)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, text_dir):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    return run_dir, start(run_dir, text_dir).finish()


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
    training = start(run_dir, text_dir)
    wait_until(lambda: logged_steps(run_dir)[-1:] >= [SIGTERM_AT], training, f"step {SIGTERM_AT}")
    os.kill(training.process.pid, signal.SIGTERM)
    stdout = training.finish()
    stopped = int(re.search(r"preempted \(SIGTERM\): saved step (\d+)", stdout)[1])
    assert SIGTERM_AT <= stopped < NUM_STEPS
    assert committed_steps(run_dir)[-1] == stopped
    stdout = start(run_dir, text_dir).finish()
    assert f"resumed from step {stopped}" in stdout
    assert_same_run(run_dir, uninterrupted, stdout)


@pytest.mark.slow
def test_sigkill_during_a_save_then_restart_is_bitwise_identical(tmp_path, text_dir, uninterrupted):
    run_dir = tmp_path / "run"
    training = start(run_dir, text_dir)
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
    stdout = start(run_dir, text_dir).finish()
    assert f"resumed from step {committed[-1]}" in stdout
    assert not partial_steps(run_dir)
    assert_same_run(run_dir, uninterrupted, stdout)


@pytest.mark.slow
def test_the_corpora_from_an_s3_copy_train_bitwise_the_same_run(
    tmp_path, text_dir, uninterrupted, s3_server, s3_bucket
):
    upload_dir(s3_server, text_dir, f"{s3_bucket}/stdlib_text")
    cache_dir = tmp_path / "cache"
    overrides = bucket_overrides(s3_server.storage_options, cache_dir)
    stdout = start(tmp_path / "run", f"{s3_bucket}/stdlib_text", *overrides).finish()
    assert_same_run(tmp_path / "run", uninterrupted, stdout)
    shards = [path for path in text_dir.iterdir() if path.suffix == ".array_record"]
    assert len(list((cache_dir / "shards").iterdir())) == len(shards)
