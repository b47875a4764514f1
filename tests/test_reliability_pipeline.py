"""Never a hang, always a typed error: a Filter that keeps nothing, a stage stuck in a long call
(close, set_state, iter, GC, exit and Ctrl-C stay prompt), a worker that does not answer, a stage
that exits inside a worker, and malformed saved states (issue 11).

Stage functions are module-level: workers receive them by reference.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

import resumax
import resumax.workers.pool
from resumax import (
    ArrayRecordSourceConfig,
    ArrayRecordSourceModule,
    Filter,
    PackSequences,
    Pipeline,
)
from resumax.errors import (
    ConfigError,
    DataSourceError,
    StageError,
    StateMismatchError,
    WorkerError,
)
from resumax.pipeline.iterator import STOP_TIMEOUT
from tests.conftest import assert_batches_equal, make_examples, take

SCRIPT = os.path.join(os.path.dirname(__file__), "stuck_stage_script.py")
# Slack for a loaded 2-core machine on top of the promised bound.
SLACK = 2.0


def build(paths, stages=(), *, shuffle=False, num_epochs=-1, batch_size=4, **options):
    config = ArrayRecordSourceConfig(seed=7, num_epochs=num_epochs, shuffle_files=shuffle)
    return Pipeline(
        ArrayRecordSourceModule(config, paths), stages, batch_size=batch_size, **options
    )


def within(seconds, fn):
    """fn()'s result or exception, run in a thread; fails the test if it takes longer."""
    outcome = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: a hang"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def running(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# Stages (module level, for workers) -----------------------------------------------------------


def keep_nothing(example):
    return False


def keep_record_7(example):
    return int(example["id"]) == 7


def sleep_on_record_5(example):
    if int(example["id"]) == 5:
        time.sleep(60)
    return example


def pause_on_record_41(example):
    if int(example["id"]) == 41:
        time.sleep(1.5)
    return example


def exit_on_record_5(example):
    if int(example["id"]) == 5:
        sys.exit(3)
    return example


def interrupt_on_record_5(example):
    if int(example["id"]) == 5:
        raise KeyboardInterrupt
    return example


# 3. A Filter that keeps nothing ----------------------------------------------------------------


@pytest.mark.parametrize(("num_workers", "prefetch"), [(0, 0), (0, 2), (2, 0), (2, 2)])
def test_an_infinite_pipeline_whose_filter_keeps_nothing_raises_stage_error(
    shards, num_workers, prefetch
):
    pipeline = build(
        shards,
        [Filter(keep_nothing)],
        shuffle=True,
        num_workers=num_workers,
        prefetch=prefetch,
    )
    with pytest.raises(StageError) as raised:
        within(60, lambda: next(iter(pipeline)))
    message = str(raised.value)
    assert "Filter stage 0 (keep_nothing) kept no record of a whole epoch" in message
    assert "100 records per epoch" in message


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_filter_that_keeps_one_record_per_epoch_still_delivers(shards, num_workers):
    # Each batch of 2 needs two epochs; the kept record moves within each shuffled epoch.
    pipeline = build(
        shards, [Filter(keep_record_7)], shuffle=True, batch_size=2, num_workers=num_workers
    )
    batches = within(60, lambda: take(pipeline, 4))
    assert [batch["id"].tolist() for batch in batches] == [[7, 7]] * 4


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_packed_pipeline_whose_filter_keeps_nothing_raises_stage_error(shards, num_workers):
    stages = [Filter(keep_nothing), PackSequences(8, ["feature"], window=30)]
    pipeline = build(shards, stages, num_workers=num_workers, prefetch=0)
    with pytest.raises(StageError, match=r"Filter stage 0 \(keep_nothing\) kept no record"):
        within(60, lambda: next(iter(pipeline)))


def test_a_finite_pipeline_whose_filter_keeps_nothing_just_ends(shards):
    pipeline = build(shards, [Filter(keep_nothing)], num_epochs=3)
    assert within(60, lambda: list(pipeline)) == []


# 4. A stage stuck in a long call -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_stuck_stage_never_blocks_close_set_state_iter_gc_or_exit(shards, num_workers):
    process = subprocess.Popen(
        [sys.executable, SCRIPT, shards, str(num_workers), "2", "release"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        seconds = json.loads(process.stdout.readline())
        assert process.stdout.readline().strip() == "exiting"
        exiting = time.monotonic()
        returncode = process.wait(timeout=60)
        exit_seconds = time.monotonic() - exiting
    finally:
        process.kill()
    assert returncode == 0
    assert set(seconds) == {"close", "set_state", "iter", "gc"}
    assert max(seconds.values()) < STOP_TIMEOUT + SLACK, seconds
    assert exit_seconds < STOP_TIMEOUT + 2 * SLACK


@pytest.mark.slow
@pytest.mark.parametrize(("num_workers", "prefetch"), [(0, 0), (0, 2), (2, 0), (2, 2)])
def test_ctrl_c_ends_a_program_waiting_for_a_stuck_stage(shards, num_workers, prefetch):
    process = subprocess.Popen(
        [sys.executable, SCRIPT, shards, str(num_workers), str(prefetch), "wait"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        words = process.stdout.readline().split()
        assert words[0] == "waiting"
        workers = [int(pid) for pid in words[1:]]
        assert len(workers) == num_workers
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        _, stderr = process.communicate(timeout=60)
        seconds = time.monotonic() - interrupted
    finally:
        process.kill()
    assert "KeyboardInterrupt" in stderr
    assert seconds < STOP_TIMEOUT + 2 * SLACK
    deadline = time.monotonic() + 10
    while any(map(running, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(running, workers))


# 5. A worker that does not answer ----------------------------------------------------------------


def test_worker_timeout_names_the_worker_the_records_and_the_stage(shards):
    pipeline = build(shards, [sleep_on_record_5], num_workers=2, worker_timeout=1.0)
    batches = iter(pipeline)
    workers = batches.worker_pids
    assert next(batches)["id"].tolist() == [0, 1, 2, 3]
    started = time.monotonic()
    with pytest.raises(WorkerError) as raised:
        within(30, lambda: next(batches))
    assert time.monotonic() - started < 1.0 + STOP_TIMEOUT + SLACK
    message = str(raised.value)
    assert f"worker process 1 (pid {workers[1]})" in message
    assert "running stage 0 (sleep_on_record_5)" in message
    assert "positions [4, 8)" in message
    assert "worker_timeout=1.0" in message
    assert not any(map(running, workers))


def test_without_worker_timeout_a_long_wait_logs_a_warning_naming_the_worker(
    shards, caplog, monkeypatch
):
    monkeypatch.setattr(resumax.workers.pool, "WORKER_WAIT_WARNING_SECONDS", 0.3)
    # Span [40, 44) is task 10, for worker 0; it starts long after the workers' start-up.
    pipeline = build(shards, [pause_on_record_41], num_workers=2, prefetch=0)
    with caplog.at_level(logging.WARNING, logger="resumax.workers"):
        batches = take(pipeline, 11)
    assert batches[10]["id"].tolist() == [40, 41, 42, 43]
    warnings = [
        record.getMessage()
        for record in caplog.records
        if "stage 0 (pause_on_record_41)" in record.getMessage()
    ]
    assert warnings, "no warning naming the stage while a worker took 1.5 s"
    assert "resumax worker process 0 (pid" in warnings[0]
    assert "positions [40, 44)" in warnings[0]
    assert "Pipeline(worker_timeout=seconds)" in warnings[0]


@pytest.mark.parametrize("value", [0, -1.0, "5", True])
def test_a_bad_worker_timeout_raises_config_error(shards, value):
    with pytest.raises(ConfigError, match="worker_timeout"):
        build(shards, num_workers=1, worker_timeout=value)


# 6. SystemExit / KeyboardInterrupt in a worker, malformed states -------------------------------


@pytest.mark.parametrize(
    ("stage", "raised"),
    [(exit_on_record_5, "SystemExit"), (interrupt_on_record_5, "KeyboardInterrupt")],
)
def test_a_stage_exiting_inside_a_worker_is_a_stage_error_naming_it_and_the_record(
    shards, stage, raised
):
    pipeline = build(shards, [stage], num_workers=2)
    with pytest.raises(StageError) as error:
        within(60, lambda: take(pipeline, 3))
    message = str(error.value)
    assert f"stage 0 ({stage.__name__}) failed on record 5" in message
    assert raised in message


def test_a_source_position_past_int64_is_a_state_mismatch_naming_the_field(shards):
    pipeline = build(shards)
    state = pipeline.get_state()
    state["source"]["current_epoch"] = 2**63 // 100 + 1
    with pytest.raises(StateMismatchError, match="'current_epoch'.*int64"):
        pipeline.set_state(state)
    with pytest.raises(StateMismatchError, match="'current_epoch'.*int64"):
        pipeline.source.set_state(state["source"])
    assert pipeline.source.position == (0, 0)


@pytest.mark.parametrize("field", ["version", "rng_seed"])
@pytest.mark.parametrize("loose", ["as str", "as float", "as bool"])
def test_a_loosely_typed_version_or_rng_seed_is_a_state_mismatch_naming_the_field(
    shards, field, loose
):
    pipeline = build(shards, rngs=1)
    state = pipeline.get_state()
    value = state[field]
    assert value == 1
    state[field] = {"as str": str(value), "as float": float(value), "as bool": True}[loose]
    with pytest.raises(StateMismatchError, match=f"field '{field}'"):
        pipeline.set_state(state)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_paths_given_as_bytes_write_and_read_the_same_files_as_str(tmp_path, num_workers):
    written = resumax.write_shards(os.fsencode(tmp_path / "train"), make_examples(20), 2)
    names = [f"train-0000{shard}-of-00002.array_record" for shard in range(2)]
    assert written == [str(tmp_path / name) for name in names]
    assert sorted(os.listdir(tmp_path)) == [*names, "train.index.json"]
    expected = take(build(str(tmp_path / "train-*"), num_epochs=1), 5)
    for paths in (os.fsencode(tmp_path / "train-*"), [os.fsencode(path) for path in written]):
        assert_batches_equal(take(build(paths, num_epochs=1, num_workers=num_workers), 5), expected)


@pytest.mark.parametrize("paths", [[1, 2], [b"ok", None], b"", []])
def test_paths_that_are_not_paths_raise_data_source_error(paths):
    with pytest.raises(DataSourceError, match="must be|does not exist"):
        build(paths)
