"""Provenance and skips: `records_of_batch` names exactly the records a batch was made of (plain,
mixture, packing, several processes, after a resume and after a skip), and `skip` jumps ahead in
the stream, kept in the state so that every later resume is exact."""

from __future__ import annotations

import numpy as np
import pytest
from array_record.python import array_record_module

import resumax
from resumax import (
    ArrayRecordSourceConfig,
    ArrayRecordSourceModule,
    Filter,
    MemorySource,
    MixtureSource,
    PackSequences,
    Pipeline,
    RecordRef,
)
from resumax.errors import ConfigError, StateMismatchError
from tests.conftest import assert_batches_equal, make_examples, take
from tests.test_packing import token_records

BATCH = 4


@pytest.fixture(scope="module")
def id_shards(tmp_path_factory):
    """60 records (field "id" = dataset index) over 3 files; returns the glob."""
    directory = tmp_path_factory.mktemp("provenance")
    resumax.write_shards(directory / "train", make_examples(60), num_shards=3)
    return str(directory / "train-*.array_record")


@pytest.fixture(scope="module")
def token_set(tmp_path_factory):
    directory = tmp_path_factory.mktemp("provenance-tokens")
    resumax.write_shards(directory / "tokens", token_records(), num_shards=3)
    return str(directory / "tokens-*.array_record")


def shuffled(paths, **options) -> Pipeline:
    config = ArrayRecordSourceConfig(seed=5, shuffle_files=True)
    return Pipeline(ArrayRecordSourceModule(config, paths), batch_size=BATCH, **options)


def ids_of(refs: list[list[RecordRef]]) -> list[int]:
    return [ref.index for row in refs for ref in row]


def read_at(ref: RecordRef) -> dict:
    """The record at (path, record), read with array_record's own reader."""
    reader = array_record_module.ArrayRecordReader(ref.path)
    try:
        return resumax.decode(reader.read([ref.record])[0])
    finally:
        reader.close()


def test_records_of_batch_names_the_delivered_records_past_and_future_without_reading(
    id_shards,
):
    pipeline = shuffled(id_shards)
    ahead = [pipeline.records_of_batch(n) for n in range(20)]  # 20 batches: across 1 epoch
    batches = take(iter(pipeline), 20)
    behind = [pipeline.records_of_batch(n) for n in range(20)]
    assert ahead == behind
    for batch, refs in zip(batches, ahead, strict=True):
        assert all(len(row) == 1 for row in refs)
        assert ids_of(refs) == batch["id"].tolist()
    first = ahead[0][0][0]
    assert first.position == 0 and first.epoch == 0 and first.source is None
    assert int(read_at(first)["id"]) == first.index
    epoch_one = ahead[15][0][0]
    assert (epoch_one.position, epoch_one.epoch) == (60, 1)
    assert {ref.path for refs in ahead for row in refs for ref in row} == set(
        ArrayRecordSourceModule(ArrayRecordSourceConfig(), id_shards).paths
    )


def test_records_of_batch_after_a_resume_matches_the_uninterrupted_run(id_shards):
    first = shuffled(id_shards)
    take(iter(first), 7)
    resumed = shuffled(id_shards)
    resumed.set_state(first.get_state())
    for n in (0, 3, 6, 7, 12):
        assert resumed.records_of_batch(n) == first.records_of_batch(n)


def test_two_processes_rows_are_their_slices_of_the_global_batch(id_shards):
    pipelines = [shuffled(id_shards, process_index=i, process_count=2) for i in range(2)]
    delivered = [take(iter(p), 5) for p in pipelines]
    for n in range(5):
        global_refs = pipelines[0].records_of_batch(n, all_processes=True)
        assert global_refs == pipelines[1].records_of_batch(n, all_processes=True)
        expected = delivered[0][n]["id"].tolist() + delivered[1][n]["id"].tolist()
        assert ids_of(global_refs) == expected
        assert ids_of(pipelines[1].records_of_batch(n)) == delivered[1][n]["id"].tolist()


def test_skip_delivers_the_batch_that_would_have_come_later_and_keeps_the_numbering(
    id_shards,
):
    plain = take(iter(shuffled(id_shards)), 12)
    pipeline = shuffled(id_shards)
    got = take(iter(pipeline), 3)
    assert pipeline.global_position == 3 * BATCH
    pipeline.skip(2)
    pipeline.skip(3)  # merged with the skip before it
    assert pipeline.global_position == 8 * BATCH
    got += take(iter(pipeline), 4)
    assert_batches_equal(got, plain[:3] + plain[8:12])
    assert pipeline.skips == [
        {"batch": 3, "batches": 5, "positions": [12, 31], "batch_size": BATCH, "process_count": 1}
    ]
    state = pipeline.get_state()
    assert state["batches_emitted"] == 7 and state["skips"] == pipeline.skips
    for n, batch in enumerate(got):
        assert ids_of(pipeline.records_of_batch(n)) == batch["id"].tolist()
    resumed = shuffled(id_shards)
    resumed.set_state(state)
    assert_batches_equal(take(iter(resumed), 2), take(iter(shuffled(id_shards)), 14)[12:])
    assert resumed.records_of_batch(2) == pipeline.records_of_batch(2)
    assert ids_of(resumed.records_of_batch(3)) == plain[8]["id"].tolist()


def test_skip_with_workers_reads_the_same_batches(id_shards):
    expected = take(iter(shuffled(id_shards)), 9)
    pipeline = shuffled(id_shards, num_workers=2)
    got = take(iter(pipeline), 2)
    pipeline.skip(4)
    got += take(iter(pipeline), 3)
    pipeline.close()
    assert_batches_equal(got, expected[:2] + expected[6:9])


def test_elastic_resume_after_a_skip_keeps_the_stream_and_the_numbering(id_shards):
    two = [shuffled(id_shards, process_index=i, process_count=2) for i in range(2)]
    delivered = []
    for pipeline in two:
        take(iter(pipeline), 2)
        pipeline.skip(1)
        delivered.append(take(iter(pipeline), 2))  # batches 2 and 3, global positions 24..39
    one = shuffled(id_shards)
    one.set_state(two[0].get_state())
    plain = take(iter(shuffled(id_shards)), 13)
    assert_batches_equal(take(iter(one), 3), plain[10:13])
    past = one.records_of_batch(3, all_processes=True)
    assert ids_of(past) == delivered[0][1]["id"].tolist() + delivered[1][1]["id"].tolist()
    assert [jump["batches"] for jump in one.skips] == [1, 0]
    assert ids_of(one.records_of_batch(5)) == plain[11]["id"].tolist()


def test_mixture_rows_name_their_component_and_its_own_epoch():
    config = ArrayRecordSourceConfig(seed=3, shuffle_files=True)
    small = [{"id": np.int64(i), "name": np.int64(0)} for i in range(5)]
    large = [{"id": np.int64(i), "name": np.int64(1)} for i in range(40)]
    sources = {
        "small": MemorySource(config, small, name="s"),
        "large": MemorySource(config, large, name="l"),
    }
    pipeline = Pipeline(MixtureSource(config, sources, {"small": 1, "large": 1}), batch_size=BATCH)
    batches = take(iter(pipeline), 6)
    names = ("small", "large")
    for n, batch in enumerate(batches):
        refs = [row[0] for row in pipeline.records_of_batch(n)]
        assert [names[int(v)] for v in batch["name"]] == [ref.source for ref in refs]
        assert batch["id"].tolist() == [ref.index for ref in refs]
        assert all(ref.path is None and ref.record == ref.index for ref in refs)
    small_refs = [r for n in range(6) for row in pipeline.records_of_batch(n) for r in row]
    assert max(r.epoch for r in small_refs if r.source == "small") >= 1  # 5 records cycle


def packed(paths, **options) -> Pipeline:
    config = ArrayRecordSourceConfig(seed=2, shuffle_files=True)
    stages = [PackSequences(16, ["tokens"], window=24)]
    return Pipeline(ArrayRecordSourceModule(config, paths), stages, batch_size=3, **options)


def row_record_ids(batch: dict) -> list[list[int]]:
    """The records of each packed row, in segment order (tokens of record i are 1000*i + k)."""
    rows = []
    for tokens, segments in zip(batch["tokens"], batch["tokens_segment_ids"], strict=True):
        firsts = [np.flatnonzero(segments == s)[0] for s in range(1, segments.max() + 1)]
        rows.append([int(tokens[f]) // 1000 for f in firsts])
    return rows


def test_packed_rows_list_every_record_packed_into_them_before_and_after_a_resume(token_set):
    pipeline = packed(token_set)
    batches = take(iter(pipeline), 8)
    resumed = packed(token_set)
    resumed.set_state(pipeline.get_state())
    for n in (0, 3, 7, 9):
        assert resumed.records_of_batch(n) == pipeline.records_of_batch(n)
    later = take(iter(resumed), 2)
    for n, batch in enumerate(batches + later):
        refs = pipeline.records_of_batch(n)
        assert [[ref.index for ref in row] for row in refs] == row_record_ids(batch)


def test_a_filter_or_a_batch_past_the_end_is_refused_with_a_reason(id_shards):
    config = ArrayRecordSourceConfig(seed=1, num_epochs=1)
    source = ArrayRecordSourceModule(config, id_shards)
    filtered = Pipeline(source, [Filter(lambda r: r["id"] % 2 == 0)], batch_size=BATCH)
    with pytest.raises(ConfigError, match="Filter"):
        filtered.records_of_batch(0)
    with pytest.raises(ConfigError, match="Filter"):
        filtered.skip(1)
    finite = Pipeline(ArrayRecordSourceModule(config, id_shards), batch_size=7)
    assert ids_of(finite.records_of_batch(8)) == [56, 57, 58, 59]  # the last, partial batch
    with pytest.raises(ConfigError, match="past the end"):
        finite.records_of_batch(9)
    with pytest.raises(ConfigError, match="num_batches"):
        finite.skip(-1)


def test_packed_skip_resumes_exactly_and_keeps_the_numbering(token_set):
    plain = take(iter(packed(token_set)), 14)
    pipeline = packed(token_set)
    got = take(iter(pipeline), 2)
    pipeline.skip(5)
    got += take(iter(pipeline), 3)
    assert_batches_equal(got, plain[:2] + plain[7:10])
    [skip] = pipeline.skips
    assert (skip["batch"], skip["batches"]) == (2, 5) and len(skip["rows"]) == 2
    resumed = packed(token_set)
    resumed.set_state(pipeline.get_state())
    assert_batches_equal(take(iter(resumed), 4), plain[10:14])
    for n, batch in enumerate(got):
        refs = resumed.records_of_batch(n)
        assert [[ref.index for ref in row] for row in refs] == row_record_ids(batch)


def test_packed_rows_of_two_processes_are_their_slices_of_the_global_batch(token_set):
    pipelines = [packed(token_set, process_index=i, process_count=2) for i in range(2)]
    delivered = [take(iter(p), 4) for p in pipelines]
    for n in range(4):
        refs = pipelines[1].records_of_batch(n, all_processes=True)
        expected = row_record_ids(delivered[0][n]) + row_record_ids(delivered[1][n])
        assert [[ref.index for ref in row] for row in refs] == expected


def test_a_corrupt_skips_field_is_refused_by_name(id_shards):
    pipeline = shuffled(id_shards)
    take(iter(pipeline), 1)
    pipeline.skip(2)
    state = pipeline.get_state()
    state["skips"][0]["positions"] = [8, "11"]
    with pytest.raises(StateMismatchError, match="'skips'"):
        shuffled(id_shards).set_state(state)
