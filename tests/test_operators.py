"""A bare nnx.Module in `stages` is a batch-level operator (as in Datarax) whose nnx Variables
are part of the pipeline state, as of the last batch delivered, also with prefetch."""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from resumax import ArrayRecordSourceConfig, ArrayRecordSourceModule, Pipeline, StateMismatchError
from resumax.checkpoint import CheckpointRestore, CheckpointSave
from resumax.tools.profile import time_steps
from tests.conftest import assert_batches_equal, batches_and_state, take

SHUFFLED = ArrayRecordSourceConfig(seed=11, shuffle_files=True)


class Jitter(nnx.Module):
    """Adds noise drawn from its own nnx.Rngs and counts the batches it has seen."""

    def __init__(self, seed: int = 0):
        self.rngs = nnx.Rngs(jitter=seed)
        self.seen = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.running_mean = nnx.BatchStat(np.zeros(3, np.float32))

    def __call__(self, batch):
        noise = jax.random.normal(self.rngs.jitter(), batch["feature"].shape)
        self.seen[...] += 1
        self.running_mean.set_value(0.5 * self.running_mean.get_value() + batch["feature"].mean(0))
        return {**batch, "feature": batch["feature"] + np.asarray(noise)}


class Centre(nnx.Module):
    """Subtracts the batch mean: meaningful only on a whole batch."""

    def __call__(self, batch):
        return {**batch, "feature": batch["feature"] - batch["feature"].mean(0, keepdims=True)}


def jittered(shards, count, *, state=None, operator=None, **options):
    operator = operator or Jitter()
    pipeline = Pipeline(
        ArrayRecordSourceModule(SHUFFLED, shards), stages=[operator], batch_size=8, **options
    )
    return batches_and_state(pipeline, count, state)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_with_an_operator_drawing_from_its_own_rngs_is_exact(shards, prefetch):
    reference, _ = jittered(shards, 10, prefetch=prefetch)
    assert len({batch["feature"].tobytes() for batch in reference}) == 10
    first, state = jittered(shards, 4, prefetch=prefetch)
    state = json.loads(json.dumps(state))
    rest, _ = jittered(shards, 6, state=state, prefetch=prefetch)
    assert_batches_equal(first + rest, reference)


def test_the_state_describes_the_delivered_batches_not_those_prefetched(shards):
    operator = Jitter()
    pipeline = Pipeline(ArrayRecordSourceModule(SHUFFLED, shards), [operator], 8, prefetch=3)
    iterator = iter(pipeline)
    take(iterator, 3)
    time.sleep(0.5)  # the prefetch thread runs 3 batches ahead, on its own copy
    assert int(operator.seen.get_value()) == 3
    assert int(operator.rngs.jitter.count.get_value()) == 3
    (saved,) = pipeline.get_state()["operators"]
    assert saved["name"] == "Jitter" and saved["stage"] == 0
    assert saved["variables"]["['seen']"]["data"] == 3
    assert saved["variables"]["['rngs']['jitter']['count']"]["data"] == 3
    key = saved["variables"]["['rngs']['jitter']['key']"]
    assert key["key_impl"] == "threefry2x32" and key["data"] == [0, 0]
    iterator.close()
    take(iter(pipeline), 1)  # a new iterator goes on from the delivered batches
    assert int(operator.seen.get_value()) == 4
    (saved,) = pipeline.get_state()["operators"]
    assert saved["variables"]["['seen']"]["data"] == 4


@pytest.mark.parametrize(("prefetch", "num_workers"), [(0, 0), (2, 0), (8, 0), (2, 1)])
def test_after_each_next_the_module_holds_exactly_the_delivered_state(
    shards, prefetch, num_workers
):
    """As Datarax's stochastic-stage test: each `next(iter(pipeline))` leaves the next key,
    never one drawn for a batch computed ahead; repeated to catch a race with the thread."""
    operator = Jitter()
    source = ArrayRecordSourceModule(SHUFFLED, shards)
    pipeline = Pipeline(source, [operator], 8, prefetch=prefetch, num_workers=num_workers)
    keys = set()
    # Each iter() starts the workers anew: fewer rounds with them, the race is the thread's.
    rounds = 10 if num_workers else 40
    for delivered in range(1, rounds + 1):
        next(iter(pipeline))
        assert int(operator.seen.get_value()) == delivered
        assert int(operator.rngs.jitter.count.get_value()) == delivered
        keys.add(np.asarray(jax.random.key_data(operator.rngs.jitter())).tobytes())
        operator.rngs.jitter.count.set_value(jnp.uint32(delivered))  # undo the draw above
    assert len(keys) == rounds
    pipeline.close()


def test_a_change_to_the_module_between_iterators_counts(shards):
    operator = Jitter()
    pipeline = Pipeline(ArrayRecordSourceModule(SHUFFLED, shards), [operator], 8, prefetch=2)
    take(iter(pipeline), 2)
    operator.seen.set_value(jnp.asarray(100, jnp.int32))
    take(iter(pipeline), 1)
    assert int(operator.seen.get_value()) == 101
    assert pipeline.get_state()["operators"][0]["variables"]["['seen']"]["data"] == 101


def test_profiling_leaves_the_operator_untouched(shards):
    operator = Jitter()
    pipeline = Pipeline(ArrayRecordSourceModule(SHUFFLED, shards), [operator], 8)
    steps = time_steps(pipeline, 0.05)
    assert "Jitter" in " ".join(step.name for step in steps)
    assert int(operator.seen.get_value()) == 0


def test_a_centring_operator_sees_the_whole_batch(shards):
    source = ArrayRecordSourceModule(SHUFFLED, shards)
    (batch,) = take(Pipeline(source, stages=[lambda x: x, Centre()], batch_size=10), 1)
    np.testing.assert_allclose(batch["feature"].mean(0), 0, atol=1e-5)
    assert np.abs(batch["feature"]).max() > 1


def test_operators_run_after_workers_on_whole_batches(shards):
    reference, _ = jittered(shards, 6)
    with_workers, _ = jittered(shards, 6, num_workers=2)
    assert_batches_equal(with_workers, reference)


def test_operator_state_goes_through_an_orbax_checkpoint(tmp_path, shards):
    reference, _ = jittered(shards, 7)
    operator = Jitter()
    pipeline = Pipeline(ArrayRecordSourceModule(SHUFFLED, shards), [operator], 8)
    first = take(pipeline, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=CheckpointSave(pipeline)))
        manager.wait_until_finished()
    resumed = Pipeline(ArrayRecordSourceModule(SHUFFLED, shards), [Jitter()], 8)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(3, args=ocp.args.Composite(data=CheckpointRestore(resumed)))
    assert_batches_equal(first + take(resumed, 4), reference)


def test_a_state_without_the_operator_or_of_another_operator_is_refused(shards):
    _, plain_state = jittered(shards, 2, operator=Centre())
    with pytest.raises(StateMismatchError, match="operators"):
        jittered(shards, 1, state=plain_state)
    _, state = jittered(shards, 2)
    state["operators"][0]["variables"]["['seen']"]["dtype"] = "<f8"
    with pytest.raises(StateMismatchError, match="seen"):
        jittered(shards, 1, state=state)


class RunningSum(nnx.Module):
    """Keeps a numpy running sum updated in place and adds it to each batch."""

    def __init__(self):
        self.total = nnx.BatchStat(np.zeros(3, np.float64))

    def __call__(self, batch):
        total = self.total.get_value()
        total += batch["feature"].sum(0)  # in place: snapshots must be copies
        return {**batch, "total": np.broadcast_to(total, batch["feature"].shape).copy()}


def test_an_operator_updating_numpy_variables_in_place_resumes_exactly(shards):
    reference, _ = jittered(shards, 8, operator=RunningSum(), prefetch=2)
    first, state = jittered(shards, 3, operator=RunningSum(), prefetch=2)
    assert state["operators"][0]["variables"]["['total']"]["data"] == first[-1]["total"][0].tolist()
    rest, _ = jittered(shards, 5, state=json.loads(json.dumps(state)), operator=RunningSum())
    assert_batches_equal(first + rest, reference)
