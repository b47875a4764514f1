"""Process sharding of global batches and elastic resume, with processes simulated in one.

`process_index` / `process_count` stand in for `jax.process_index()` / `jax.process_count()`;
tests/test_multihost.py checks the same with real JAX processes.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from resumax import ArrayRecordSourceConfig, ArrayRecordSourceModule, Filter, Pipeline, RandomMap
from resumax.errors import ConfigError, StateMismatchError


def jitter(example, rng):
    return {**example, "noise": rng.normal(size=2).astype(np.float32), "coin": rng.integers(0, 3)}


def keep(example):
    return example["coin"] != 0


def build(paths, batch_size, process_index=0, process_count=1, filtered=False, num_epochs=-1):
    config = ArrayRecordSourceConfig(seed=5, num_epochs=num_epochs, shuffle_files=True)
    stages = [RandomMap(jitter)] + ([Filter(keep)] if filtered else [])
    return Pipeline(
        ArrayRecordSourceModule(config, paths),
        stages,
        batch_size=batch_size,
        rngs=1,
        process_index=process_index,
        process_count=process_count,
    )


def processes(paths, batch_size, count, **kwargs):
    return [build(paths, batch_size, i, count, **kwargs) for i in range(count)]


def global_steps(pipelines, steps):
    """Per step, the record ids of all processes in process order."""
    per_process = [[b["id"].tolist() for b in itertools.islice(p, steps)] for p in pipelines]
    return [sum(step, []) for step in zip(*per_process, strict=True)]


def ids_of(pipeline, steps):
    return [b["id"].tolist() for b in itertools.islice(pipeline, steps)]


def test_processes_split_every_global_batch_without_overlap(shards):
    reference = ids_of(build(shards, 12), 30)
    sharded = processes(shards, 4, 3)
    assert global_steps(sharded, 30) == reference
    states = [p.get_state() for p in sharded]
    assert states[0] == states[1] == states[2]
    assert states[0]["source"]["current_index"] == (30 * 12) % 100


def test_random_map_draws_are_the_same_whichever_process_reads_the_record(shards):
    whole = next(iter(build(shards, 8)))
    halves = [next(iter(p)) for p in processes(shards, 4, 2)]
    np.testing.assert_array_equal(np.concatenate([h["noise"] for h in halves]), whole["noise"])


@pytest.mark.parametrize(("saved_with", "resumed_with"), [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_resume_with_another_process_count_and_the_same_global_batch(
    shards, saved_with, resumed_with
):
    reference = ids_of(build(shards, 8), 25)
    before = processes(shards, 8 // saved_with, saved_with)
    assert global_steps(before, 9) == reference[:9]
    state = json.loads(json.dumps(before[0].get_state()))
    after = processes(shards, 8 // resumed_with, resumed_with)
    for pipeline in after:
        pipeline.set_state(state)
    assert global_steps(after, 16) == reference[9:]


def test_a_changed_global_batch_size_continues_at_the_same_record(shards):
    stream = sum(ids_of(build(shards, 1), 8 * 7 + 12 * 5), [])
    before = processes(shards, 4, 2)
    global_steps(before, 7)
    after = processes(shards, 4, 3)
    for pipeline in after:
        pipeline.set_state(before[1].get_state())
    assert sum(global_steps(after, 5), []) == stream[56:]


def test_finite_runs_give_every_process_the_same_number_of_batches(shards):
    sharded = processes(shards, 6, 3, num_epochs=1)
    counts = [len(list(p)) for p in sharded]
    assert counts == [5, 5, 5]
    assert all(p.get_state()["source"]["current_epoch"] == 1 for p in sharded)


def test_filter_pipelines_resume_exactly_with_the_same_process_count(shards):
    reference = global_steps(processes(shards, 4, 2, filtered=True), 30)
    before = processes(shards, 4, 2, filtered=True)
    global_steps(before, 11)
    states = [json.loads(json.dumps(p.get_state())) for p in before]
    assert states[0]["source"] != states[1]["source"]
    after = processes(shards, 4, 2, filtered=True)
    for pipeline, state in zip(after, states, strict=True):
        pipeline.set_state(state)
    assert global_steps(after, 19) == reference[11:]
    assert all(len(step) == 8 for step in reference)


def test_filter_pipelines_refuse_another_process_count_and_say_why(shards):
    before = processes(shards, 4, 2, filtered=True)
    global_steps(before, 3)
    with pytest.raises(StateMismatchError, match=r"'process_count'.*Filter"):
        build(shards, 8, filtered=True).set_state(before[0].get_state())


def test_shard_by_process_false_gives_every_process_the_whole_stream(shards):
    config = ArrayRecordSourceConfig(seed=5, shuffle_files=True)
    source = ArrayRecordSourceModule(config, shards)
    pipeline = Pipeline(
        source, batch_size=8, shard_by_process=False, process_index=1, process_count=2
    )
    assert (pipeline.process_index, pipeline.process_count) == (0, 1)
    assert ids_of(pipeline, 3) == ids_of(build(shards, 8), 3)


@pytest.mark.parametrize(("index", "count"), [(2, 2), (-1, 2), (0, 0)])
def test_bad_process_layout_raises_config_error(shards, index, count):
    with pytest.raises(ConfigError, match="process_index"):
        build(shards, 4, index, count)
