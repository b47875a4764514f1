"""The `resumax` command line: convert an .npz into shards, inspect them, report bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import resumax
from resumax import ArrayRecordSourceConfig, ArrayRecordSourceModule, cli


def test_convert_writes_every_row_as_a_record_that_reads_back_exactly(tmp_path, capsys):
    images = np.arange(10 * 4 * 4, dtype=np.uint8).reshape(10, 4, 4)
    labels = np.arange(10, dtype=np.int64) % 3
    np.savez(tmp_path / "data.npz", image=images, label=labels)
    assert (
        cli.main(
            ["convert", str(tmp_path / "data.npz"), str(tmp_path / "out/train"), "--shards", "3"]
        )
        == 0
    )
    assert "wrote 10 records with fields ['image', 'label'] to 3 files" in capsys.readouterr().out
    source = ArrayRecordSourceModule(ArrayRecordSourceConfig(), str(tmp_path / "out/train-*"))
    assert len(source.paths) == 3
    for i in range(10):
        np.testing.assert_array_equal(source[i]["image"], images[i])
        assert source[i]["label"] == labels[i]
        assert source[i]["label"].dtype == np.int64


def test_inspect_prints_files_records_and_fields(tmp_path, capsys):
    np.savez(tmp_path / "data.npz", x=np.zeros((5, 2), np.float32))
    cli.main(["convert", str(tmp_path / "data.npz"), str(tmp_path / "train")])
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "train-*.array_record")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["files"] == 1
    assert summary["records"] == 5
    assert summary["fields"] == {"x": {"dtype": "float32", "shape": [2]}}


def test_convert_refuses_arrays_of_different_lengths(tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", a=np.zeros(3), b=np.zeros(4))
    assert cli.main(["convert", str(tmp_path / "bad.npz"), str(tmp_path / "t")]) == 2
    assert "RecordEncodeError" in capsys.readouterr().err


def test_convert_names_a_missing_or_unreadable_file(tmp_path, capsys):
    assert cli.main(["convert", str(tmp_path / "nope.npz"), str(tmp_path / "t")]) == 2
    assert "nope.npz" in capsys.readouterr().err
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert cli.main(["convert", str(tmp_path / "junk.npz"), str(tmp_path / "t")]) == 2
    assert "junk.npz" in capsys.readouterr().err


def test_inspect_names_an_empty_glob(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "none-*.array_record")]) == 2
    assert "none-*" in capsys.readouterr().err


def test_bad_shard_count_is_an_argument_error(tmp_path):
    with pytest.raises(SystemExit) as exited:
        cli.main(["convert", str(tmp_path / "x.npz"), str(tmp_path / "t"), "--shards", "0"])
    assert exited.value.code == 2


def test_the_command_line_and_the_converter_start_without_jax():
    """`resumax convert` / `index` and a converter's Beam worker import only what they use: the
    package's names load on first use, and JAX and Flax with the pipeline."""
    script = (
        "import sys, resumax, resumax.cli, resumax.convert.local, resumax.records\n"
        "assert resumax.encode is resumax.records.encode\n"
        "print(sorted(m for m in ('jax', 'flax', 'grain') if m in sys.modules))\n"
        "resumax.Pipeline\n"
        "print('jax' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "True"]
    with pytest.raises(AttributeError, match="no attribute 'Pipelin'"):
        resumax.Pipelin  # noqa: B018
