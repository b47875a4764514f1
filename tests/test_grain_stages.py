"""Grain transforms passed as stages: Map, MapWithIndex, RandomMap and Filter run as resumax
stages (RandomMap with our per-record generator); Batch and FlatMap are refused."""

from __future__ import annotations

import grain.python
import numpy as np
import pytest
from grain import transforms

from resumax import ArrayRecordSourceConfig, ArrayRecordSourceModule, ConfigError, Pipeline
from tests.conftest import assert_batches_equal, batches_and_state, take

SHUFFLED = ArrayRecordSourceConfig(seed=3, shuffle_files=True)


class AddNoise(transforms.RandomMap):
    def random_map(self, element, rng: np.random.Generator):
        return {**element, "noise": rng.normal(size=3).astype(np.float32)}


class Double(transforms.Map):
    def map(self, element):
        return {**element, "feature": element["feature"] * 2}


class RememberIndex(transforms.MapWithIndex):
    def map_with_index(self, index, element):
        return {**element, "index": np.int64(index)}


class EvenIds(transforms.Filter):
    def filter(self, element) -> bool:
        return int(element["id"]) % 2 == 0


class LegacyDouble(grain.python.MapTransform):
    def map(self, element):
        return {**element, "id": element["id"] * 2}


def noisy_batches(shards, count, *, state=None, **options):
    pipeline = Pipeline(
        ArrayRecordSourceModule(SHUFFLED, shards), stages=[AddNoise()], batch_size=8, rngs=5,
        **options,
    )  # fmt: skip
    return batches_and_state(pipeline, count, state)


def test_random_map_is_identical_for_any_workers_and_prefetch_and_after_resume(shards):
    reference, _ = noisy_batches(shards, 8, prefetch=0)
    assert len({batch["noise"].tobytes() for batch in reference}) == 8
    prefetched, _ = noisy_batches(shards, 8, prefetch=2)
    assert_batches_equal(prefetched, reference)
    with_workers, _ = noisy_batches(shards, 8, num_workers=2, prefetch=2)
    assert_batches_equal(with_workers, reference)
    first, state = noisy_batches(shards, 3, prefetch=2)
    rest, _ = noisy_batches(shards, 5, state=state, prefetch=0)
    assert_batches_equal(first + rest, reference)


def test_random_map_draws_depend_on_the_record_not_its_position(shards):
    (batch,) = take(Pipeline(ArrayRecordSourceModule(SHUFFLED, shards), [AddNoise()], 100), 1)
    (again,) = take(Pipeline(ArrayRecordSourceModule(SHUFFLED, shards), [AddNoise()], 7), 1)
    first_id = int(again["id"][0])
    row = int(np.flatnonzero(batch["id"] == first_id)[0])
    np.testing.assert_array_equal(again["noise"][0], batch["noise"][row])


def test_map_map_with_index_and_filter_run_per_record(shards):
    stages = [Double(), RememberIndex(), EvenIds(), LegacyDouble()]
    source = ArrayRecordSourceModule(ArrayRecordSourceConfig(num_epochs=1), shards)
    batches = list(Pipeline(source, stages=stages, batch_size=10))
    ids = np.concatenate([batch["id"] for batch in batches])
    assert ids.tolist() == [2 * i for i in range(0, 100, 2)]
    indices = np.concatenate([batch["index"] for batch in batches])
    assert indices.tolist() == list(range(0, 100, 2))
    features = np.concatenate([batch["feature"] for batch in batches])
    np.testing.assert_array_equal(features[:, 0], 2.0 * indices)


def test_map_with_index_gets_the_dataset_index_in_every_epoch(shards):
    source = ArrayRecordSourceModule(ArrayRecordSourceConfig(seed=1, shuffle_files=True), shards)
    for batch in take(Pipeline(source, stages=[RememberIndex()], batch_size=30), 8):
        np.testing.assert_array_equal(batch["index"], batch["id"])


def test_grain_stages_work_in_worker_processes(shards):
    stages = [Double(), RememberIndex(), EvenIds(), AddNoise()]
    options = {"stages": stages, "batch_size": 6, "rngs": 2}
    in_process = take(Pipeline(ArrayRecordSourceModule(SHUFFLED, shards), **options), 6)
    workers = take(Pipeline(ArrayRecordSourceModule(SHUFFLED, shards), **options, num_workers=2), 6)
    assert_batches_equal(workers, in_process)


def test_a_grain_batch_points_to_batch_size(shards):
    source = ArrayRecordSourceModule(SHUFFLED, shards)
    with pytest.raises(ConfigError, match="batch_size="):
        Pipeline(source, stages=[Double(), transforms.Batch(batch_size=4)])


def test_an_unsupported_grain_transform_is_refused_by_name(shards):
    class TfNoise(transforms.TfRandomMap):
        def np_random_map(self, element, rng):
            return element

    with pytest.raises(ConfigError, match="stage 0 is a Grain TfRandomMap"):
        Pipeline(ArrayRecordSourceModule(SHUFFLED, shards), stages=[TfNoise()])
