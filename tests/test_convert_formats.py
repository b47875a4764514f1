"""`resumax convert` on one machine: every input format maps to records as documented, and the
output is cut into shards exactly as `write_shards` cuts the same records."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import resumax
from resumax import ArrayRecordSourceConfig, ArrayRecordSourceModule, cli
from resumax.convert import convert
from resumax.errors import ConfigError, DataSourceError
from tests.convert_inputs import FORMATS, rows, write_imagefolder, write_inputs, write_jsonl


def read_all(paths) -> list[dict]:
    source = ArrayRecordSourceModule(ArrayRecordSourceConfig(), list(paths))
    return [source[i] for i in range(len(source))]


def index_of(prefix) -> dict:
    with open(f"{prefix}.index.json") as file:
        return json.load(file)


@pytest.mark.parametrize("format", FORMATS)
def test_every_format_converts_with_its_format_guessed_from_the_names(tmp_path, format):
    inputs = write_inputs(format, tmp_path / "in")
    done = convert(inputs, str(tmp_path / "out/train"), num_shards=3)
    records = read_all(done.paths)
    assert len(records) == done.num_records == (15 if format == "imagefolder" else 200)
    assert index_of(tmp_path / "out/train")["metadata"]["converted_from"] == format
    if format == "imagefolder":
        return
    for record, row in zip(records, rows(0, 200), strict=True):
        assert int(np.asarray(record["id"]).reshape(())) == row["id"]


def test_jsonl_integers_are_int64_floats_float64_strings_str_and_lists_arrays(tmp_path):
    done = convert(write_jsonl(tmp_path), str(tmp_path / "train"))
    record = read_all(done.paths)[7]
    assert record["id"] == 7 and record["id"].dtype == np.int64
    assert record["score"] == 1.75 and record["score"].dtype == np.float64
    assert record["text"] == "row 7" and isinstance(record["text"], str)
    np.testing.assert_array_equal(record["pair"], np.array([7.0, -7.0]))
    assert record["pair"].dtype == np.float64


def test_csv_cells_are_typed_each_by_what_it_reads_as(tmp_path):
    (tmp_path / "t.csv").write_text('a,b,c\n1,2.5,"x, y"\n-3,1e3,\n'.replace(",\n", ",z\n"))
    done = convert([str(tmp_path / "t.csv")], str(tmp_path / "train"))
    first, second = read_all(done.paths)
    assert first["a"].dtype == np.int64 and first["b"].dtype == np.float64
    assert (first["a"], first["b"], first["c"]) == (1, 2.5, "x, y")
    assert (second["a"], second["b"], second["c"]) == (-3, 1000.0, "z")


def test_parquet_columns_keep_the_width_of_their_type(tmp_path):
    done = convert(write_inputs("parquet", tmp_path / "in"), str(tmp_path / "train"))
    record = read_all(done.paths)[5]
    assert record["id"].dtype == np.int32 and record["pair"].dtype == np.float32
    np.testing.assert_array_equal(record["pair"], np.array([5.0, -5.0], np.float32))


def test_output_is_the_sorted_inputs_cut_exactly_as_write_shards_cuts_them(tmp_path):
    inputs = write_inputs("npz", tmp_path / "in")
    done = convert(list(reversed(inputs)), str(tmp_path / "conv"), num_shards=3)
    columns = [np.load(path) for path in inputs]
    rows_in_order = [
        {"id": arrays["id"][i], "pair": arrays["pair"][i]}
        for arrays in columns
        for i in range(len(arrays["id"]))
    ]
    expected = resumax.write_shards(tmp_path / "plain", rows_in_order, num_shards=3)
    for ours, theirs in zip(done.paths, expected, strict=True):
        assert Path(ours).read_bytes() == Path(theirs).read_bytes()


def test_tfrecord_is_read_without_tensorflow_and_a_features_spec_fixes_shapes(tmp_path):
    inputs = write_inputs("tfrecord", tmp_path / "in")
    spec = {"id": ("int64", ()), "text": ("bytes", ()), "pair": ("float32", (2,))}
    done = convert(inputs, str(tmp_path / "train"), features=spec)
    record = read_all(done.paths)[150]
    assert record["id"] == 150 and record["id"].shape == ()
    assert record["text"] == b"row 150"
    np.testing.assert_array_equal(record["pair"], np.array([150.0, -150.0], np.float32))
    variable = read_all(convert(inputs, str(tmp_path / "var")).paths)[3]
    assert variable["text"].tolist() == [b"row 3"] and variable["id"].shape == (1,)


def test_a_bad_tfrecord_crc_names_the_file_the_record_and_the_crc(tmp_path):
    (path,) = write_inputs("tfrecord", tmp_path / "in")[:1]
    data = bytearray(Path(path).read_bytes())
    data[-10] ^= 0xFF  # inside the last record's data
    Path(path).write_bytes(bytes(data))
    message = r"part-0\.tfrecord, record 99: the data's CRC is 0x"
    with pytest.raises(DataSourceError, match=message):
        convert([path], str(tmp_path / "train"))
    assert not list(tmp_path.glob("train*"))


def test_image_folder_labels_follow_the_sorted_class_names_kept_in_the_index(tmp_path):
    (root,) = write_imagefolder(tmp_path)
    done = convert([root], str(tmp_path / "train"), num_shards=2)
    records = read_all(done.paths)
    assert [int(record["label"]) for record in records] == [0] * 5 + [1] * 5 + [2] * 5
    assert records[6]["image"] == Path(os.path.join(root, "dog", "001.png")).read_bytes()
    assert index_of(tmp_path / "train")["metadata"]["class_names"] == ["cat", "dog", "emu"]
    decoded = read_all(convert([root], str(tmp_path / "px"), decode_images=True).paths)
    assert decoded[6]["image"].dtype == np.uint8 and decoded[6]["image"].shape == (4, 4, 3)
    assert (decoded[6]["image"] == 51).all()


def test_hugging_face_dataset_from_save_to_disk(tmp_path):
    done = convert(write_inputs("hf", tmp_path / "in"), str(tmp_path / "train"), format="hf")
    record = read_all(done.paths)[42]
    assert record["text"] == "row 42" and record["id"].dtype == np.int32


def test_a_malformed_line_is_named_by_file_and_line_and_nothing_is_published(tmp_path, capsys):
    paths = write_jsonl(tmp_path)
    lines = Path(paths[1]).read_text().splitlines()
    lines[40] = '{"id": 140, "text": '
    Path(paths[1]).write_text("\n".join(lines) + "\n")
    prefix = str(tmp_path / "out/train")
    assert cli.main(["convert", *paths, prefix, "--shards", "2", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "part-1.jsonl, line 41: not JSON" in error and "--skip-bad" in error
    assert os.listdir(tmp_path / "out") == []


def test_skip_bad_skips_up_to_n_records_and_lists_them_in_the_index(tmp_path):
    (path,) = write_jsonl(tmp_path, num_files=1)
    lines = Path(path).read_text().splitlines()
    lines[3], lines[8] = "not json", "[1, 2]"
    Path(path).write_text("\n".join(lines) + "\n")
    with pytest.raises(DataSourceError, match="line 9.*more than --skip-bad 1"):
        convert([path], str(tmp_path / "one"), skip_bad=1)
    done = convert([path], str(tmp_path / "two"), skip_bad=2, num_shards=2)
    assert [int(r["id"]) for r in read_all(done.paths)] == [
        i for i in range(100) if i not in (3, 8)
    ]
    skipped = index_of(tmp_path / "two")["metadata"]["skipped"]
    assert [bad["where"] for bad in skipped] == [f"{path}, line 4", f"{path}, line 9"]


def test_a_null_names_its_column_unless_fill_null_replaces_it(tmp_path):
    (tmp_path / "n.jsonl").write_text('{"a": 1, "b": "x"}\n{"a": null, "b": "y"}\n')
    with pytest.raises(DataSourceError, match="line 2: field 'a' is null; give --fill-null"):
        convert([str(tmp_path / "n.jsonl")], str(tmp_path / "t"))
    done = convert([str(tmp_path / "n.jsonl")], str(tmp_path / "t"), fill_null="-1")
    assert [int(r["a"]) for r in read_all(done.paths)] == [1, -1]


def test_parquet_nulls_are_filled_in_the_columns_type(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": pa.array([1, None, 3], pa.int16())}), tmp_path / "n.parquet")
    with pytest.raises(DataSourceError, match=r"n\.parquet, row 1: field 'a' is null"):
        convert([str(tmp_path / "n.parquet")], str(tmp_path / "t"))
    done = convert([str(tmp_path / "n.parquet")], str(tmp_path / "t"), fill_null="0")
    values = [r["a"] for r in read_all(done.paths)]
    assert values == [1, 0, 3] and values[1].dtype == np.int16


def test_fields_keeps_only_the_named_fields_in_that_order(tmp_path):
    for format in ("jsonl", "parquet", "tfrecord"):
        inputs = write_inputs(format, tmp_path / format)
        done = convert(inputs, str(tmp_path / f"{format}-out"), fields=["text", "id"])
        assert list(read_all(done.paths)[0]) == ["text", "id"], format


def test_shard_size_sets_the_number_of_shards_from_the_encoded_bytes(tmp_path):
    inputs = write_jsonl(tmp_path)
    one = convert(inputs, str(tmp_path / "one"))
    total = sum(len(resumax.encode(record)) for record in read_all(one.paths))
    done = convert(inputs, str(tmp_path / "four"), shard_size=total // 4)
    assert len(done.paths) in (4, 5)
    assert index_of(tmp_path / "four")["metadata"]["options"]["shard_size"] == total // 4


def test_an_unknown_format_is_a_config_error_naming_the_inputs(tmp_path):
    (tmp_path / "data.xyz").write_text("?")
    with pytest.raises(ConfigError, match="data.xyz.*--format"):
        convert([str(tmp_path / "data.xyz")], str(tmp_path / "t"))
    with pytest.raises(resumax.DataFileNotFoundError, match="nothing-here"):
        convert([str(tmp_path / "nothing-here*.jsonl")], str(tmp_path / "t"), format="jsonl")


def test_index_metadata_records_sources_and_options_not_the_engine(tmp_path):
    inputs = write_jsonl(tmp_path)
    convert(inputs, str(tmp_path / "train"), num_shards=2, fields=["id"])
    metadata = index_of(tmp_path / "train")["metadata"]
    assert metadata["sources"] == [
        {"path": path, "bytes": os.path.getsize(path), "records": 100} for path in inputs
    ]
    assert metadata["options"]["fields"] == ["id"] and metadata["options"]["shards"] == 2
    assert "engine" not in json.dumps(metadata)


def test_repeated_runs_write_byte_identical_files_and_index(tmp_path):
    inputs = write_inputs("parquet", tmp_path / "in")
    first = convert(inputs, str(tmp_path / "train"), num_shards=2)
    before = [Path(path).read_bytes() for path in [*first.paths, first.index]]
    second = convert(inputs, str(tmp_path / "train"), num_shards=2)
    after = [Path(path).read_bytes() for path in second.paths]
    assert after == before[:-1]
    index = [json.loads(Path(first.index).read_text()), json.loads(before[-1])]
    for payload in index:
        payload.pop("mtime_ns"), payload.pop("inodes")
    assert index[0] == index[1]


def test_decoded_images_of_palette_mode_come_out_rgb(tmp_path):
    os.makedirs(tmp_path / "root/a")
    image = Image.fromarray(np.zeros((3, 5), np.uint8), mode="L").convert("P")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    (tmp_path / "root/a/x.png").write_bytes(buffer.getvalue())
    (tmp_path / "root/a/notes.txt").write_text("not an image: left out")
    done = convert([str(tmp_path / "root")], str(tmp_path / "t"), decode_images=True)
    (record,) = read_all(done.paths)
    assert record["image"].shape == (3, 5, 3)


def test_a_list_mixing_numbers_and_strings_is_a_bad_record_naming_its_field(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"a": [1, 2]}\n{"a": [1, "x"]}\n')
    with pytest.raises(DataSourceError, match="line 2: field 'a' holds a list mixing types"):
        convert([str(tmp_path / "m.jsonl")], str(tmp_path / "t"))


def test_tfrecord_records_are_what_tfexample_parses_with_bytes_lists_as_bytes_arrays(tmp_path):
    from resumax.convert.formats.tfrecord import frame
    from resumax.records.tfexample import Example, TFExample

    example = Example()
    features = example.features.feature
    features["ints"].int64_list.value.extend([1, -2, 3])
    features["floats"].float_list.value.extend([0.5])
    features["texts"].bytes_list.value.extend([b"a", b"bc"])
    features["empty_bytes"].bytes_list.SetInParent()
    features["no_kind"].SetInParent()
    data = example.SerializeToString()
    (tmp_path / "e.tfrecord").write_bytes(frame(data) * 2)
    done = convert([str(tmp_path / "e.tfrecord")], str(tmp_path / "t"))
    expected = {
        name: np.array(value, dtype=bytes) if isinstance(value, list) else value
        for name, value in TFExample()(data).items()
    }
    for record in read_all(done.paths):
        assert sorted(record) == sorted(expected)
        for name, value in expected.items():
            assert record[name].dtype == value.dtype and record[name].tolist() == value.tolist()


@pytest.mark.parametrize(
    "cell",
    ["", "a", "12", "-12", "+3", "1.5", ".5", "-.5e3", "1e5", "nan", "inf", "1_000", " 1", "1 "]
    + ["٣", "²", "+", "-", ".", "1.2.3", "0x10", "3abc", "1\n", "-9223372036854775808"]
    + ["9223372036854775808", "99999999999999999999"],
)
def test_a_csv_cell_is_typed_as_csv_value_reads_it(cell):
    """`csv_cell` (inlined for the hot path) gives `csv_value`'s value as a record value."""
    from resumax.convert.values import csv_cell, csv_value

    value = csv_value(cell)
    if type(value) is int:
        expected = np.int64(value) if -(2**63) <= value < 2**63 else None
    else:
        expected = np.float64(value) if type(value) is float else value
    got = csv_cell(cell)
    assert type(got) is type(expected)
    assert got is expected or got == expected or (got != got and expected != expected)
