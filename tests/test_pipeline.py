"""Pipeline: stages, batching, epochs and exact resume from a JSON round-tripped state."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from flax import nnx

from resumax import (
    ArrayRecordSourceConfig,
    ArrayRecordSourceModule,
    BatchMap,
    Filter,
    Map,
    MemorySource,
    Pipeline,
    RandomMap,
)
from resumax.errors import ConfigError, StageError, StateMismatchError
from tests.conftest import assert_batches_equal, take

BATCH = 8


def jitter(example, rng):
    return {**example, "noise": rng.normal(size=2).astype(np.float32), "coin": rng.integers(0, 2)}


def build(paths, *, shuffle=True, num_epochs=-1, stages=None, batch_size=BATCH, seed=0, **kwargs):
    config = ArrayRecordSourceConfig(seed=42, num_epochs=num_epochs, shuffle_files=shuffle)
    source = ArrayRecordSourceModule(config, paths, rngs=nnx.Rngs(0))
    stages = [RandomMap(jitter)] if stages is None else stages
    return Pipeline(source, stages, batch_size=batch_size, rngs=nnx.Rngs(seed), **kwargs)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize(
    "batches_before",
    [
        5,  # mid-epoch (40 of 100 records)
        12,  # just before an epoch end (96 of 100)
        25,  # exactly at an epoch end (200 records = 2 epochs)
        13,  # a batch that crossed the epoch boundary (104 records)
    ],
)
def test_resume_gives_the_next_50_batches_identical(shards, shuffle, batches_before):
    reference = take(build(shards, shuffle=shuffle), batches_before + 50)
    interrupted = build(shards, shuffle=shuffle)
    take(interrupted, batches_before)
    state = json.loads(json.dumps(interrupted.get_state()))
    resumed = build(shards, shuffle=shuffle)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 50), reference[batches_before:])


def test_resume_exactly_at_an_epoch_end_does_not_yield_an_empty_epoch(shards):
    pipeline = build(shards, shuffle=True, batch_size=10)
    first_epoch = take(pipeline, 10)
    state = pipeline.get_state()
    assert (state["source"]["current_epoch"], state["source"]["current_index"]) == (1, 0)
    resumed = build(shards, shuffle=True, batch_size=10)
    resumed.set_state(
        {**state, "source": {**state["source"], "current_epoch": 0, "current_index": 100}}
    )
    second_epoch = take(resumed, 10)
    ids = np.concatenate([b["id"] for b in second_epoch])
    assert sorted(ids.tolist()) == list(range(100))
    assert ids.tolist() != np.concatenate([b["id"] for b in first_epoch]).tolist()


def test_resume_with_a_filter_stage_is_exact(shards):
    stages = [RandomMap(jitter), Filter(lambda e: e["coin"] == 1)]
    reference = take(build(shards, stages=stages), 40)
    interrupted = build(shards, stages=stages)
    take(interrupted, 17)
    resumed = build(shards, stages=stages)
    resumed.set_state(json.loads(json.dumps(interrupted.get_state())))
    assert_batches_equal(take(resumed, 23), reference[17:])
    assert all(b["coin"].tolist() == [1] * BATCH for b in reference)


def test_set_state_ends_a_live_iterator(shards):
    pipeline = build(shards)
    batches = iter(pipeline)
    start = pipeline.get_state()
    take(batches, 3)
    pipeline.set_state(start)
    assert list(itertools.islice(batches, 1)) == []
    assert_batches_equal(take(pipeline, 2), take(build(shards), 2))


def test_iterating_again_continues_where_the_last_loop_stopped(shards):
    reference = take(build(shards), 10)
    pipeline = build(shards)
    got = take(pipeline, 4) + take(pipeline, 6)
    assert_batches_equal(got, reference)


def test_batches_are_dicts_of_stacked_arrays(shards):
    batch = take(build(shards, shuffle=False), 1)[0]
    assert batch["image"].shape == (BATCH, 4, 4, 3)
    assert batch["image"].dtype == np.uint8
    assert batch["id"].tolist() == list(range(BATCH))
    assert batch["noise"].shape == (BATCH, 2)


def test_finite_epochs_stop_and_keep_the_last_partial_batch(shards):
    pipeline = build(shards, shuffle=False, num_epochs=2, batch_size=16)
    batches = list(pipeline)
    assert [len(b["id"]) for b in batches] == [16] * 12 + [8]
    ids = np.concatenate([b["id"] for b in batches]).tolist()
    assert ids == list(range(100)) * 2
    assert list(pipeline) == []
    state = pipeline.get_state()["source"]
    assert (state["current_epoch"], state["current_index"]) == (2, 0)


def test_drop_remainder_drops_the_partial_batch(shards):
    batches = list(build(shards, num_epochs=1, batch_size=16, drop_remainder=True))
    assert [len(b["id"]) for b in batches] == [16] * 6


def test_infinite_batches_cross_epoch_boundaries(shards):
    batches = take(build(shards, shuffle=False, batch_size=30), 4)
    assert batches[3]["id"].tolist() == list(range(90, 100)) + list(range(20))


def test_each_epoch_of_the_pipeline_is_a_permutation_and_epochs_differ(shards):
    batches = take(build(shards, batch_size=20), 15)
    ids = np.concatenate([b["id"] for b in batches]).reshape(3, 100)
    for epoch in ids:
        assert sorted(epoch.tolist()) == list(range(100))
    assert not np.array_equal(ids[0], ids[1])
    assert not np.array_equal(ids[1], ids[2])


def test_random_map_draws_depend_on_the_record_not_the_batching(shards):
    by_8 = take(build(shards, batch_size=8), 5)
    by_5 = take(build(shards, batch_size=5), 8)
    noise_8 = {i: n.tobytes() for b in by_8 for i, n in zip(b["id"], b["noise"], strict=True)}
    noise_5 = {i: n.tobytes() for b in by_5 for i, n in zip(b["id"], b["noise"], strict=True)}
    assert noise_8 == noise_5
    other_seed = take(build(shards, batch_size=8, seed=1), 1)[0]
    assert not np.array_equal(other_seed["noise"], by_8[0]["noise"])


def test_random_map_draws_differ_between_epochs(shards):
    batches = take(build(shards, shuffle=False, batch_size=100), 2)
    assert not np.array_equal(batches[0]["noise"], batches[1]["noise"])


def test_map_filter_and_batch_map_run_in_order(shards):
    stages = [
        lambda e: {"id": e["id"], "double": e["id"] * 2},
        Map(lambda e: {**e, "plus": e["double"] + 1}),
        Filter(lambda e: e["id"] % 2 == 0),
        BatchMap(lambda b: {**b, "total": b["plus"].sum(keepdims=True)}),
    ]
    batch = take(build(shards, shuffle=False, stages=stages, batch_size=4), 1)[0]
    assert batch["id"].tolist() == [0, 2, 4, 6]
    assert batch["plus"].tolist() == [1, 5, 9, 13]
    assert batch["total"].tolist() == [28]


def test_per_record_stage_after_a_batch_map_is_refused(shards):
    with pytest.raises(ConfigError, match="stage 1"):
        build(shards, stages=[BatchMap(lambda b: b), lambda e: e])


@pytest.mark.parametrize("batch_size", [0, -4, 2.5, True])
def test_bad_batch_size_raises_config_error(shards, batch_size):
    with pytest.raises(ConfigError, match="batch_size"):
        build(shards, batch_size=batch_size)


def test_non_callable_stage_is_refused(shards):
    with pytest.raises(ConfigError, match="stage 0"):
        build(shards, stages=["normalise"])


def test_stage_failure_names_the_stage_and_the_record(shards):
    def explode(example):
        if example["id"] == 13:
            raise ValueError("bad pixel")
        return example

    pipeline = build(shards, shuffle=False, stages=[explode])
    with pytest.raises(StageError, match=r"explode.*record 13.*bad pixel"):
        list(itertools.islice(pipeline, 5))
    assert pipeline.get_state()["batches_emitted"] == 1


def test_pipeline_state_wraps_the_source_state(shards):
    pipeline = build(shards)
    take(pipeline, 3)
    state = pipeline.get_state()
    assert state["batches_emitted"] == 3
    assert state["source"]["current_index"] == 24
    assert "shuffled_indices" not in json.dumps(state)
    assert len(json.dumps(state)) < 1024


def test_state_from_another_rngs_seed_is_refused(shards):
    state = build(shards, seed=0).get_state()
    with pytest.raises(StateMismatchError, match="'rng_seed'"):
        build(shards, seed=1).set_state(state)


def test_state_from_another_dataset_is_refused(shards):
    other = MemorySource(ArrayRecordSourceConfig(), [{"id": np.int64(0)}] * 100)
    state = Pipeline(other, batch_size=BATCH, rngs=nnx.Rngs(0)).get_state()
    with pytest.raises(StateMismatchError, match="'fingerprint'"):
        build(shards).set_state(state)


def test_memory_source_matches_the_array_record_source(shards):
    from tests.conftest import make_examples

    config = ArrayRecordSourceConfig(shuffle_files=True)
    memory = Pipeline(MemorySource(config, make_examples(100)), [RandomMap(jitter)], BATCH, 0)
    assert_batches_equal(take(memory, 20), take(build(shards), 20))
