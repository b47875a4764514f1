"""Fast paths of a source's startup and reads over many shards give exactly what the general
paths give: the whole-set check, index columns, the fingerprint, the default pool size."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import resource
import warnings

import numpy as np
import pytest

import resumax
from resumax.errors import DataFileNotFoundError, DataSourceError
from resumax.records import shard_index
from resumax.sources import ArrayRecordSourceConfig, ArrayRecordSourceModule, resolve_paths
from resumax.sources.files.readers import default_max_open_files
from resumax.sources.files.resolve import files_fingerprint, resolve_files
from tests.conftest import make_examples


def test_the_whole_set_check_accepts_only_every_shard_of_one_set_in_order():
    paths = [f"/d/x-{k:05d}-of-00012.array_record" for k in range(12)]
    swapped = paths[:3] + [paths[4], paths[3]] + paths[5:]
    foreign = paths[:5] + ["/d/y-00005-of-00012.array_record"] + paths[6:]
    not_a_number = paths[:5] + ["/d/x-0000a-of-00012.array_record"] + paths[6:]
    assert shard_index.complete_set(paths).total == 12
    for other in (paths[:-1], paths[1:], swapped, foreign, not_a_number, []):
        assert shard_index.complete_set(other) is None
    assert shard_index.complete_set(["/d/é-00000-of-00001.ar"]) is None  # general path instead


def test_files_listed_out_of_shard_order_still_take_their_counts_from_the_index(tmp_path, caplog):
    paths = resumax.write_shards(tmp_path / "train", make_examples(30), num_shards=3)
    listed = [paths[2], paths[0], paths[1]]
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="resumax"):
        warnings.simplefilter("error")
        source = ArrayRecordSourceModule(ArrayRecordSourceConfig(), [str(p) for p in listed])
    assert "opened them" not in caplog.text
    assert [int(source[i]["id"]) for i in range(len(source))] == [*range(20, 30), *range(20)]
    assert source._files.pool.num_open == 3


def test_one_shard_of_a_whole_set_rewritten_is_the_only_one_named_and_opened(tmp_path):
    paths = resumax.write_shards(tmp_path / "train", make_examples(40), num_shards=4)
    resumax.write_array_record(paths[1], make_examples(11)[1:])
    with pytest.warns(UserWarning, match="1 data file") as caught:
        source = ArrayRecordSourceModule(ArrayRecordSourceConfig(), str(tmp_path / "train-*"))
    assert "train-00001-of-00004" in str(caught[0].message)
    assert "train-00000" not in str(caught[0].message)
    assert len(source) == 40


@pytest.mark.parametrize("problem", ["missing", "empty", "directory"])
def test_a_bad_file_among_many_is_named(tmp_path, problem):
    paths = [str(p) for p in resumax.write_shards(tmp_path / "t", make_examples(8), num_shards=8)]
    bad = str(tmp_path / "bad.array_record")
    if problem == "empty":
        open(bad, "wb").close()
    elif problem == "directory":
        os.mkdir(bad)
    expected = DataFileNotFoundError if problem == "missing" else DataSourceError
    with pytest.raises(expected, match="bad.array_record"):
        ArrayRecordSourceModule(ArrayRecordSourceConfig(), [*paths[:4], bad, *paths[4:]])


@pytest.mark.parametrize(
    "names",
    [
        ["a-00000-of-00002.ar", "a-00001-of-00002.ar"],
        ["é.ar"],
        ['q"x'],
        ["b\\x"],
        ["t\tx", "d\x7f"],
        ["undecodable-\udcff.ar"],
    ],
)
def test_the_fingerprint_is_the_sha256_of_the_json_of_names_counts_and_hashes(names):
    counts = list(range(3, 3 + len(names)))
    hashes = [f"size:{count * 7}" for count in counts]
    payload = json.dumps([names, counts, hashes])
    assert (
        files_fingerprint(names, counts, hashes)
        == (hashlib.sha256(payload.encode()).hexdigest()[:16])
    )


def test_the_default_pool_leaves_half_the_open_file_limit_to_the_rest_of_the_process():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = {512: 64, 1024: 128, 2048: 1024, 20_000: 10_000}
    try:
        for limit, pool in wanted.items():
            if hard != resource.RLIM_INFINITY and limit > hard:
                continue
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
            assert default_max_open_files() == pool
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_pool_holding_every_file_reads_what_a_pool_of_one_reads(tmp_path, shuffle):
    resumax.write_shards(tmp_path / "train", make_examples(60), num_shards=12)
    config = ArrayRecordSourceConfig(seed=4, shuffle_files=shuffle)
    pattern = str(tmp_path / "train-*.array_record")
    every = ArrayRecordSourceModule(config, pattern, max_open_files=12)
    one = ArrayRecordSourceModule(config, pattern, max_open_files=1)
    indices = np.random.default_rng(0).permutation(60)
    assert every.read_raw(indices) == one.read_raw(indices)
    assert every._files.pool.num_open == 12 and one._files.pool.num_open == 1


def test_globs_skip_hidden_files_and_indexes_unless_the_pattern_names_them(tmp_path):
    for name in ("a.array_record", ".hidden.array_record", "b.index.json"):
        resumax.write_array_record(tmp_path / name, make_examples(2))
    found = {
        pattern: [os.path.basename(path) for path in resolve_paths(str(tmp_path / pattern))]
        for pattern in ("*", "*.array_record", ".h*", "[.a]*")
    }
    assert found == {
        "*": ["a.array_record"],
        "*.array_record": ["a.array_record"],
        ".h*": [".hidden.array_record"],
        "[.a]*": ["a.array_record"],
    }
    with pytest.raises(DataFileNotFoundError, match="matches no file"):
        resolve_paths(str(tmp_path / "*n"))


def test_an_indexed_set_is_identified_from_its_listing_as_a_stat_would(tmp_path):
    resumax.write_shards(tmp_path / "train", make_examples(30), num_shards=3)
    glob = str(tmp_path / "train-*.array_record")
    listed = resolve_files(glob)
    index_file = tmp_path / "train.index.json"
    index = json.loads(index_file.read_text())
    assert len(index[shard_index.INODES]) == 3
    del index[shard_index.INODES]  # as indexes written before inodes were
    index_file.write_text(json.dumps(index))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stated = resolve_files(glob)
    assert listed.index == str(index_file)  # named if a file differs from it when opened
    assert dataclasses.replace(listed, index=None) == stated


def test_a_shard_rewritten_in_place_behind_the_index_is_refused_naming_it_when_opened(tmp_path):
    paths = resumax.write_shards(tmp_path / "train", make_examples(30), num_shards=3)
    other = tmp_path / "other.array_record"
    resumax.write_array_record(other, make_examples(12))
    with open(paths[1], "r+b") as file:  # same inode, other size and content
        file.truncate(0)
        file.write(other.read_bytes())

    source = ArrayRecordSourceModule(ArrayRecordSourceConfig(), str(tmp_path / "train-*"))
    assert int(source[0]["id"]) == 0
    with pytest.raises(DataSourceError, match="train-00001-of-00003.array_record") as error:
        source[10]
    assert "train.index.json" in str(error.value)
    assert "rewritten in place, after the index was written" in str(error.value)

    os.remove(tmp_path / "train.index.json")  # what the error says to do
    unindexed = ArrayRecordSourceModule(ArrayRecordSourceConfig(), str(tmp_path / "train-*"))
    assert len(unindexed) == 32


def test_a_replaced_shard_is_found_by_its_new_inode_and_named(tmp_path):
    paths = resumax.write_shards(tmp_path / "train", make_examples(30), num_shards=3)
    resumax.write_array_record(paths[2], make_examples(14)[2:])  # written anew, then renamed
    with pytest.warns(UserWarning, match="train-00002-of-00003.array_record"):
        source = ArrayRecordSourceModule(ArrayRecordSourceConfig(), str(tmp_path / "train-*"))
    assert len(source) == 32


def test_many_files_opened_at_once_name_the_first_that_fails_as_one_by_one_opening_would(tmp_path):
    paths = resumax.write_shards(tmp_path / "train", make_examples(40), num_shards=40)
    for bad in (paths[25], paths[5]):
        stat = os.stat(bad)
        with open(bad, "r+b") as file:
            file.write(b"\xff" * stat.st_size)
        os.utime(bad, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    source = ArrayRecordSourceModule(ArrayRecordSourceConfig(), str(tmp_path / "train-*"))
    assert [int(source[i]["id"]) for i in (0, 39)] == [0, 39]
    with pytest.raises(DataSourceError, match="train-00005-of-00040") as error:
        source.read_raw(np.arange(40))
    assert "train-00025" not in str(error.value)
    # As one by one: the files before the failing one stay open (0, 39 and 1-4), no other.
    assert sorted(source._files.pool.open_readers) == [0, 1, 2, 3, 4, 39]
    good = [i for i in range(40) if i not in (5, 25)]
    assert [int(r["id"]) for r in source.read_records(good)] == good
