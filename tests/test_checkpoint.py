"""Orbax integration: the data position saved in the same atomic step as params and optimizer."""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import resumax
from resumax.checkpoint import (
    CheckpointRestore,
    CheckpointSave,
    DataStateHandler,
    DataStateMetadata,
)
from resumax.errors import CheckpointError, ConfigError, StateMismatchError
from tests.checkpoint_worker import (
    NEXT_BATCHES,
    build_pipeline,
    build_trainer,
    large_params,
    leaves,
    save_args,
    train_step,
)
from tests.conftest import make_examples

WORKER = Path(__file__).with_name("checkpoint_worker.py")
STATE_FILE = "process_0-of-1.json"


def manager(directory: Path, *, asynchronous: bool = True, **options) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=asynchronous, **options),
    )


def advanced_pipeline(data_glob: str, batches: int) -> resumax.Pipeline:
    pipeline = build_pipeline(data_glob)
    for _ in itertools.islice(pipeline, batches):
        pass
    return pipeline


def save_data_step(directory: Path, pipeline: resumax.Pipeline, step: int = 1) -> None:
    with manager(directory) as mngr:
        mngr.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave({"w": np.arange(4.0)}), data=CheckpointSave(pipeline)
            ),
        )


def restore_data(directory: Path, item, step: int = 1):
    with manager(directory) as mngr:
        return mngr.restore(step, args=ocp.args.Composite(data=CheckpointRestore(item)))["data"]


def assert_batches_equal(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


# Model and data in one step ------------------------------------------------------------------


def test_restore_in_fresh_process_gives_equal_params_and_identical_next_batches(shards, tmp_path):
    model, optimizer = build_trainer(model_seed=0)
    pipeline = build_pipeline(shards)
    batches = iter(pipeline)
    for batch in itertools.islice(batches, 5):
        train_step(model, optimizer, batch)
    with manager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=save_args(model, optimizer, pipeline))
        expected = list(itertools.islice(batches, NEXT_BATCHES))

    out = tmp_path / "restored.npz"
    result = subprocess.run(
        [sys.executable, str(WORKER), "restore", str(tmp_path / "ckpt"), shards, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    restored = np.load(out)

    params = leaves(nnx.state(model))
    assert any(not np.array_equal(restored[f"before_{i}"], p) for i, p in enumerate(params))
    for i, leaf in enumerate(params):
        np.testing.assert_array_equal(restored[f"param_{i}"], leaf)
    for i, leaf in enumerate(leaves(nnx.state(optimizer))):
        np.testing.assert_array_equal(restored[f"opt_{i}"], leaf)
    assert int(restored["opt_0"]) == 5  # the optimizer step counter, so the state was not fresh
    for i, batch in enumerate(expected):
        assert_batches_equal({k: restored[f"batch_{i}_{k}"] for k in batch}, batch)
    assert not any(name.startswith(f"batch_{NEXT_BATCHES}_") for name in restored.files)


def test_process_killed_mid_save_leaves_the_previous_step_with_its_params_and_position(
    shards, tmp_path
):
    ckpt = tmp_path / "ckpt"
    with open(tmp_path / "worker.log", "w") as log:
        worker = subprocess.Popen(
            [sys.executable, str(WORKER), "save-large", str(ckpt), shards],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        watchdog = threading.Timer(240, worker.kill)
        watchdog.start()
        try:
            announced = {}
            for line in worker.stdout:
                word, step, *state = line.split(" ", 2)
                announced[word, int(step)] = json.loads(state[0]) if state else None
                if word == "SAVING" and step == "2":
                    break
            assert ("SAVED", 1) in announced and ("SAVING", 2) in announced, (
                tmp_path / "worker.log"
            ).read_text()[-4000:]
            deadline = time.monotonic() + 30
            while not list(ckpt.glob("2.orbax-checkpoint-tmp*")) and time.monotonic() < deadline:
                time.sleep(0.002)
            worker.send_signal(signal.SIGKILL)
            rest_of_output = worker.stdout.read()
            worker.wait()
        finally:
            watchdog.cancel()
            worker.stdout.close()

    assert worker.returncode == -signal.SIGKILL
    assert "SAVED 2" not in rest_of_output
    assert list(ckpt.glob("2.orbax-checkpoint-tmp*")), "the kill did not land mid-save"
    fresh = build_pipeline(shards)
    with ocp.CheckpointManager(ckpt) as mngr:
        assert mngr.all_steps() == [1]
        restored = mngr.restore(
            1,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(), data=CheckpointRestore(fresh)
            ),
        )
    np.testing.assert_array_equal(restored["params"]["w"], large_params(1)["w"])
    assert fresh.get_state() == announced["SAVING", 1]
    assert_batches_equal(next(iter(fresh)), next(iter(advanced_pipeline(shards, 3))))


# Validation ----------------------------------------------------------------------------------


def test_restoring_a_checkpoint_of_another_dataset_raises_state_mismatch_naming_the_field(
    shards, tmp_path
):
    save_data_step(tmp_path / "ckpt", advanced_pipeline(shards, 2))
    resumax.write_shards(tmp_path / "other", make_examples(100)[::-1], num_shards=3)
    other = build_pipeline(str(tmp_path / "other-*.array_record"))

    with pytest.raises(StateMismatchError, match="field 'fingerprint'") as error:
        restore_data(tmp_path / "ckpt", other)
    assert str(tmp_path / "ckpt" / "1" / "data" / STATE_FILE) in str(error.value)
    assert other.get_state() == build_pipeline(str(tmp_path / "other-*.array_record")).get_state()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda path: path.unlink(), "no resumax data state"),
        (lambda path: path.write_text('{"version": 1, "source": '), "cannot read"),
        (lambda path: path.write_text("[1, 2]"), "holds a JSON list"),
    ],
    ids=["missing", "truncated", "not-an-object"],
)
def test_a_missing_or_malformed_state_file_raises_checkpoint_error_naming_the_path(
    shards, tmp_path, damage, reason
):
    save_data_step(tmp_path / "ckpt", advanced_pipeline(shards, 2))
    item_dir = tmp_path / "ckpt" / "1" / "data"
    damage(item_dir / STATE_FILE)

    with pytest.raises(CheckpointError, match=reason) as error:
        restore_data(tmp_path / "ckpt", build_pipeline(shards))
    assert str(item_dir) in str(error.value)


def test_checkpoint_args_reject_objects_that_are_not_resumax_sources_or_pipelines():
    for args in (CheckpointSave, CheckpointRestore):
        with pytest.raises(ConfigError, match="got dict"):
            args({"current_index": 3})


# Orbax features --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pipeline", "source"])
def test_the_saved_position_is_the_one_at_save_time_while_iteration_goes_on(shards, tmp_path, kind):
    pipeline = advanced_pipeline(shards, 2)
    item = pipeline if kind == "pipeline" else pipeline.source
    expected = item.get_state()
    with manager(tmp_path / "ckpt") as mngr:
        mngr.save(1, args=ocp.args.Composite(data=CheckpointSave(item)))
        for _ in itertools.islice(pipeline, 5):
            pass
    assert item.get_state() != expected

    fresh = build_pipeline(shards)
    fresh_item = fresh if kind == "pipeline" else fresh.source
    assert restore_data(tmp_path / "ckpt", fresh_item) is fresh_item
    assert fresh_item.get_state() == expected
    assert_batches_equal(next(iter(fresh)), next(iter(advanced_pipeline(shards, 2))))


@pytest.mark.parametrize("asynchronous", [True, False], ids=["async", "sync"])
def test_interval_and_max_to_keep_hold_and_each_kept_step_restores_the_data_item_alone(
    shards, tmp_path, asynchronous
):
    pipeline = build_pipeline(shards)
    batches = iter(pipeline)
    states = {}
    with manager(
        tmp_path / "ckpt", asynchronous=asynchronous, max_to_keep=2, save_interval_steps=3
    ) as mngr:
        for step in range(10):
            next(batches)
            args = ocp.args.Composite(
                params=ocp.args.StandardSave({"step": np.array(step)}),
                data=CheckpointSave(pipeline),
            )
            if mngr.save(step, args=args):
                states[step] = pipeline.get_state()
        mngr.wait_until_finished()
        assert sorted(states) == [0, 3, 6, 9]
        assert mngr.all_steps() == [6, 9]
        for step in (6, 9):
            fresh = build_pipeline(shards)
            restored = mngr.restore(step, args=ocp.args.Composite(data=CheckpointRestore(fresh)))
            assert list(restored.keys()) == ["data"]
            assert fresh.get_state() == states[step]


@pytest.mark.parametrize("checkpointer", [ocp.Checkpointer, ocp.AsyncCheckpointer])
def test_plain_checkpointers_save_and_restore_the_item_on_its_own(shards, tmp_path, checkpointer):
    pipeline = advanced_pipeline(shards, 4)
    with checkpointer(DataStateHandler()) as ckptr:
        ckptr.save(tmp_path / "data", args=CheckpointSave(pipeline))
    assert (tmp_path / "data" / STATE_FILE).exists()
    fresh = build_pipeline(shards)
    with checkpointer(DataStateHandler()) as ckptr:
        assert ckptr.restore(tmp_path / "data", args=CheckpointRestore(fresh)) is fresh
    assert fresh.get_state() == pipeline.get_state()


def test_item_metadata_shows_the_position_and_the_process_count(shards, tmp_path):
    pipeline = advanced_pipeline(shards, 13)  # 104 records of a 100-record epoch
    expected = DataStateMetadata(
        current_epoch=1,
        current_index=4,
        batches_emitted=13,
        num_records=100,
        fingerprint=pipeline.source.fingerprint,
        process_count=1,
    )
    with manager(tmp_path / "ckpt") as mngr:
        mngr.save(13, args=ocp.args.Composite(data=CheckpointSave(pipeline)))
        mngr.wait_until_finished()
        assert mngr.item_metadata(13)["data"] == expected
    with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={"data": DataStateHandler()}) as m:
        assert m.item_metadata(13)["data"] == expected


def test_a_checkpoint_saved_by_another_process_count_is_read_from_process_0s_file(shards, tmp_path):
    pipeline = advanced_pipeline(shards, 3)
    save_data_step(tmp_path / "ckpt", pipeline)
    item_dir = tmp_path / "ckpt" / "1" / "data"
    text = (item_dir / STATE_FILE).read_text()
    (item_dir / STATE_FILE).unlink()
    (item_dir / "process_0-of-2.json").write_text(text)
    (item_dir / "process_1-of-2.json").write_text(text.replace('"seed": 7', '"seed": 8'))

    fresh = build_pipeline(shards)
    restore_data(tmp_path / "ckpt", fresh)
    assert fresh.get_state() == pipeline.get_state()
    with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={"data": DataStateHandler()}) as m:
        assert m.item_metadata(1)["data"].process_count == 2


def test_orbax_v1_saves_and_loads_pipelines_and_sources_through_their_own_methods(shards, tmp_path):
    pipeline = advanced_pipeline(shards, 3)
    assert isinstance(pipeline, ocp.v1.handlers.StatefulCheckpointable)
    ocp.v1.save_checkpointables(tmp_path / "v1", {"pipeline": pipeline, "source": pipeline.source})
    assert (tmp_path / "v1" / "pipeline" / STATE_FILE).exists()

    fresh = build_pipeline(shards)
    loaded = ocp.v1.load_checkpointables(tmp_path / "v1", {"pipeline": fresh})
    assert loaded["pipeline"] is fresh
    assert fresh.get_state() == pipeline.get_state()
    fresh_source = build_pipeline(shards).source
    ocp.v1.load_checkpointables(tmp_path / "v1", {"source": fresh_source})
    assert fresh_source.get_state() == pipeline.source.get_state()
    assert_batches_equal(next(iter(fresh)), next(iter(pipeline)))


def test_checkpoint_with_model_example_resumes_to_identical_params(tmp_path):
    script = WORKER.parent.parent / "examples" / "checkpoint_with_model.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    uninterrupted, resumed = re.findall(r"step 50: params (\w+)", result.stdout)
    assert uninterrupted == resumed
    assert "new process restored step 30: epoch 1, record 448 of 512" in result.stdout
