"""Worker processes: identical batches for any worker count, exact resume, errors that name the
stage and record, and no process or shared memory left behind (close, error, GC, SIGTERM).

Stage functions are module-level: workers receive them by reference.
"""

from __future__ import annotations

import gc
import glob
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from flax import nnx

from resumax import (
    ArrayRecordSourceConfig,
    ArrayRecordSourceModule,
    Filter,
    MemorySource,
    Pipeline,
    RandomMap,
    write_shards,
)
from resumax.errors import ConfigError, ResumaxError, StageError
from resumax.records import decode
from resumax.workers.pool import WorkerPool
from tests.conftest import assert_batches_equal, make_examples, take

BATCH = 8
SCRIPT = os.path.join(os.path.dirname(__file__), "pipeline_workers_script.py")


def enlarge(example, rng):
    """Adds 16 KiB of float32 per record: a batch of 8 travels through shared memory."""
    big = rng.normal(size=(32, 32, 4)).astype(np.float32)
    return {**example, "big": big, "coin": rng.integers(0, 2)}


def heads(example):
    return example["coin"] == 1


def explode(example):
    if example["id"] == 13:
        raise ValueError("bad pixel")
    return example


def explode_late(example):
    if example["id"] == 70:
        raise ValueError("bad pixel")
    return example


ENLARGE = (RandomMap(enlarge),)


def build(paths, *, stages=ENLARGE, shuffle=True, num_epochs=-1, **options):
    config = ArrayRecordSourceConfig(seed=42, num_epochs=num_epochs, shuffle_files=shuffle)
    source = ArrayRecordSourceModule(config, paths, rngs=nnx.Rngs(0))
    return Pipeline(source, stages, batch_size=BATCH, rngs=nnx.Rngs(3), **options)


def running(pid):
    """True while `pid` is a live process (a zombie has exited and holds nothing)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until_stopped(pids, deadline_seconds=30.0):
    """The pids still running once all stopped or the deadline passed (not a timing assertion)."""
    deadline = time.monotonic() + deadline_seconds
    while any(running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if running(pid)]


def shared_memory_of(pid):
    return glob.glob(f"/dev/shm/resumax-{pid}-*")


def descendants():
    return {process.pid for process in psutil.Process().children(recursive=True)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """40 batches of RandomMap + Filter over 100 records in 3 shards, in-process, no prefetch."""
    prefix = tmp_path_factory.mktemp("data") / "train"
    write_shards(prefix, make_examples(100), num_shards=3)
    paths = f"{prefix}-*.array_record"
    stages = (RandomMap(enlarge), Filter(heads))
    pipeline = build(paths, stages=stages, num_workers=0, prefetch=0)
    batches, states = [], []
    for batch in itertools.islice(pipeline, 40):
        batches.append(batch)
        states.append(pipeline.get_state())
    return paths, stages, batches, states


@pytest.mark.parametrize(("num_workers", "prefetch"), [(0, 4), (1, 0), (2, 0), (2, 4)])
def test_batches_and_states_are_identical_for_any_workers_and_prefetch(
    reference, num_workers, prefetch
):
    paths, stages, expected, expected_states = reference
    pipeline = build(paths, stages=stages, num_workers=num_workers, prefetch=prefetch)
    got, states = [], []
    with iter(pipeline) as batches:
        for batch in itertools.islice(batches, 40):
            got.append(batch)
            states.append(pipeline.get_state())
    assert_batches_equal(got, expected)
    assert states == expected_states
    assert all(batch["coin"].tolist() == [1] * BATCH for batch in got)


def test_resume_in_the_middle_with_workers_is_exact(reference):
    paths, stages, expected, expected_states = reference
    interrupted = build(paths, stages=stages, num_workers=2, prefetch=4)
    with iter(interrupted) as batches:
        take(batches, 13)
    state = json.loads(json.dumps(interrupted.get_state()))
    assert state == expected_states[12]
    resumed = build(paths, stages=stages, num_workers=2, prefetch=4)
    resumed.set_state(state)
    with iter(resumed) as batches:
        assert_batches_equal(take(batches, 27), expected[13:])


def test_a_new_iterator_continues_where_the_previous_stopped_and_ends_it(reference):
    paths, stages, expected, _ = reference
    pipeline = build(paths, stages=stages, num_workers=1, prefetch=2)
    first = iter(pipeline)
    got = take(first, 3)
    first_workers = first.worker_pids
    with iter(pipeline) as second:
        got += take(second, 5)
        assert wait_until_stopped(first_workers) == []
        assert next(first, None) is None
    assert_batches_equal(got, expected[:8])


def test_a_finite_run_with_workers_matches_one_without(shards):
    without = list(build(shards, num_epochs=2, prefetch=0))
    pipeline = build(shards, num_epochs=2, num_workers=2)
    with_workers = list(pipeline)
    assert_batches_equal(with_workers, without)
    state = pipeline.get_state()["source"]
    assert (state["current_epoch"], state["current_index"]) == (2, 0)


def test_memory_source_works_with_workers():
    config = ArrayRecordSourceConfig(shuffle_files=True)
    examples = make_examples(50)
    expected = take(Pipeline(MemorySource(config, examples), batch_size=BATCH, prefetch=0), 9)
    with iter(Pipeline(MemorySource(config, examples), batch_size=BATCH, num_workers=2)) as it:
        assert_batches_equal(take(it, 9), expected)


def test_a_lambda_stage_is_refused_with_workers_naming_the_stage(shards):
    with pytest.raises(ConfigError, match=r"stage 1 \(<lambda>\).*module level"):
        build(shards, stages=[RandomMap(enlarge), lambda e: e], num_workers=2)


def test_a_lambda_decode_is_refused_with_workers(shards):
    config = ArrayRecordSourceConfig()
    source = ArrayRecordSourceModule(config, shards, decode=lambda data: decode(data))
    with pytest.raises(ConfigError, match="source.*module level"):
        Pipeline(source, num_workers=1)


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_bad_worker_and_prefetch_counts_raise_config_error(shards, value):
    with pytest.raises(ConfigError, match="num_workers"):
        build(shards, num_workers=value)
    with pytest.raises(ConfigError, match="prefetch"):
        build(shards, prefetch=value)


def test_stage_error_in_a_worker_names_stage_and_record_and_stops_the_workers(shards):
    pipeline = build(shards, stages=[explode], shuffle=False, num_workers=2, prefetch=2)
    batches = iter(pipeline)
    workers = batches.worker_pids
    with pytest.raises(StageError, match=r"stage 0 \(explode\) failed on record 13.*bad pixel"):
        take(batches, 5)
    assert pipeline.get_state()["batches_emitted"] == 1
    assert wait_until_stopped(workers) == []
    assert shared_memory_of(os.getpid()) == []


def numbered_array(task):
    if task == 37:
        raise ValueError("task 37 fails")
    return np.full(1000, task)


def make_numbered_array():
    return numbered_array


def test_a_task_failing_inside_a_group_lets_the_results_before_it_through():
    pool = WorkerPool(make_numbered_array, 1)
    try:
        received = []
        with pytest.raises(ValueError, match="task 37 fails"):
            for result in pool.map(range(100), max_group=16):  # groups of 16 after the first
                received.append(int(result[0]))
        assert received == list(range(37))
    finally:
        pool.close()


@pytest.mark.parametrize("num_workers", [1, 2])
def test_batches_before_a_failing_record_arrive_with_workers(shards, num_workers):
    # Record 70 is in batch 8.
    pipeline = build(shards, stages=[explode_late], shuffle=False, num_workers=num_workers)
    batches = iter(pipeline)
    delivered = []
    with pytest.raises(StageError, match=r"failed on record 70.*bad pixel"):
        for batch in batches:
            delivered.append(batch)
    assert [int(batch["id"][0]) for batch in delivered] == list(range(0, 64, BATCH))
    assert pipeline.get_state()["batches_emitted"] == 8


def test_closing_the_iterator_stops_the_workers_and_frees_shared_memory(shards):
    before = descendants()
    pipeline = build(shards, num_workers=2)
    batches = iter(pipeline)
    take(batches, 3)
    workers = batches.worker_pids
    assert len(workers) == 2
    assert all(running(pid) for pid in workers)
    assert set(workers) <= descendants()
    batches.close()
    assert not any(running(pid) for pid in workers)
    assert descendants() - before <= _multiprocessing_servers()
    assert shared_memory_of(os.getpid()) == []


def test_a_garbage_collected_iterator_stops_its_workers(shards):
    batches = iter(build(shards, num_workers=2))
    next(batches)
    workers = batches.worker_pids
    del batches
    gc.collect()
    assert wait_until_stopped(workers) == []
    assert shared_memory_of(os.getpid()) == []


def test_a_killed_worker_surfaces_as_an_error_not_a_hang(shards):
    batches = iter(build(shards, num_workers=2, prefetch=0))
    next(batches)
    os.kill(batches.worker_pids[0], signal.SIGKILL)
    with pytest.raises(ResumaxError, match="worker process 0 .*stopped unexpectedly"):
        take(batches, 10)
    assert shared_memory_of(os.getpid()) == []


@pytest.mark.parametrize("mode", ["default", "handler", "exit"])
def test_sigterm_or_exit_leaves_no_worker_process_or_shared_memory(shards, mode):
    process = subprocess.Popen(
        [sys.executable, SCRIPT, shards, mode], stdout=subprocess.PIPE, text=True
    )
    try:
        workers = [int(pid) for pid in process.stdout.readline().split()]
        assert len(workers) == 2
        if mode != "exit":
            assert all(running(pid) for pid in workers)
            process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert returncode == (-signal.SIGTERM if mode == "default" else 0)
    assert wait_until_stopped(workers) == []
    assert shared_memory_of(process.pid) == []


def _multiprocessing_servers():
    """multiprocessing's fork server and resource tracker: started once, they live as long as
    this process and are not workers."""
    return {
        child.pid
        for child in psutil.Process().children()
        if "from multiprocessing." in " ".join(child.cmdline())
    }
