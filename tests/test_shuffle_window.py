"""The opt-in file-grouped shuffle `shuffle_window`: exact permutations, records mixed only within
windows of the epoch's file order, exact resume, refusals, and the same batches everywhere."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import resumax
from resumax import order
from resumax.errors import ConfigError, StateMismatchError
from resumax.pipeline import Pipeline
from resumax.sources import (
    ArrayRecordSourceConfig,
    ArrayRecordSourceModule,
    MemorySource,
    MixtureSource,
)
from tests.conftest import assert_batches_equal, batches_and_state, make_examples, take

# Uneven shards: 7 files of 1 to 23 records, 80 in all.
SHARD_SIZES = [10, 23, 1, 9, 17, 12, 8]


@pytest.fixture
def uneven(tmp_path) -> list[str]:
    examples, paths, start = make_examples(sum(SHARD_SIZES)), [], 0
    for number, size in enumerate(SHARD_SIZES):
        path = tmp_path / f"part{number}.array_record"
        resumax.write_array_record(path, examples[start : start + size])
        paths.append(str(path))
        start += size
    return paths


def windowed(paths, window: int | None, seed: int = 3, **config) -> ArrayRecordSourceModule:
    config = ArrayRecordSourceConfig(seed=seed, shuffle_files=True, shuffle_window=window, **config)
    return ArrayRecordSourceModule(config, paths)


def epoch_order(source, epoch: int, step: int = 7) -> list[int]:
    """The epoch's record indices, asked for in spans of `step` positions."""
    total = len(source)
    spans = [source.record_indices(epoch, a, min(a + step, total)) for a in range(0, total, step)]
    return np.concatenate(spans).tolist()


@pytest.mark.parametrize("window", [1, 4, 16, 31, 80, 1000])
def test_each_epoch_is_a_permutation_mixed_only_within_windows_of_the_file_order(uneven, window):
    source = windowed(uneven, window)
    starts = np.concatenate([[0], np.cumsum(SHARD_SIZES)])
    for epoch in range(3):
        got = epoch_order(source, epoch)
        assert sorted(got) == list(range(80))
        files = order.permute(np.arange(7), 7, order.epoch_seed(3, epoch)).tolist()
        in_file_order = [r for f in files for r in range(starts[f], starts[f + 1])]
        for first in range(0, 80, window):
            window_records = got[first : first + window]
            assert sorted(window_records) == sorted(in_file_order[first : first + window])


def test_the_order_is_a_pure_function_of_seed_epoch_and_position(uneven):
    first, again, other = windowed(uneven, 16), windowed(uneven, 16), windowed(uneven, 16, seed=4)
    assert epoch_order(first, 2) == epoch_order(again, 2, step=13)
    assert epoch_order(first, 2) != epoch_order(other, 2)
    assert epoch_order(first, 0) != epoch_order(first, 1)
    assert first.record_indices(1, 40, 41).tolist() == [epoch_order(first, 1)[40]]


def test_without_a_window_the_global_shuffle_is_unchanged(uneven):
    source = windowed(uneven, None)
    expected = order.record_indices(np.arange(80), num_records=80, seed=3, epoch=1, shuffle=True)
    assert epoch_order(source, 1) == expected.tolist()
    assert "shuffle_window" not in source.get_state()


def test_batches_read_the_records_the_order_names(uneven):
    source = windowed(uneven, 16)
    batches = take(Pipeline(source=source, batch_size=8, prefetch=0), 20)
    ids = np.concatenate([batch["id"] for batch in batches]).tolist()
    assert ids == epoch_order(source, 0) + epoch_order(source, 1)


def test_resume_mid_window_gives_identical_batches(uneven):
    def pipeline():
        return Pipeline(source=windowed(uneven, 16), batch_size=5, prefetch=2)

    expected, _ = batches_and_state(pipeline(), 30)
    _, state = batches_and_state(pipeline(), 7)  # position 35: inside the third window
    resumed, _ = batches_and_state(pipeline(), 23, state=state)
    assert state["source"]["shuffle_window"] == 16
    assert_batches_equal(resumed, expected[7:])


@pytest.mark.parametrize("other", [8, None])
def test_a_state_saved_with_another_shuffle_window_is_refused(uneven, other):
    state = windowed(uneven, 16).get_state()
    with pytest.raises(StateMismatchError, match="shuffle_window"):
        windowed(uneven, other).set_state(state)
    with pytest.raises(StateMismatchError, match="shuffle_window"):
        windowed(uneven, 16).set_state(windowed(uneven, other).get_state())


@pytest.mark.parametrize("bad", [0, -4, True, 2.5, "8"])
def test_shuffle_window_must_be_a_positive_int(bad):
    with pytest.raises(ConfigError, match="shuffle_window"):
        ArrayRecordSourceConfig(shuffle_files=True, shuffle_window=bad)


def test_shuffle_window_needs_shuffle_files():
    with pytest.raises(ConfigError, match="shuffle_window=8 needs shuffle_files=True"):
        ArrayRecordSourceConfig(shuffle_window=8)


@pytest.mark.slow
def test_workers_give_the_batches_of_the_main_process(uneven):
    def batches(num_workers: int) -> list[dict]:
        source = windowed(uneven, 16, num_epochs=2)
        return list(Pipeline(source=source, batch_size=6, num_workers=num_workers))

    in_process = batches(0)
    assert len(in_process) == 27  # 160 records, the last batch partial
    assert_batches_equal(batches(2), in_process)


def test_processes_together_read_every_record_once_per_epoch(uneven):
    pipelines = [
        Pipeline(
            source=windowed(uneven, 16),
            batch_size=4,
            prefetch=0,
            process_index=index,
            process_count=2,
        )
        for index in range(2)
    ]
    ids = [np.concatenate([b["id"] for b in take(p, 10)]).tolist() for p in pipelines]
    assert sorted(ids[0] + ids[1]) == list(range(80))


def test_one_file_and_a_memory_source_are_windowed_as_one_file(single_file):
    source = windowed(single_file, 8)
    ids = [int(source[int(i)]["id"]) for i in epoch_order(source, 0)]
    memory = MemorySource(source.config, make_examples(50))
    assert ids == epoch_order(memory, 0)
    assert sorted(ids) == list(range(50))
    for first in range(0, 50, 8):
        assert sorted(ids[first : first + 8]) == list(range(first, min(first + 8, 50)))


def test_a_mixture_takes_windowed_components_but_no_window_of_its_own(uneven, single_file):
    components = {"a": windowed(uneven, 16), "b": windowed(single_file, 8)}
    with pytest.raises(ConfigError, match="shuffle_window"):
        MixtureSource(ArrayRecordSourceConfig(shuffle_files=True, shuffle_window=4), components, {})
    mixture = MixtureSource(ArrayRecordSourceConfig(), components, {"a": 1, "b": 1})
    records = list(itertools.islice(mixture, 60))
    assert len(records) == 60
    state = mixture.get_state()
    again = MixtureSource(
        ArrayRecordSourceConfig(),
        {"a": windowed(uneven, 16), "b": windowed(single_file, 8)},
        {"a": 1, "b": 1},
    )
    again.set_state(state)
    assert int(next(iter(again))["id"]) == int(next(iter(mixture))["id"])
    changed = {"a": windowed(uneven, 8), "b": windowed(single_file, 8)}
    with pytest.raises(StateMismatchError, match="shuffle_window"):
        MixtureSource(ArrayRecordSourceConfig(), changed, {"a": 1, "b": 1}).set_state(state)
