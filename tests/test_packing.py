"""PackSequences: token records packed into rows, identical for any workers / prefetch, and an
O(1) state (window, rows delivered) that resumes exactly, also with another process count."""

from __future__ import annotations

import json

import numpy as np
import pytest

import resumax
from resumax import (
    ArrayRecordSourceConfig,
    ArrayRecordSourceModule,
    BatchMap,
    Filter,
    PackSequences,
    Pipeline,
    RandomMap,
)
from resumax.errors import ConfigError, StageError, StateMismatchError
from tests.conftest import assert_batches_equal, take

LENGTH = 16
NUM_RECORDS = 120


def token_records(count: int = NUM_RECORDS) -> list[dict]:
    """Record i holds tokens 1000*i + 1 ... (all distinct across records), lengths 1..40."""
    lengths = np.random.default_rng(7).integers(1, 41, size=count)
    return [
        {"tokens": np.arange(1000 * i + 1, 1000 * i + 1 + n, dtype=np.int32), "id": np.int64(i)}
        for i, n in enumerate(lengths)
    ]


@pytest.fixture
def token_shards(tmp_path):
    resumax.write_shards(tmp_path / "tokens", token_records(), num_shards=3)
    return str(tmp_path / "tokens-*.array_record")


def drop_multiples_of_seven(example):
    return int(example["id"]) % 7 != 0


def reverse_some(example, rng):
    if rng.random() < 0.5:
        return {**example, "tokens": example["tokens"][::-1].copy()}
    return example


def packed(paths, *, batch_size=4, num_epochs=-1, window=10, long="split", stages=(), **kwargs):
    config = ArrayRecordSourceConfig(seed=3, num_epochs=num_epochs, shuffle_files=True)
    return Pipeline(
        ArrayRecordSourceModule(config, paths),
        [*stages, PackSequences(LENGTH, ["tokens"], window=window, long=long)],
        batch_size=batch_size,
        rngs=5,
        **kwargs,
    )


def segments_of(batch):
    """Per (row, segment id): the tokens and positions of that segment."""
    out = []
    for tokens, ids, positions in zip(
        batch["tokens"], batch["tokens_segment_ids"], batch["tokens_positions"], strict=True
    ):
        for segment in range(1, ids.max() + 1):
            where = ids == segment
            out.append((tokens[where], positions[where], np.flatnonzero(where)))
    return out


def test_split_mode_delivers_every_token_of_every_record_exactly_once(token_shards):
    batches = list(packed(token_shards, num_epochs=1, prefetch=0))
    assert set(batches[0]) == {"tokens", "tokens_segment_ids", "tokens_positions"}
    delivered = np.concatenate([b["tokens"][b["tokens_segment_ids"] > 0] for b in batches])
    expected = np.concatenate([r["tokens"] for r in token_records()])
    np.testing.assert_array_equal(np.sort(delivered), np.sort(expected))
    for batch in batches:
        assert batch["tokens"].shape[1] == LENGTH and batch["tokens"].dtype == np.int32
        padding = batch["tokens_segment_ids"] == 0
        assert (batch["tokens"][padding] == 0).all() and (
            batch["tokens_positions"][padding] == 0
        ).all()


def test_segment_ids_and_positions_describe_each_packed_record(token_shards):
    batches = list(packed(token_shards, num_epochs=1, prefetch=0))
    pieces = 0
    for batch in batches:
        for row_ids in batch["tokens_segment_ids"]:
            real = row_ids[row_ids > 0]
            # Segments are numbered 1, 2, ... in the order they sit in the row, each contiguous.
            assert (np.diff(real) >= 0).all() and (
                np.unique(real) == np.arange(1, real.max() + 1)
            ).all()
        for tokens, positions, columns in segments_of(batch):
            pieces += 1
            assert (np.diff(columns) == 1).all()
            np.testing.assert_array_equal(positions, np.arange(len(tokens)))
            # A piece is consecutive tokens of one record; a split piece starts at k * LENGTH.
            assert (np.diff(tokens) == 1).all()
            assert (tokens[0] - 1) % 1000 % LENGTH == 0
    assert pieces == sum(-(-len(r["tokens"]) // LENGTH) for r in token_records())


def test_truncate_mode_keeps_the_first_length_tokens_of_each_record(token_shards):
    batches = list(packed(token_shards, num_epochs=1, long="truncate", prefetch=0))
    delivered = np.concatenate([b["tokens"][b["tokens_segment_ids"] > 0] for b in batches])
    expected = np.concatenate([r["tokens"][:LENGTH] for r in token_records()])
    np.testing.assert_array_equal(np.sort(delivered), np.sort(expected))


@pytest.mark.parametrize(("num_workers", "prefetch"), [(0, 2), (2, 0), (2, 2)])
def test_rows_are_identical_for_any_workers_and_prefetch_with_filter_and_random_map(
    token_shards, num_workers, prefetch
):
    stages = [Filter(drop_multiples_of_seven), RandomMap(reverse_some)]
    reference = take(packed(token_shards, stages=stages, prefetch=0), 40)
    pipeline = packed(token_shards, stages=stages, num_workers=num_workers, prefetch=prefetch)
    assert_batches_equal(take(pipeline, 40), reference)
    assert pipeline.get_state()["packing"]["window_index"] > NUM_RECORDS // 10  # past an epoch


def test_resume_mid_window_gives_identical_rows(token_shards):
    reference = take(packed(token_shards), 30)
    first = packed(token_shards)
    take(first, 7)
    state = json.loads(json.dumps(first.get_state()))
    assert state["packing"]["rows_delivered"] > 0  # stopped inside a window
    assert state["source"]["current_index"] % 10 == 0  # the source sits at that window's start
    resumed = packed(token_shards, num_workers=1)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 23), reference[7:])


def test_state_is_the_same_small_dict_whatever_was_read(token_shards):
    pipeline = packed(token_shards)
    take(pipeline, 50)
    packing = pipeline.get_state()["packing"]
    assert set(packing) == {"length", "fields", "window", "long", "window_index", "rows_delivered"}
    assert len(json.dumps(pipeline.get_state())) < 600


@pytest.mark.parametrize(("saved_with", "resumed_with"), [(2, 1), (1, 2)])
def test_resume_with_another_process_count_is_exact(token_shards, saved_with, resumed_with):
    def processes(count):
        return [
            packed(token_shards, batch_size=8 // count, process_index=i, process_count=count)
            for i in range(count)
        ]

    def global_batches(pipelines, steps):
        per_process = [take(p, steps) for p in pipelines]
        return [
            {k: np.concatenate([b[k] for b in step]) for k in step[0]}
            for step in zip(*per_process, strict=True)
        ]

    reference = take(packed(token_shards, batch_size=8), 20)
    before = processes(saved_with)
    assert_batches_equal(global_batches(before, 9), reference[:9])
    states = [p.get_state() for p in before]
    assert all(s["packing"] == states[0]["packing"] for s in states)
    after = processes(resumed_with)
    for pipeline in after:
        pipeline.set_state(json.loads(json.dumps(states[0])))
    assert_batches_equal(global_batches(after, 11), reference[9:])


def test_filter_before_packing_gives_deterministic_rows(token_shards):
    stages = [Filter(drop_multiples_of_seven)]
    once = list(packed(token_shards, stages=stages, num_epochs=1, prefetch=0))
    again = list(packed(token_shards, stages=stages, num_epochs=1, num_workers=2))
    assert_batches_equal(again, once)
    delivered = np.concatenate([b["tokens"][b["tokens_segment_ids"] > 0] for b in once])
    assert ((delivered - 1) // 1000 % 7 != 0).all()


def test_finite_run_ends_with_a_partial_batch_and_resumes_at_the_end(token_shards):
    pipeline = packed(token_shards, num_epochs=1, prefetch=0)
    batches = list(pipeline)
    rows = sum(len(b["tokens"]) for b in batches)
    assert 0 < len(batches[-1]["tokens"]) <= 4 and rows > NUM_RECORDS * 20 / LENGTH * 0.9
    state = pipeline.get_state()
    again = packed(token_shards, num_epochs=1)
    again.set_state(state)
    assert list(again) == []


def test_pack_sequences_must_be_the_last_stage(token_shards):
    source = ArrayRecordSourceModule(ArrayRecordSourceConfig(), token_shards)
    with pytest.raises(ConfigError, match=r"stage 0 \(PackSequences\) must be the last stage"):
        Pipeline(source, [PackSequences(LENGTH, ["tokens"]), drop_multiples_of_seven])
    with pytest.raises(ConfigError, match="PackSequences must be the last stage"):
        Pipeline(source, [BatchMap(dict), PackSequences(LENGTH, ["tokens"])])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"length": 0}, "length must be a positive int"),
        ({"window": -1}, "window must be a positive int"),
        ({"fields": []}, "fields must be a non-empty list"),
        ({"long": "wrap"}, "long must be one of"),
    ],
)
def test_bad_pack_settings_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PackSequences(**{"length": 8, "fields": ["tokens"], **kwargs})


def test_a_missing_or_non_integer_field_names_the_field_and_record(token_shards):
    source = ArrayRecordSourceModule(ArrayRecordSourceConfig(), token_shards)
    with pytest.raises(StageError, match=r"field 'text' of the record at position 0 is missing"):
        next(iter(Pipeline(source, [PackSequences(LENGTH, ["text"])], prefetch=0)))


def test_state_saved_with_other_packing_settings_is_refused(token_shards):
    first = packed(token_shards)
    take(first, 3)
    state = first.get_state()
    with pytest.raises(StateMismatchError, match=r"'packing.window' is 10"):
        packed(token_shards, window=20).set_state(state)
    unpacked = Pipeline(
        ArrayRecordSourceModule(ArrayRecordSourceConfig(seed=3, shuffle_files=True), token_shards),
        batch_size=4,
        rngs=5,
    )
    with pytest.raises(StateMismatchError, match="'packing' entry"):
        unpacked.set_state(state)
    with pytest.raises(StateMismatchError, match="no 'packing' entry"):
        packed(token_shards).set_state(unpacked.get_state() | {"source": state["source"]})


def mixture_pipeline(weights, **kwargs):
    records = token_records()
    corpus = ArrayRecordSourceConfig(seed=1, shuffle_files=True)
    sources = {
        "even": resumax.MemorySource(corpus, records[0::2], name="even"),
        "odd": resumax.MemorySource(corpus, records[1::2], name="odd"),
    }
    mixture = resumax.MixtureSource(ArrayRecordSourceConfig(seed=2), sources, weights)
    return Pipeline(
        mixture, [PackSequences(LENGTH, ["tokens"], window=10)], batch_size=4, rngs=5, **kwargs
    )


def test_packed_mixture_resumes_exactly_with_workers():
    reference = take(mixture_pipeline({"even": 1, "odd": 3}, prefetch=0), 25)
    first = mixture_pipeline({"even": 1, "odd": 3})
    take(first, 10)
    state = json.loads(json.dumps(first.get_state()))
    assert state["packing"]["rows_delivered"] > 0
    resumed = mixture_pipeline({"even": 1, "odd": 3}, num_workers=2)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 15), reference[10:])


def test_reweighted_mixture_resumes_only_at_a_window_boundary():
    first = mixture_pipeline({"even": 1, "odd": 1}, prefetch=0)
    take(first, 1)
    state = first.get_state()
    assert state["packing"]["rows_delivered"] > 0
    with pytest.raises(StateMismatchError, match="re-pack that window from other records"):
        mixture_pipeline({"even": 1, "odd": 3}).set_state(state)
    while first.get_state()["packing"]["rows_delivered"]:
        take(first, 1)
    at_boundary = mixture_pipeline({"even": 1, "odd": 3})
    at_boundary.set_state(first.get_state())
    assert len(take(at_boundary, 3)) == 3
