"""Which files a source reads and how it knows them: literal paths, content fingerprints, shard
indexes (and TFDS shard lengths), and workers that must open the very files the parent saw."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest

import resumax
from resumax import cli
from resumax.errors import ConfigError, DataSourceError, StateMismatchError
from resumax.pipeline import Pipeline
from resumax.sources import ArrayRecordSourceConfig, ArrayRecordSourceModule
from resumax.sources.base import fingerprint
from tests.conftest import assert_batches_equal, make_examples, take


def source_of(paths, **config) -> ArrayRecordSourceModule:
    return ArrayRecordSourceModule(ArrayRecordSourceConfig(**config), paths)


def shuffled_source_of(paths, seed: int) -> ArrayRecordSourceModule:
    return source_of(paths, seed=seed, shuffle_files=True)


def ids_of(source) -> list[int]:
    return [int(source[i]["id"]) for i in range(len(source))]


def offset_examples(count: int, offset: int) -> list[dict]:
    """Records like make_examples but with ids offset: other content, same layout and count."""
    return make_examples(count + offset)[offset:]


# Literal paths ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_literal_paths_with_glob_characters_read_that_directory_with_any_worker_count(tmp_path):
    paths = resumax.write_shards(tmp_path / "run[1]" / "train", make_examples(40), num_shards=2)
    resumax.write_shards(tmp_path / "run1" / "train", offset_examples(40, 1000), num_shards=2)
    assert "[1]" in paths[0]

    assert ids_of(source_of(paths)) == list(range(40))
    batches = {}
    for workers in (0, 2):
        source = shuffled_source_of(paths, 3)
        batches[workers] = take(Pipeline(source=source, batch_size=8, num_workers=workers), 5)
    assert_batches_equal(batches[2], batches[0])
    assert sorted(int(i) for batch in batches[0] for i in batch["id"]) == list(range(40))


def test_a_glob_inside_a_literal_directory_with_glob_characters_stays_in_it(tmp_path):
    resumax.write_shards(tmp_path / "run[1]" / "train", make_examples(40), num_shards=2)
    resumax.write_shards(tmp_path / "run1" / "train", offset_examples(40, 1000), num_shards=2)
    assert ids_of(source_of(str(tmp_path / "run[1]" / "train-*.array_record"))) == list(range(40))


def test_bytes_paths_and_globs_are_accepted(tmp_path):
    paths = resumax.write_shards(os.fsencode(tmp_path / "train"), make_examples(30), num_shards=3)
    by_bytes = source_of([os.fsencode(path) for path in paths])
    by_glob = source_of(os.fsencode(tmp_path / "train-*.array_record"))
    assert ids_of(by_bytes) == ids_of(by_glob) == list(range(30))
    assert by_bytes.fingerprint == by_glob.fingerprint


def test_a_glob_never_matches_the_shard_index(tmp_path):
    resumax.write_shards(tmp_path / "train", make_examples(30), num_shards=3)
    assert (tmp_path / "train.index.json").exists()
    assert len(source_of(str(tmp_path / "*")).paths) == 3


# Fingerprint -----------------------------------------------------------------------------------


def test_a_shard_regenerated_with_the_same_name_and_count_is_refused_on_resume(tmp_path):
    resumax.write_shards(tmp_path / "train", make_examples(30), num_shards=3)
    glob = str(tmp_path / "train-*.array_record")
    state = source_of(glob).get_state()
    resumax.write_shards(tmp_path / "train", offset_examples(30, 500), num_shards=3)

    regenerated = source_of(glob)
    assert len(regenerated) == 30
    with pytest.raises(StateMismatchError, match="'fingerprint'"):
        regenerated.set_state(state)


def test_a_state_with_the_older_names_and_counts_fingerprint_resumes_with_a_warning(tmp_path):
    resumax.write_shards(tmp_path / "train", make_examples(30), num_shards=3)
    glob = str(tmp_path / "train-*.array_record")
    source = shuffled_source_of(glob, seed=3)
    source.seek(0, 17)
    names = [f"train-{i:05d}-of-00003.array_record" for i in range(3)]
    older = {**source.get_state(), "fingerprint": fingerprint([(n, 10) for n in names])}

    resumed = shuffled_source_of(glob, seed=3)
    with pytest.warns(UserWarning, match="older fingerprint of file names and record counts"):
        resumed.set_state(older)
    assert resumed.position == (0, 17)
    assert resumed.get_state() == source.get_state()  # the next save has the content fingerprint
    other_counts = {**older, "fingerprint": fingerprint([(n, 11) for n in names])}
    with pytest.raises(StateMismatchError, match="'fingerprint'"):
        shuffled_source_of(glob, seed=3).set_state(other_counts)


def test_one_shard_rewritten_behind_the_index_is_opened_hashed_and_refused(tmp_path):
    paths = resumax.write_shards(tmp_path / "train", make_examples(30), num_shards=3)
    state = source_of(paths).get_state()
    resumax.write_array_record(paths[1], offset_examples(10, 500))

    with pytest.warns(UserWarning, match="train-00001-of-00003.array_record"):
        rewritten = source_of(paths)
    with pytest.raises(StateMismatchError, match="'fingerprint'"):
        rewritten.set_state(state)


def test_a_renamed_directory_resumes_from_its_index_without_opening_a_file(tmp_path):
    resumax.write_shards(tmp_path / "old" / "train", make_examples(30), num_shards=3)
    state = source_of(str(tmp_path / "old" / "train-*.array_record"), seed=7).get_state()
    os.rename(tmp_path / "old", tmp_path / "new")
    moved = source_of(str(tmp_path / "new" / "train-*.array_record"), seed=7)
    moved.set_state(state)
    assert moved._files.pool.num_open == 0
    assert ids_of(moved) == list(range(30))


def test_a_copied_set_takes_its_counts_from_the_index_once_its_contents_match(
    tmp_path, recwarn, caplog
):
    resumax.write_shards(tmp_path / "old" / "train", make_examples(30), num_shards=3)
    state = source_of(str(tmp_path / "old" / "train-*.array_record"), seed=7).get_state()
    shutil.copytree(tmp_path / "old", tmp_path / "copy", copy_function=shutil.copyfile)
    copy = str(tmp_path / "copy" / "train-*.array_record")
    assert (
        os.stat(tmp_path / "copy" / "train.index.json").st_mtime_ns
        != os.stat(tmp_path / "old" / "train.index.json").st_mtime_ns
    )  # copyfile gives the copies new modification times

    with caplog.at_level(logging.INFO, logger="resumax"):
        copied = source_of(copy, seed=7)
    copied.set_state(state)
    assert copied._files.pool.num_open == 0
    assert not [w for w in recwarn if "shard index" in str(w.message)]
    assert "3 file(s) have other modification times" in caplog.text
    assert ids_of(copied) == list(range(30))


def test_a_shard_rewritten_with_the_same_size_but_other_records_is_opened_and_named(tmp_path):
    paths = resumax.write_shards(tmp_path / "train", make_examples(30), num_shards=3)
    size = os.path.getsize(paths[1])
    resumax.write_array_record(paths[1], offset_examples(10, 40))  # ids 40-49: same sizes
    assert os.path.getsize(paths[1]) == size

    with pytest.warns(UserWarning, match="train-00001-of-00003.array_record"):
        rewritten = source_of(paths)
    assert ids_of(rewritten)[10:20] == list(range(40, 50))


def test_the_fingerprint_is_the_same_with_and_without_the_index(tmp_path):
    resumax.write_shards(tmp_path / "train", make_examples(30), num_shards=3)
    glob = str(tmp_path / "train-*.array_record")
    with_index = source_of(glob).fingerprint
    os.remove(tmp_path / "train.index.json")
    assert source_of(glob).fingerprint == with_index


def test_records_appended_to_a_shard_are_a_changed_count_naming_the_file(tmp_path):
    paths = resumax.write_shards(tmp_path / "train", make_examples(30), num_shards=3)
    state = source_of(paths).get_state()
    resumax.write_array_record(paths[2], make_examples(15)[5:] + offset_examples(5, 900))

    with pytest.warns(UserWarning, match="differ from their shard index"):
        grown = source_of(paths)
    with pytest.raises(StateMismatchError, match="'num_records'") as error:
        grown.set_state(state)
    assert "train-00002-of-00003.array_record" in str(error.value)
    assert "it has 15 records" in str(error.value)


# Shard index ----------------------------------------------------------------------------------


def _overwrite_keeping_size_and_mtime(path) -> None:
    """Garbage of the same size and modification time: any open of the file would fail."""
    stat = os.stat(path)
    with open(path, "r+b") as file:
        file.write(b"\xff" * stat.st_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_write_shards_indexes_names_sizes_counts_and_hashes(tmp_path):
    paths = resumax.write_shards(tmp_path / "train", make_examples(10), num_shards=3)
    index = json.loads((tmp_path / "train.index.json").read_text())
    assert index["names"] == [os.path.basename(path) for path in paths]
    assert index["num_records"] == [3, 3, 4]
    assert index["sizes"] == [os.path.getsize(path) for path in paths]
    assert len(set(index["content_hashes"])) == 3


def test_a_source_over_an_indexed_set_opens_no_file_until_it_reads(tmp_path):
    paths = resumax.write_shards(tmp_path / "train", make_examples(30), num_shards=3)
    _overwrite_keeping_size_and_mtime(paths[2])

    source = source_of(str(tmp_path / "train-*.array_record"))
    assert len(source) == 30
    assert int(source[0]["id"]) == 0
    with pytest.raises(DataSourceError, match="train-00002-of-00003.array_record"):
        source[25]


def test_a_source_without_an_index_says_it_opened_the_files(tmp_path, caplog):
    resumax.write_shards(tmp_path / "train", make_examples(30), num_shards=3)
    os.remove(tmp_path / "train.index.json")
    with caplog.at_level(logging.INFO, logger="resumax"):
        assert len(source_of(str(tmp_path / "train-*.array_record"))) == 30
    assert "no shard index describes 3 of 3" in caplog.text


def test_an_unreadable_index_is_named_and_the_files_opened(tmp_path):
    resumax.write_shards(tmp_path / "train", make_examples(30), num_shards=3)
    (tmp_path / "train.index.json").write_text("{not json")
    with pytest.warns(UserWarning, match="train.index.json"):
        assert len(source_of(str(tmp_path / "train-*.array_record"))) == 30


def test_tfds_shard_lengths_give_the_record_counts_without_opening_files(tmp_path):
    data = tmp_path / "digits" / "1.0.0"
    data.mkdir(parents=True)
    resumax.write_array_record(data / "digits-train.array_record-00000-of-00002", [b"a"] * 4)
    resumax.write_array_record(data / "digits-train.array_record-00001-of-00002", [b"b"] * 3)
    info = {"name": "digits", "splits": [{"name": "train", "shardLengths": ["4", "3"]}]}
    (data / "dataset_info.json").write_text(json.dumps(info))
    files = sorted(str(path) for path in data.glob("digits-train.array_record-*"))
    _overwrite_keeping_size_and_mtime(files[1])

    source = ArrayRecordSourceModule(ArrayRecordSourceConfig(), files, decode=bytes)
    assert len(source) == 7
    assert source[3] == b"a"


# Workers and the parent open the same files ---------------------------------------------------


@pytest.mark.slow
def test_workers_refuse_a_file_regenerated_before_they_start(tmp_path):
    paths = resumax.write_shards(tmp_path / "train", make_examples(30), num_shards=3)
    pipeline = Pipeline(source=source_of(paths), batch_size=5, num_workers=2)
    resumax.write_array_record(paths[0], offset_examples(10, 500))

    with pytest.raises(DataSourceError, match="train-00000-of-00003.array_record.*changed"):
        take(pipeline, 2)


def test_a_file_replaced_while_a_pipeline_runs_is_refused_when_reopened(tmp_path):
    paths = resumax.write_shards(tmp_path / "train", make_examples(30), num_shards=3)
    source = ArrayRecordSourceModule(ArrayRecordSourceConfig(), paths, max_open_files=1)
    iterator = iter(Pipeline(source=source, batch_size=5, prefetch=0))
    assert [int(i) for i in next(iterator)["id"]] == [0, 1, 2, 3, 4]
    replacement = tmp_path / "replacement.array_record"
    resumax.write_array_record(replacement, offset_examples(10, 500))
    shutil.move(replacement, paths[0])

    with pytest.raises(DataSourceError, match="train-00000-of-00003.array_record.*changed"):
        take(iterator, 6)


def test_the_pool_keeps_at_most_max_open_files_open(tmp_path):
    resumax.write_shards(tmp_path / "train", make_examples(40), num_shards=8)
    source = ArrayRecordSourceModule(
        ArrayRecordSourceConfig(shuffle_files=True), str(tmp_path / "train-*"), max_open_files=3
    )
    records = source.read_records(np.arange(40)[::-1])
    assert [int(record["id"]) for record in records] == list(range(40))[::-1]
    assert source._files.pool.num_open == 3


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_max_open_files_must_be_a_positive_int(tmp_path, value):
    paths = resumax.write_shards(tmp_path / "train", make_examples(4), num_shards=2)
    with pytest.raises(ConfigError, match="max_open_files"):
        ArrayRecordSourceModule(ArrayRecordSourceConfig(), paths, max_open_files=value)


def test_convert_writes_an_index_beside_its_shards(tmp_path):
    np.savez(tmp_path / "rows.npz", x=np.arange(12, dtype=np.int32), y=np.ones((12, 2)))
    arguments = ["convert", str(tmp_path / "rows.npz"), str(tmp_path / "out"), "--shards", "3"]
    assert cli.main(arguments) == 0
    index = json.loads((tmp_path / "out.index.json").read_text())
    assert index["num_records"] == [4, 4, 4]
    assert len(source_of(str(tmp_path / "out-*.array_record"))) == 12
