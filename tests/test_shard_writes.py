"""Writing shard sets all or nothing: encode errors, kills and full disks leave no partial file and
nothing that looks complete; a glob over an incomplete set is refused naming what is missing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import resumax
from resumax.errors import DataSourceError, RecordEncodeError
from resumax.sources import ArrayRecordSourceConfig, ArrayRecordSourceModule
from tests.conftest import make_examples


def source_of(paths) -> ArrayRecordSourceModule:
    return ArrayRecordSourceModule(ArrayRecordSourceConfig(), paths)


def test_an_encode_error_leaves_no_shard_no_partial_and_no_index(tmp_path):
    examples = make_examples(29) + [{"bad": object()}]
    with pytest.raises(RecordEncodeError, match="bad"):
        resumax.write_shards(tmp_path / "train", examples, num_shards=3)
    assert os.listdir(tmp_path) == []


def test_a_failed_rewrite_leaves_the_previous_set_intact(tmp_path):
    resumax.write_shards(tmp_path / "train", make_examples(30), num_shards=3)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    with pytest.raises(RecordEncodeError):
        resumax.write_shards(tmp_path / "train", make_examples(29) + [{"bad": object()}], 3)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    assert len(source_of(str(tmp_path / "train-*.array_record"))) == 30


def test_a_glob_over_an_incomplete_set_names_the_missing_shards(tmp_path):
    paths = resumax.write_shards(tmp_path / "train", make_examples(30), num_shards=3)
    os.remove(paths[1])
    with pytest.raises(DataSourceError, match=r"2 of 3 .*train-00001-of-00003\.array_record"):
        source_of(str(tmp_path / "train-*.array_record"))


def test_a_glob_over_two_sets_with_one_prefix_is_refused(tmp_path):
    resumax.write_shards(tmp_path / "train", make_examples(30), num_shards=3)
    resumax.write_shards(tmp_path / "train", make_examples(30), num_shards=2)
    with pytest.raises(DataSourceError, match=r"mixes shard sets .* of \[2, 3\] shards"):
        source_of(str(tmp_path / "train-*.array_record"))


_SLOW_WRITER = """
    import sys, time
    import numpy as np
    import resumax

    class Slow(list):
        def __getitem__(self, index):
            if index == 25:
                print("writing the last shard", flush=True)
                time.sleep(60)
            return super().__getitem__(index)

    resumax.write_shards(sys.argv[1], Slow({"id": np.int64(i)} for i in range(30)), 3)
"""


@pytest.mark.slow
def test_a_killed_write_leaves_nothing_that_looks_complete(tmp_path):
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_SLOW_WRITER), str(tmp_path / "train")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline() == "writing the last shard\n"
    time.sleep(0.2)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=10)

    assert not [name for name in os.listdir(tmp_path) if not name.endswith(".partial")]
    with pytest.raises(DataSourceError, match="matches no file"):
        source_of(str(tmp_path / "train-*.array_record"))


_FULL_DISK_WRITER = """
    import os, resource, signal, sys
    import numpy as np
    import resumax
    from resumax.errors import DataSourceError

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
    rng = np.random.default_rng(0)
    examples = [{"noise": rng.integers(0, 255, 20_000, dtype=np.uint8)} for _ in range(40)]
    try:
        if sys.argv[2] == "shards":
            resumax.write_shards(sys.argv[1], examples, 2)
        else:
            resumax.write_array_record(sys.argv[1], examples)
    except DataSourceError as error:
        print(f"DataSourceError: {error}")
        sys.exit(3)
"""


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["shards", "one file"])
def test_a_full_disk_removes_the_partial_file_and_names_path_and_cause(tmp_path, writer):
    target = tmp_path / ("train" if writer == "shards" else "one.array_record")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_FULL_DISK_WRITER), str(target), writer],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 3, result.stderr
    assert "File too large" in result.stdout
    assert str(tmp_path) in result.stdout
    assert "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []


def test_written_sets_read_back_exactly(tmp_path):
    paths = resumax.write_shards(tmp_path / "train", make_examples(10), num_shards=4)
    source = source_of(paths)
    assert [int(source[i]["id"]) for i in range(10)] == list(range(10))
    np.testing.assert_array_equal(source[9]["feature"], np.full((3,), 9, dtype=np.float32))
