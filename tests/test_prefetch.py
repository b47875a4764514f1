"""Prefetch: the same batches, states and errors as without it, bounded look-ahead, clean stop."""

from __future__ import annotations

import itertools
import threading
import time

import numpy as np
import pytest
from flax import nnx

from resumax import ArrayRecordSourceConfig, ArrayRecordSourceModule, Pipeline, RandomMap
from resumax.errors import StageError
from resumax.pipeline.prefetch import Prefetcher

BATCH = 8


def jitter(example, rng):
    return {**example, "noise": rng.normal(size=2).astype(np.float32)}


def explode(example):
    if example["id"] == 13:
        raise ValueError("bad pixel")
    return example


JITTER = (RandomMap(jitter),)


def build(paths, *, stages=JITTER, shuffle=True, num_epochs=-1, prefetch=0):
    config = ArrayRecordSourceConfig(seed=42, num_epochs=num_epochs, shuffle_files=shuffle)
    source = ArrayRecordSourceModule(config, paths, rngs=nnx.Rngs(0))
    return Pipeline(source, stages, batch_size=BATCH, rngs=nnx.Rngs(1), prefetch=prefetch)


def batches_and_states(pipeline, count):
    out = []
    for batch in itertools.islice(iter(pipeline), count):
        out.append((batch, pipeline.get_state()))
    return out


def test_prefetch_gives_the_same_batches_and_states_as_none(shards):
    expected = batches_and_states(build(shards, prefetch=0), 30)
    got = batches_and_states(build(shards, prefetch=4), 30)
    for (batch, state), (want_batch, want_state) in zip(got, expected, strict=True):
        assert state == want_state
        for key in want_batch:
            np.testing.assert_array_equal(batch[key], want_batch[key])


def test_the_state_counts_delivered_batches_not_prefetched_ones(shards):
    pipeline = build(shards, prefetch=4)
    batches = iter(pipeline)
    next(batches)
    next(batches)
    state = pipeline.get_state()
    assert state["batches_emitted"] == 2
    assert state["source"]["current_index"] == 2 * BATCH
    batches.close()
    assert pipeline.get_state() == state


def test_a_stage_error_arrives_after_the_batches_before_it(shards):
    pipeline = build(shards, stages=[explode], shuffle=False, prefetch=4)
    batches = iter(pipeline)
    assert next(batches)["id"].tolist() == list(range(8))
    with pytest.raises(StageError, match=r"explode.*record 13.*bad pixel"):
        next(batches)
    assert pipeline.get_state()["batches_emitted"] == 1
    assert next(batches, None) is None


def test_a_finite_run_with_prefetch_ends_at_the_end(shards):
    pipeline = build(shards, shuffle=False, num_epochs=2, prefetch=3)
    ids = np.concatenate([batch["id"] for batch in pipeline]).tolist()
    assert ids == list(range(100)) * 2
    state = pipeline.get_state()["source"]
    assert (state["current_epoch"], state["current_index"]) == (2, 0)
    assert list(pipeline) == []


def test_prefetcher_never_runs_more_than_depth_items_ahead():
    depth = 3
    taken = []
    ahead = []

    def items():
        for index in itertools.count():
            ahead.append(index - len(taken))
            yield index

    prefetcher = Prefetcher(items(), depth)
    for _ in range(50):
        taken.append(next(prefetcher))
    prefetcher.stop()
    assert taken == list(range(50))
    # The producer holds one item while `depth` wait in the queue.
    assert max(ahead) <= depth + 1


def test_prefetcher_stop_ends_its_thread_while_the_producer_waits_for_room():
    prefetcher = Prefetcher(itertools.count(), depth=2, name="test-prefetch")
    assert next(prefetcher) == 0
    prefetcher.stop()
    assert not any(thread.name == "test-prefetch" for thread in threading.enumerate())
    assert next(prefetcher, None) is None


def wait_until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_prefetcher_refills_only_once_half_its_items_are_taken():
    depth, produced = 8, []

    def items():
        for index in itertools.count():
            produced.append(index)
            yield index

    prefetcher = Prefetcher(items(), depth)
    wait_until(lambda: len(produced) == depth + 1)  # `depth` wait, the thread holds one more
    taken = [next(prefetcher) for _ in range(depth // 2 - 1)]
    time.sleep(0.2)
    assert len(produced) == depth + 1, "the thread woke up before half the items were taken"
    taken.append(next(prefetcher))  # now depth / 2 wait: the thread refills to `depth`
    wait_until(lambda: len(produced) == len(taken) + depth + 1)
    taken += [next(prefetcher) for _ in range(100)]
    prefetcher.stop()
    assert taken == list(range(len(taken)))


@pytest.mark.parametrize("prefetch", [0, 4])
def test_positions_moved_by_taking_batches_are_what_nnx_state_reads(shards, prefetch):
    pipeline = build(shards, prefetch=prefetch)
    iterator = iter(pipeline)
    for _ in range(3):
        next(iterator)
    state = nnx.state(pipeline)
    assert state["source"]["current_index"].get_value() == 3 * BATCH
    assert state["batches_emitted"].get_value() == 3
    assert pipeline.get_state()["source"]["current_index"] == 3 * BATCH
    iterator.close()


def test_a_caller_waiting_for_an_item_ends_when_another_thread_stops_the_prefetcher():
    release = threading.Event()

    def slow():
        yield 0
        release.wait(10)
        yield 1

    prefetcher = Prefetcher(slow(), depth=2)
    assert next(prefetcher) == 0
    threading.Timer(0.2, prefetcher.stop, kwargs={"timeout": 0.0}).start()
    started = time.monotonic()
    assert next(prefetcher, None) is None
    assert time.monotonic() - started < 2.0
    release.set()
