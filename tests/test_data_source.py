"""DataSourceModule: Grain data sources (ArrayRecord, shared memory, range) with resumax order,
resume, workers, a content fingerprint, typed errors and context managers."""

from __future__ import annotations

import glob
import os
import shutil
import threading

import numpy as np
import pytest
from grain.sources import ArrayRecordDataSource, RangeDataSource, SharedMemoryDataSource

import resumax
from resumax import (
    ArrayRecordSourceConfig,
    ArrayRecordSourceModule,
    ConfigError,
    DataSourceError,
    DataSourceModule,
    Pipeline,
    RecordDecodeError,
    StateMismatchError,
)
from tests.conftest import assert_batches_equal, batches_and_state, make_examples, take

SHUFFLED = ArrayRecordSourceConfig(seed=7, shuffle_files=True)


def encoded_examples(count: int, offset: int = 0) -> list[bytes]:
    """Records whose bytes end in a non-zero byte: a ShareableList strips trailing zero bytes."""
    return [
        resumax.encode(
            {
                "id": np.int64(i + offset),
                "feature": np.full((3,), i + offset, np.float32),
                "tag": b"r%d" % (i + offset),
            }
        )
        for i in range(count)
    ]


@pytest.fixture
def grain_array_record(shards):
    return ArrayRecordDataSource(sorted(glob.glob(shards)))


@pytest.fixture
def shared_memory():
    data_source = SharedMemoryDataSource(encoded_examples(60))
    yield data_source
    data_source.close()
    data_source.unlink()


def batches_of(data_source, count, *, skip=0, state=None, **options):
    """`count` batches of 8 from a shuffled pipeline over the data source (after `skip`)."""
    source = DataSourceModule(SHUFFLED, data_source, decode=resumax.decode)
    pipeline = Pipeline(source, batch_size=8, rngs=1, **options)
    return batches_and_state(pipeline, count, state, skip)


def test_grain_array_record_source_gives_the_same_records_as_our_reader(shards):
    ours = ArrayRecordSourceModule(ArrayRecordSourceConfig(), shards)
    grain_source = ArrayRecordDataSource(ours.paths)
    theirs = DataSourceModule(ArrayRecordSourceConfig(), grain_source, decode=resumax.decode)
    assert len(theirs) == len(ours) == 100
    for index in range(len(ours)):
        want, got = ours[index], theirs[index]
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_shared_memory_source_gives_the_same_records_as_our_reader(tmp_path, shared_memory):
    resumax.write_array_record(tmp_path / "same.array_record", encoded_examples(60))
    ours = ArrayRecordSourceModule(ArrayRecordSourceConfig(), tmp_path / "same.array_record")
    theirs = DataSourceModule(ArrayRecordSourceConfig(), shared_memory, decode=resumax.decode)
    assert [theirs[i]["tag"] for i in range(60)] == [ours[i]["tag"] for i in range(60)]
    np.testing.assert_array_equal(theirs[59]["feature"], ours[59]["feature"])


@pytest.mark.parametrize("kind", ["array_record", "shared_memory"])
def test_resume_mid_epoch_gives_identical_batches(kind, grain_array_record, shared_memory):
    data_source = grain_array_record if kind == "array_record" else shared_memory
    uninterrupted, _ = batches_of(data_source, 10)
    first, state = batches_of(data_source, 4)
    rest, _ = batches_of(data_source, 6, state=state)
    assert_batches_equal(first + rest, uninterrupted)
    assert state["source"]["current_index"] == 32


@pytest.mark.parametrize("kind", ["array_record", "shared_memory"])
def test_two_workers_give_the_same_batches_as_none(kind, grain_array_record, shared_memory):
    data_source = grain_array_record if kind == "array_record" else shared_memory
    in_process, _ = batches_of(data_source, 9)
    with_workers, _ = batches_of(data_source, 9, num_workers=2, prefetch=2)
    assert_batches_equal(with_workers, in_process)


def test_moved_files_still_resume(tmp_path):
    first_home, second_home = tmp_path / "a", tmp_path / "b"
    paths = resumax.write_shards(first_home / "train", make_examples(40), num_shards=2)
    uninterrupted, _ = batches_of(ArrayRecordDataSource(paths), 5)
    first, state = batches_of(ArrayRecordDataSource(paths), 2)
    shutil.move(first_home, second_home)
    moved = [str(second_home / os.path.basename(path)) for path in paths]
    rest, _ = batches_of(ArrayRecordDataSource(moved), 3, state=state)
    assert_batches_equal(first + rest, uninterrupted)


def test_another_dataset_of_the_same_length_is_refused(tmp_path):
    one = resumax.write_shards(tmp_path / "one", make_examples(40), num_shards=1)
    other_examples = [{**example, "id": example["id"] + 1} for example in make_examples(40)]
    other = resumax.write_shards(tmp_path / "other", other_examples, num_shards=1)
    _, state = batches_of(ArrayRecordDataSource(one), 2)
    with pytest.raises(StateMismatchError, match="fingerprint"):
        batches_of(ArrayRecordDataSource(other), 1, state=state)


def test_the_fingerprint_hashes_item_contents_of_any_common_type():
    from PIL import Image

    def rows(offset):
        return [
            {"image": Image.fromarray(np.full((2, 2), i + offset, np.uint8)), "text": "t", "n": i}
            for i in range(20)
        ]

    def fingerprint(items):
        return DataSourceModule(ArrayRecordSourceConfig(), items).fingerprint

    assert fingerprint(rows(0)) == fingerprint(rows(0))
    assert fingerprint(rows(0)) != fingerprint(rows(1))
    assert fingerprint([b"a"] * 20) != fingerprint(["a"] * 20)
    with pytest.raises(ConfigError, match="memory address"):
        fingerprint([object()] * 3)


def test_a_range_data_source_with_a_map_batches_its_integers():
    source = DataSourceModule(ArrayRecordSourceConfig(num_epochs=1), RangeDataSource(0, 10, 1))
    pipeline = Pipeline(source, stages=[lambda i: {"x": np.int64(i)}], batch_size=4)
    assert [batch["x"].tolist() for batch in pipeline] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_data_source_that_does_not_pickle_is_refused_for_workers():
    class Unpicklable(list):
        lock = threading.Lock()

        def __reduce__(self):
            raise TypeError("cannot pickle a lock")

    source = DataSourceModule(ArrayRecordSourceConfig(), Unpicklable(range(10)))
    with pytest.raises(ConfigError, match="cannot be sent to worker processes.*num_workers=0"):
        Pipeline(source, batch_size=2, num_workers=2)
    (batch,) = take(Pipeline(source, batch_size=2, stages=[lambda i: {"i": i}]), 1)
    assert batch["i"].tolist() == [0, 1]


class FailsAtSeven:
    def __len__(self):
        return 10

    def __getitem__(self, index):
        if index == 7:
            raise OSError("disk error")
        return b"\x80"  # an empty msgpack map: {}


def test_read_and_decode_errors_name_the_record():
    with pytest.raises(DataSourceError, match="record 7.*disk error"):
        DataSourceModule(ArrayRecordSourceConfig(), FailsAtSeven()).read_records([3, 7])
    source = DataSourceModule(ArrayRecordSourceConfig(), [b"\x80", b"junk"], decode=resumax.decode)
    assert source[0] == {}
    with pytest.raises(RecordDecodeError, match="record 1 "):
        source.read_records([0, 1])


def test_a_closed_source_says_it_is_closed(grain_array_record):
    with DataSourceModule(ArrayRecordSourceConfig(), grain_array_record) as source:
        assert isinstance(source[0], bytes)
    with pytest.raises(DataSourceError, match="closed"):
        source[0]


def test_a_pipeline_context_closes_its_workers_and_source(shards):
    with Pipeline(ArrayRecordSourceModule(SHUFFLED, shards), batch_size=4, num_workers=2) as p:
        iterator = iter(p)
        take(iterator, 2)
        pids = iterator.worker_pids
    assert len(pids) == 2
    assert take(iterator, 1) == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(DataSourceError, match="closed"):
        p.source[0]
    with pytest.raises(DataSourceError, match="closed"):
        iter(p)


def test_a_missing_data_file_is_also_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError) as raised:
        ArrayRecordSourceModule(ArrayRecordSourceConfig(), tmp_path / "missing.array_record")
    assert isinstance(raised.value, DataSourceError)
    assert "missing.array_record" in str(raised.value)


def test_orbax_checkpoint_and_process_slices_work_as_for_our_reader(tmp_path, grain_array_record):
    import orbax.checkpoint as ocp

    from resumax.checkpoint import CheckpointRestore, CheckpointSave

    def pipeline(**options):
        source = DataSourceModule(SHUFFLED, grain_array_record, decode=resumax.decode)
        return Pipeline(source, **{"batch_size": 8} | options)

    uninterrupted, _ = batches_of(grain_array_record, 5)
    saved = pipeline()
    first = take(saved, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(2, args=ocp.args.Composite(data=CheckpointSave(saved)))
    resumed = pipeline()
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(2, args=ocp.args.Composite(data=CheckpointRestore(resumed)))
    assert_batches_equal(first + take(resumed, 3), uninterrupted)

    halves = [take(pipeline(batch_size=4, process_index=i, process_count=2), 2) for i in (0, 1)]
    for step in range(2):
        ids = np.concatenate([halves[0][step]["id"], halves[1][step]["id"]])
        np.testing.assert_array_equal(ids, uninterrupted[step]["id"])
