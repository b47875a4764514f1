"""MixtureSource: block-exact proportions, every component record once per component epoch, and
exact resume across checkpoints, process counts, new weights and new components."""

from __future__ import annotations

import json

import numpy as np
import orbax.checkpoint as ocp
import pytest

import resumax
from resumax import (
    ArrayRecordSourceConfig,
    ArrayRecordSourceModule,
    MemorySource,
    MixtureSource,
    Pipeline,
    RandomMap,
)
from resumax.checkpoint import CheckpointRestore, CheckpointSave
from resumax.errors import ConfigError, StateMismatchError
from tests.conftest import assert_batches_equal, take

SIZES = {"prose": 37, "code": 23, "math": 11}
TAGS = {"prose": 0, "code": 1, "math": 2}


def corpus(name: str, size: int) -> list[dict]:
    """Records that say which corpus (its tag) and which record they are."""
    return [{"corpus": np.int64(TAGS.get(name, 9)), "id": np.int64(i)} for i in range(size)]


def memory_components(names=("prose", "code"), sizes=SIZES) -> dict[str, MemorySource]:
    return {
        name: MemorySource(
            ArrayRecordSourceConfig(seed=10 + len(name), shuffle_files=True),
            corpus(name, sizes[name]),
            name=name,
        )
        for name in names
    }


def mixture(weights=None, seed=7, shuffle=True, allow_new_components=False, sizes=SIZES):
    weights = weights or {"prose": 3, "code": 1}
    return MixtureSource(
        ArrayRecordSourceConfig(seed=seed, shuffle_files=shuffle),
        memory_components(tuple(weights), sizes),
        weights,
        allow_new_components=allow_new_components,
    )


def jitter(example, rng):
    return {**example, "noise": rng.normal(size=2)}


def draws(batches: list[dict]) -> dict[int, list[int]]:
    """Per corpus tag, the record ids it served, in order."""
    corpus_tags = np.concatenate([b["corpus"] for b in batches])
    ids = np.concatenate([b["id"] for b in batches])
    return {int(t): ids[corpus_tags == t].tolist() for t in np.unique(corpus_tags)}


def own_order(name: str, count: int) -> list[int]:
    """The first `count` records a component serves on its own, cycling through its epochs."""
    source = memory_components((name,))[name]
    epochs = -(-count // len(source))
    order = [source.record_indices(e, 0, len(source)).tolist() for e in range(epochs)]
    return sum(order, [])[:count]


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_prefix_holds_each_component_within_one_block_of_its_weight(shuffle):
    weights = {"prose": 0.5, "code": 0.3, "math": 0.2}
    source = mixture(weights, shuffle=shuffle)
    block = len(source)
    ids = source.record_indices(0, 0, 100_000)
    components = ids % 3
    for component, name in enumerate(source.names):
        served = np.cumsum(components == component)
        expected = weights[name] * np.arange(1, 100_001)
        assert np.abs(served - expected).max() <= block
        assert abs(served[-1] - expected[-1]) <= 1 + block * weights[name]


def test_every_record_of_each_component_comes_once_per_component_epoch():
    batches = take(Pipeline(mixture(), batch_size=50, prefetch=0), 40)
    for name in ("prose", "code"):
        served, size = draws(batches)[TAGS[name]], SIZES[name]
        full_epochs = len(served) // size
        assert full_epochs >= 3
        for epoch in range(full_epochs):
            assert sorted(served[epoch * size : (epoch + 1) * size]) == list(range(size))
        assert served[:size] != served[size : 2 * size]  # each epoch in its own order


def test_which_component_serves_a_position_depends_only_on_seed_and_weights():
    first = mixture().record_indices(3, 100, 900)
    np.testing.assert_array_equal(mixture().record_indices(3, 100, 900), first)
    assert not np.array_equal(mixture(seed=8).record_indices(3, 100, 900), first)


def test_random_map_draws_differ_between_records_of_different_components():
    batch = next(iter(Pipeline(mixture(), [RandomMap(jitter)], batch_size=200, rngs=1)))
    keys = list(zip(batch["corpus"].tolist(), batch["id"].tolist(), strict=True))
    noise = {key: tuple(row) for key, row in zip(keys, batch["noise"].tolist(), strict=True)}
    assert len(set(noise.values())) == len(noise)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_stream_through_an_orbax_checkpoint_manager_is_exact(tmp_path, num_workers):
    paths = {}
    for name in ("prose", "code"):
        paths[name] = tmp_path / f"{name}.array_record"
        resumax.write_array_record(paths[name], corpus(name, SIZES[name]))

    def build(num_workers=0):
        config = ArrayRecordSourceConfig(seed=3, shuffle_files=True)
        sources = {name: ArrayRecordSourceModule(config, path) for name, path in paths.items()}
        source = MixtureSource(
            ArrayRecordSourceConfig(seed=4, shuffle_files=True), sources, {"prose": 2, "code": 1}
        )
        return Pipeline(source, [RandomMap(jitter)], batch_size=16, rngs=5, num_workers=num_workers)

    reference = take(build(), 12)
    before = build()
    assert_batches_equal(take(before, 5), reference[:5])
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(5, args=ocp.args.Composite(data=CheckpointSave(before)))
        manager.wait_until_finished()
    after = build(num_workers)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(5, args=ocp.args.Composite(data=CheckpointRestore(after)))
    assert_batches_equal(take(after, 7), reference[5:])


def test_workers_read_the_same_batches_after_a_reweighted_resume():
    before = Pipeline(mixture(), [RandomMap(jitter)], batch_size=8, rngs=2, prefetch=0)
    take(before, 7)
    state = json.loads(json.dumps(before.get_state()))
    reweighted = {"prose": 1, "code": 4}
    in_process = Pipeline(mixture(reweighted), [RandomMap(jitter)], batch_size=8, rngs=2)
    in_process.set_state(state)
    workers = Pipeline(
        mixture(reweighted), [RandomMap(jitter)], batch_size=8, rngs=2, num_workers=2
    )
    workers.set_state(state)
    assert_batches_equal(take(workers, 6), take(in_process, 6))


def process_pipelines(count: int, global_batch: int = 12) -> list[Pipeline]:
    return [
        Pipeline(
            mixture(),
            [RandomMap(jitter)],
            batch_size=global_batch // count,
            rngs=1,
            process_index=index,
            process_count=count,
        )
        for index in range(count)
    ]


def global_batches(pipelines: list[Pipeline], steps: int) -> list[dict]:
    per_process = [take(pipeline, steps) for pipeline in pipelines]
    return [
        {key: np.concatenate([b[key] for b in step]) for key in step[0]}
        for step in zip(*per_process, strict=True)
    ]


@pytest.mark.parametrize(("saved_with", "resumed_with"), [(2, 1), (1, 2)])
def test_resume_with_another_process_count_is_exact(saved_with, resumed_with):
    reference = global_batches(process_pipelines(1), 20)
    before = process_pipelines(saved_with)
    assert_batches_equal(global_batches(before, 8), reference[:8])
    state = json.loads(json.dumps(before[-1].get_state()))
    after = process_pipelines(resumed_with)
    for pipeline in after:
        pipeline.set_state(state)
    assert_batches_equal(global_batches(after, 12), reference[8:])


def test_reweighted_resume_continues_every_component_without_repeat_or_skip():
    before = Pipeline(mixture({"prose": 1, "code": 1}), batch_size=10, prefetch=0)
    first = take(before, 9)
    after = Pipeline(mixture({"prose": 1, "code": 9}), batch_size=10, prefetch=0)
    after.set_state(json.loads(json.dumps(before.get_state())))
    second = take(after, 200)
    served_before, served_after = draws(first), draws(second)
    for name in ("prose", "code"):
        together = served_before[TAGS[name]] + served_after[TAGS[name]]
        assert together == own_order(name, len(together))
    prose, code = (len(served_after[TAGS[name]]) for name in ("prose", "code"))
    block = len(after.source)
    assert abs(code - 0.9 * 2000) <= block and abs(prose - 0.1 * 2000) <= block


def test_reweighted_resume_on_another_process_count_repeats_and_skips_nothing():
    before = process_pipelines(2)
    first = global_batches(before, 6)
    state = json.loads(json.dumps(before[0].get_state()))
    after = Pipeline(mixture({"prose": 1, "code": 2}), [RandomMap(jitter)], batch_size=12, rngs=1)
    after.set_state(state)
    served_before, served_after = draws(first), draws(take(after, 30))
    for name in ("prose", "code"):
        together = served_before[TAGS[name]] + served_after[TAGS[name]]
        assert together == own_order(name, len(together))


def test_resume_with_the_same_weights_keeps_the_block_alignment():
    reweighted = mixture({"prose": 1, "code": 4})
    reweighted.set_state(mixture().get_state() | {"current_index": 5})
    state = reweighted.get_state()
    assert state["origin"] == 5
    again = mixture({"prose": 2, "code": 8})  # the same proportions
    again.set_state(state)
    np.testing.assert_array_equal(
        again.record_indices(0, 5, 3000), reweighted.record_indices(0, 5, 3000)
    )


def test_a_component_added_at_resume_is_refused_unless_allowed():
    saved = mixture().get_state()
    three = {"prose": 3, "code": 1, "math": 1}
    with pytest.raises(StateMismatchError, match=r"\['math'\].*allow_new_components"):
        mixture(three).set_state(saved)
    allowed = mixture(three, allow_new_components=True)
    allowed.set_state(saved)
    assert allowed.get_state()["components"]["math"]["current_index"] == 0
    batch = next(iter(Pipeline(allowed, batch_size=400)))
    assert draws([batch])[TAGS["math"]][:11] == own_order("math", 11)


def test_a_component_removed_at_resume_is_refused_even_when_new_ones_are_allowed():
    saved = mixture({"prose": 3, "code": 1, "math": 1}).get_state()
    with pytest.raises(StateMismatchError, match=r"\['math'\]"):
        mixture(allow_new_components=True).set_state(saved)


def test_a_component_with_other_data_is_refused_by_name():
    saved = mixture().get_state()
    with pytest.raises(StateMismatchError, match=r"'code'.*fingerprint"):
        mixture(sizes={**SIZES, "code": 24}).set_state(saved)


def test_a_state_of_another_mixture_seed_is_refused():
    with pytest.raises(StateMismatchError, match="'seed'"):
        mixture(seed=8).set_state(mixture().get_state())


def test_a_finite_mixture_is_refused():
    with pytest.raises(ConfigError, match="num_epochs=-1"):
        MixtureSource(
            ArrayRecordSourceConfig(num_epochs=2), memory_components(), {"prose": 1, "code": 1}
        )


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({"prose": 1, "code": 0}, "'code' must be a positive"),
        ({"prose": 1, "code": float("nan")}, "'code' must be a positive"),
        ({"prose": 1, "code": True}, "'code' must be a positive"),
        ({"prose": 1}, r"no weight for \['code'\]"),
        ({"prose": 1, "code": 1, "math": 1}, r"unknown \['math'\]"),
        ({"prose": 1, "code": 1e-9}, "less than 1/"),
    ],
)
def test_bad_weights_raise_config_error_naming_the_component(weights, match):
    with pytest.raises(ConfigError, match=match):
        MixtureSource(ArrayRecordSourceConfig(), memory_components(), weights)


def test_a_component_that_is_not_a_source_raises_config_error():
    with pytest.raises(ConfigError, match="'code' is a list"):
        MixtureSource(ArrayRecordSourceConfig(), {"code": corpus("code", 3)}, {"code": 1})


def test_a_mixture_is_not_a_component_of_another():
    with pytest.raises(ConfigError, match="'inner' is itself a MixtureSource"):
        MixtureSource(ArrayRecordSourceConfig(), {"inner": mixture()}, {"inner": 1})


def test_positions_far_into_the_stream_are_computed_without_a_scan():
    source = mixture({"prose": 0.7, "code": 0.3})
    far = 10**12
    first_block = source.record_indices(far // len(source), 0, len(source))
    np.testing.assert_array_equal(source.record_indices(far // len(source), 0, 3), first_block[:3])
    served = source.draws_before(far)
    assert served.sum() == far
    assert np.abs(served - np.array([0.3, 0.7]) * far).max() <= len(source)


def test_state_is_a_few_integers_per_component():
    sizes = {f"corpus{i}": 10 + i for i in range(10)}
    two = mixture({"corpus0": 1, "corpus1": 2}, sizes=sizes).get_state()
    ten = mixture({name: 1 + i for i, name in enumerate(sizes)}, sizes=sizes).get_state()
    two_bytes, ten_bytes = len(json.dumps(two)), len(json.dumps(ten))
    assert two_bytes < 800 and ten_bytes < 3000
    assert ten_bytes - two_bytes < 8 * 250
