"""ArrayRecordSourceModule: paths, config validation, reading, epochs, state and bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from flax import nnx

import resumax
from resumax import ArrayRecordSourceConfig, ArrayRecordSourceModule
from resumax.errors import ConfigError, DataSourceError, RecordDecodeError, StateMismatchError
from tests.conftest import make_examples


def ids(records) -> list[int]:
    return [int(r["id"]) for r in records]


def source_of(paths, **config) -> ArrayRecordSourceModule:
    return ArrayRecordSourceModule(ArrayRecordSourceConfig(**config), paths, rngs=nnx.Rngs(0))


def test_config_defaults_match_the_reference():
    config = ArrayRecordSourceConfig()
    assert (config.seed, config.num_epochs, config.shuffle_files) == (42, -1, False)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"num_epochs": 0}, "num_epochs=0"),
        ({"num_epochs": -2}, "num_epochs=-2"),
        ({"num_epochs": 1.5}, "1.5"),
        ({"seed": -1}, "seed=-1"),
        ({"seed": "42"}, "'42'"),
        ({"seed": True}, "True"),
        ({"shuffle_files": 1}, "shuffle_files"),
    ],
)
def test_invalid_config_values_raise_config_error_naming_them(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ArrayRecordSourceConfig(**kwargs)


def test_single_file_glob_and_list_read_the_same_records(shards, tmp_path):
    paths = sorted(str(p) for p in tmp_path.glob("train-*.array_record"))
    by_glob = source_of(shards)
    by_list = source_of(paths[::-1])
    assert by_glob.paths == paths
    assert len(by_glob) == len(by_list) == 100
    assert ids(by_glob[i] for i in range(100)) == list(range(100))
    assert int(by_list[0]["id"]) == 66
    single = source_of(paths[0])
    assert len(single) == 33


def test_getitem_returns_the_decoded_record(single_file):
    source = source_of(single_file)
    record = source[7]
    assert int(record["id"]) == 7
    assert record["image"].shape == (4, 4, 3)
    assert int(source[-1]["id"]) == 49
    with pytest.raises(IndexError):
        source[50]


def test_iteration_covers_num_epochs_then_stops(shards):
    source = source_of(shards, num_epochs=2)
    assert ids(source) == list(range(100)) * 2
    assert ids(source) == []


def test_each_shuffled_epoch_is_a_different_permutation_of_all_records(shards):
    source = source_of(shards, num_epochs=3, shuffle_files=True)
    seen = ids(source)
    epochs = [seen[i * 100 : (i + 1) * 100] for i in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(100))
    assert epochs[0] != epochs[1] != epochs[2]
    again = ids(source_of(shards, num_epochs=3, shuffle_files=True))
    assert again == seen
    other_seed = ids(source_of(shards, num_epochs=1, shuffle_files=True, seed=7))
    assert other_seed != epochs[0]


def test_infinite_source_keeps_going_across_epochs(single_file):
    source = source_of(single_file)
    taken = [int(r["id"]) for _, r in zip(range(175), source, strict=False)]
    assert taken == (list(range(50)) * 4)[:175]
    assert source.get_state()["current_epoch"] == 3


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("consumed", [0, 37, 99, 100, 101, 250])
def test_set_state_resumes_iteration_exactly(shards, shuffle, consumed):
    reference = ids(source_of(shards, num_epochs=4, shuffle_files=shuffle))
    first = source_of(shards, num_epochs=4, shuffle_files=shuffle)
    head = [int(r["id"]) for _, r in zip(range(consumed), first, strict=False)]
    state = json.loads(json.dumps(first.get_state()))
    resumed = source_of(shards, num_epochs=4, shuffle_files=shuffle)
    resumed.set_state(state)
    assert head + ids(resumed) == reference


def test_state_is_small_and_the_same_size_for_any_dataset(tmp_path):
    resumax.write_array_record(tmp_path / "small.array_record", [b"x"] * 1_000)
    resumax.write_array_record(tmp_path / "large.array_record", [b"x"] * 1_000_000)
    sizes = []
    for name in ("small", "large"):
        source = source_of(str(tmp_path / f"{name}.array_record"), shuffle_files=True)
        source.seek(123_456, 999)
        state = source.get_state()
        # Only the digits of num_records may differ: nothing in the state grows with the data.
        sizes.append(len(json.dumps(state)) - len(str(state["num_records"])))
    assert sizes[0] == sizes[1]
    assert sizes[1] + len("1000000") < 1024


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("fingerprint", "0000000000000000"),
        ("seed", 43),
        ("shuffle", False),
        ("num_records", 99),
        ("version", 2),
    ],
)
def test_state_of_another_dataset_or_config_raises_naming_the_field(shards, field, value):
    source = source_of(shards, shuffle_files=True)
    state = {**source.get_state(), field: value}
    with pytest.raises(StateMismatchError, match=f"'{field}'"):
        source.set_state(state)


def test_state_from_other_files_is_refused(shards, tmp_path):
    resumax.write_array_record(tmp_path / "other.array_record", make_examples(100))
    state = source_of(str(tmp_path / "other.array_record")).get_state()
    with pytest.raises(StateMismatchError, match="'fingerprint'"):
        source_of(shards).set_state(state)


def test_moved_files_keep_their_fingerprint(shards, tmp_path):
    state = source_of(shards).get_state()
    moved = tmp_path / "moved"
    moved.mkdir()
    for path in tmp_path.glob("train-*.array_record"):
        os.rename(path, moved / path.name)
    source_of(str(moved / "train-*.array_record")).set_state(state)


@pytest.mark.parametrize(
    ("state_update", "fragment"),
    [
        ({"current_index": 101}, "current_index"),
        ({"current_index": -1}, "current_index"),
        ({"current_epoch": "3"}, "current_epoch"),
        ({"current_epoch": 5}, "num_epochs=2"),
    ],
)
def test_out_of_range_positions_are_refused(shards, state_update, fragment):
    source = source_of(shards, num_epochs=2)
    with pytest.raises(StateMismatchError, match=fragment):
        source.set_state({**source.get_state(), **state_update})


def test_missing_state_fields_are_named(shards):
    source = source_of(shards)
    state = source.get_state()
    del state["seed"]
    with pytest.raises(StateMismatchError, match="seed"):
        source.set_state(state)


def test_missing_file_raises_data_source_error_naming_it(tmp_path):
    missing = str(tmp_path / "nope.array_record")
    with pytest.raises(DataSourceError, match="nope.array_record"):
        source_of(missing)


def test_empty_glob_raises_naming_the_pattern(tmp_path):
    with pytest.raises(DataSourceError, match=r"train-\*"):
        source_of(str(tmp_path / "train-*.array_record"))


def test_directory_raises_naming_it(tmp_path):
    with pytest.raises(DataSourceError, match="is a directory"):
        source_of(str(tmp_path))


def test_zero_length_file_raises_naming_it(tmp_path):
    path = tmp_path / "empty.array_record"
    path.write_bytes(b"")
    with pytest.raises(DataSourceError, match="empty.array_record"):
        source_of(str(path))


def test_corrupt_file_raises_naming_it(tmp_path, single_file):
    garbage = tmp_path / "garbage.array_record"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(DataSourceError, match="garbage.array_record"):
        source_of(str(garbage))
    truncated = tmp_path / "truncated.array_record"
    with open(single_file, "rb") as file:
        data = file.read()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataSourceError, match="truncated.array_record"):
        source_of(str(truncated))


def test_file_with_no_records_raises(tmp_path):
    resumax.write_array_record(tmp_path / "none.array_record", [])
    with pytest.raises(DataSourceError, match="no records"):
        source_of(str(tmp_path / "none.array_record"))


def test_undecodable_record_names_file_and_index(tmp_path):
    good = [resumax.encode({"id": np.int64(i)}) for i in range(5)]
    resumax.write_array_record(tmp_path / "mixed.array_record", good[:3] + [b"\xc1junk"] + good[3:])
    source = source_of(str(tmp_path / "mixed.array_record"))
    assert int(source[2]["id"]) == 2
    with pytest.raises(RecordDecodeError, match=r"record 3 of .*mixed.array_record"):
        list(source)


def test_custom_decode_is_used(single_file):
    source = ArrayRecordSourceModule(
        ArrayRecordSourceConfig(), single_file, rngs=nnx.Rngs(0), decode=lambda raw: len(raw)
    )
    assert isinstance(source[0], int)


def test_position_lives_in_nnx_variables(shards):
    source = source_of(shards)
    source.seek(2, 5)
    state = nnx.state(source)
    assert state["current_epoch"].get_value() == 2
    assert state["current_index"].get_value() == 5
    np.testing.assert_equal(source.get_state()["current_index"], 5)
