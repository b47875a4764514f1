"""Getting past bad data in real `resumax train` runs: `--rewind-to S --skip-batches K` (then
kill and resume: bitwise the run that made the same rewind without interruption),
`train.spike_recovery` on a set with a poisoned block, and `resumax state` / `resumax batches`
naming the records the steps trained on."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

import resumax
from resumax.train.config import load_config
from resumax.train.data_commands import batches_command, state_command
from resumax.train.datasets import digits_examples
from resumax.train.runlog import read_metrics
from tests.training_runs import REPO, Training, committed_steps, final_leaves, wait_until

CONFIG = REPO / "configs" / "digits.yaml"
BATCH = 16
# A constant learning rate: a run may then stop at any train.num_steps and go on bit-exactly.
OVERRIDES = [
    "train.log_every=1",
    "train.eval_every=1000",
    "train.checkpoint_every=10",
    "train.max_to_keep=3",
    "model.hidden_sizes=[32]",
    f"data.batch_size={BATCH}",
    "optimizer.schedule=constant",
]
VARYING = {"records_per_s", "data_wait_s", "data_wait_fraction", "resumed"}
POISONED = range(320, 480)  # records of batches 20..29 when read in file order


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("digits")
    train, test = digits_examples()
    resumax.write_shards(directory / "train", train, num_shards=4)
    resumax.write_shards(directory / "test", test, num_shards=1)
    return directory


@pytest.fixture(scope="module")
def poisoned_dir(tmp_path_factory):
    """The digits with NaN images in records 320..479."""
    directory = tmp_path_factory.mktemp("poisoned")
    train, test = digits_examples()
    for index in POISONED:
        train[index] = {**train[index], "image": np.full((8, 8), np.nan, np.float32)}
    resumax.write_shards(directory / "train", train, num_shards=4)
    resumax.write_shards(directory / "test", test, num_shards=1)
    return directory


def train_run(run_dir: Path, data_dir: Path, steps: int, *extra: str) -> Training:
    return Training(CONFIG, run_dir, data_dir, [*OVERRIDES, f"train.num_steps={steps}", *extra])


@pytest.fixture(scope="module")
def forty_steps(tmp_path_factory, digits_dir):
    """A finished 40-step run (checkpoints 20, 30, 40), trained once for the module."""
    run_dir = tmp_path_factory.mktemp("forty-steps")
    train_run(run_dir, digits_dir, 40).finish()
    return run_dir


def copy_run(run_dir: Path, target: Path) -> Path:
    """A copy of a finished run's directory, for a test to go on with as if it had trained it."""
    shutil.copytree(run_dir, target)
    return target


def stable_lines(run_dir: Path) -> list[dict]:
    lines = read_metrics(run_dir / "metrics.jsonl")
    return [{k: v for k, v in line.items() if k not in VARYING} for line in lines]


def assert_same_leaves(run_dir: Path, reference_dir: Path) -> None:
    step, leaves = final_leaves(run_dir)
    reference_step, reference = final_leaves(reference_dir)
    assert step == reference_step
    for (name, value), (_, expected) in zip(leaves, reference, strict=True):
        assert np.array_equal(value, expected), f"{name} differs"


@pytest.mark.slow
def test_rewind_sets_aside_later_steps_skips_and_resumes_bitwise_after_kills(
    tmp_path, digits_dir, forty_steps
):
    reference = copy_run(forty_steps, tmp_path / "reference")
    stdout = train_run(reference, digits_dir, 40, "--rewind-to", "25", "--skip-batches", "7")
    stdout = stdout.finish()
    assert "rewound from step 40 to step 20 and skipped 7 batches" in stdout
    [abandoned] = (reference / "abandoned").iterdir()
    assert sorted(p.name for p in (abandoned / "checkpoints").iterdir()) == ["30", "40"]
    assert [line["step"] for line in read_metrics(abandoned / "metrics.jsonl")] == list(
        range(21, 41)
    )
    [event] = [line for line in read_metrics(reference / "metrics.jsonl") if "event" in line]
    assert event == {
        "step": 20,
        "event": "rewind",
        "from_step": 40,
        "skipped_batches": 7,
        "skipped_positions": [20 * BATCH, 27 * BATCH - 1],
    }

    # The same rewind, then: the process ends before any checkpoint holds the skip (num_steps
    # 20: it stops right after the rewind), a resume SIGTERMed, a resume to the end.
    run = copy_run(forty_steps, tmp_path / "interrupted")
    train_run(run, digits_dir, 20, "--rewind-to", "25", "--skip-batches", "7").finish()
    assert committed_steps(run) == [20]
    training = train_run(run, digits_dir, 40)
    wait_until(lambda: (run / "checkpoints" / "30").is_dir(), training, "step 30")
    training.send(signal.SIGTERM)
    training.finish()
    train_run(run, digits_dir, 40).finish()
    assert stable_lines(run) == stable_lines(reference)
    assert_same_leaves(run, reference)

    # Step 21 trained on the batch after the skipped ones; the state names the next batch.
    config = load_config(
        CONFIG, [*OVERRIDES, f"data.dir={digits_dir}", f"train.run_dir={reference}"]
    )
    found = json.loads(batches_command(config, 21, 1, as_json=True, show=False))
    assert [row[0]["position"] for row in found[0]["rows"]] == list(range(432, 432 + BATCH))
    state = json.loads(state_command(str(reference), None, as_json=True))
    assert state["step"] == 40 and state["state"]["skips"][0]["batches"] == 7
    first = state["next_batch"][0][0]
    assert first["position"] == (40 + 7) * BATCH
    assert Path(first["path"]).parent == digits_dir


def test_rewind_to_a_step_without_checkpoint_lists_the_steps_kept(
    tmp_path, digits_dir, forty_steps
):
    run = copy_run(forty_steps, tmp_path / "run")
    training = train_run(run, digits_dir, 40, "--rewind-to", "15", "--skip-batches", "1")
    assert training.wait()[0] == 2
    message = training.stderr_path.read_text()
    assert "no checkpoint at or before step 15" in message and "20, 30, 40" in message
    assert committed_steps(run) == [20, 30, 40]  # nothing moved


@pytest.mark.slow
def test_spike_recovery_skips_a_poisoned_block_and_finishes(tmp_path, poisoned_dir):
    in_order = "data.shuffle_files=false"
    stopped = train_run(tmp_path / "plain", poisoned_dir, 40, in_order)
    status, _ = stopped.wait()
    assert status == 2 and "NonFiniteLossError" in stopped.stderr_path.read_text()

    run = tmp_path / "recovering"
    recovery = "train.spike_recovery={factor: 4.0, window: 5, skip_batches: 4, max_recoveries: 3}"
    stdout = train_run(run, poisoned_dir, 40, in_order, recovery).finish()
    assert "finished at step 40" in stdout
    events = [line for line in read_metrics(run / "metrics.jsonl") if "event" in line]
    assert [e["event"] for e in events] == ["spike_recovery"] * len(events) and events
    skipped = set()
    for event in events:
        first, last = event["skipped_positions"]
        skipped.update(range(first, last + 1))
        assert event["step"] == 20 and event["trigger"].startswith("non-finite loss")
    assert set(POISONED) <= skipped
    losses = [line["loss"] for line in read_metrics(run / "metrics.jsonl") if "loss" in line]
    assert len(losses) == 40 and all(np.isfinite(losses))


def test_spike_recovery_gives_up_after_max_recoveries_naming_them(tmp_path, poisoned_dir):
    recovery = "train.spike_recovery={window: 5, skip_batches: 4, max_recoveries: 1}"
    training = train_run(tmp_path / "run", poisoned_dir, 40, "data.shuffle_files=false", recovery)
    assert training.wait()[0] == 2
    message = training.stderr_path.read_text()
    assert "SpikeRecoveryError" in message and "after 1 spike recoveries (from steps 21;" in message
