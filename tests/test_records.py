"""The codec round-trips exactly and refuses what it cannot store; writers write real files."""

from __future__ import annotations

import numpy as np
import pytest
from array_record.python import array_record_module
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import resumax
from resumax.errors import RecordDecodeError, RecordEncodeError
from resumax.records import codec

DTYPES = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="="),
    hnp.unsigned_integer_dtypes(endianness="="),
    hnp.floating_dtypes(endianness="="),
    hnp.complex_number_dtypes(endianness="="),
    hnp.integer_dtypes(endianness=">"),
    hnp.byte_string_dtypes(max_len=4),
    hnp.unicode_string_dtypes(max_len=4),
    hnp.datetime64_dtypes(),
)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))
def test_arrays_of_any_dtype_and_shape_round_trip_exactly(array):
    assert codec.encode({"x": array}) == codec._encode_checked({"x": array})
    decoded = resumax.decode(resumax.encode({"x": array}))["x"]
    assert decoded.dtype == array.dtype
    assert decoded.shape == array.shape
    assert decoded.tobytes() == np.ascontiguousarray(array).tobytes()


@settings(max_examples=100, deadline=None)
@given(hnp.from_dtype(np.dtype(np.float32)) | hnp.from_dtype(np.dtype(np.int16)))
def test_numpy_scalars_keep_their_type(scalar):
    value = np.asarray(scalar)[()]
    decoded = resumax.decode(resumax.encode({"s": value}))["s"]
    assert type(decoded) is type(value)
    assert np.asarray(decoded).tobytes() == np.asarray(value).tobytes()


@given(
    st.dictionaries(
        st.text(max_size=8),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-(2**63), 2**64 - 1),
            st.floats(allow_nan=False),
            st.text(max_size=10),
            st.binary(max_size=10),
        ),
        max_size=5,
    )
)
def test_python_scalars_round_trip(example):
    assert codec.encode(example) == codec._encode_checked(example)
    decoded = resumax.decode(resumax.encode(example))
    assert decoded == example
    assert [type(v) for v in decoded.values()] == [type(v) for v in example.values()]


@pytest.mark.parametrize(
    "record",
    [
        {"i": np.int64(-3), "f": np.float64(0.5), "s": "text", "b": b"\0raw", "n": None},
        {"u": np.uint8(7), "h": np.float16(1.5), "flag": np.bool_(True), "x": 1.25, "t": False},
        {"v": np.arange(6, dtype=np.int32).reshape(2, 3).T, "e": np.zeros((0, 4), np.float32)},
        {"big": np.zeros(70_000, np.uint8), "mid": np.ones(300), "w": np.array(["ab", "c"])},
        {"subclass": np.str_("x"), "int": 3, "bytes_array": np.array([b"a", b"bc"])},
        {"date": np.datetime64("2024-01-02"), "be": np.arange(3, dtype=">i4")},
    ],
)
def test_the_fast_path_writes_the_bytes_of_the_checked_path(record):
    assert codec.encode(record) == codec._encode_checked(record)
    decoded = codec.decode(codec.encode(record))
    for name, value in record.items():
        assert np.asarray(decoded[name]).tobytes() == np.asarray(value).tobytes(), name


def test_the_fast_path_leaves_the_errors_to_the_checked_path():
    with pytest.raises(RecordEncodeError, match="'o' has dtype object"):
        codec.encode({"o": np.array([{}, None], dtype=object)})
    with pytest.raises(RecordEncodeError, match="field names must be str"):
        codec.encode({1: np.int64(1)})
    with pytest.raises(RecordEncodeError, match="'n' holds 18446744073709551616"):
        codec.encode({"n": 2**64})


def test_non_contiguous_arrays_are_stored_in_c_order():
    array = np.arange(24).reshape(4, 6)[:, ::2].T
    assert np.array_equal(resumax.decode(resumax.encode({"a": array}))["a"], array)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (np.array([object()]), "'bad'"),
        ({"nested": 1}, "'bad'"),
        (2**70, "64-bit"),
        (np.zeros(2, dtype=[("a", "i4")]), "pickle"),
    ],
)
def test_values_the_codec_cannot_store_raise_a_named_error(value, fragment):
    with pytest.raises(RecordEncodeError, match=fragment):
        resumax.encode({"bad": value})


def test_garbage_bytes_raise_record_decode_error():
    with pytest.raises(RecordDecodeError):
        resumax.decode(b"\xc1\xc1 not msgpack")
    with pytest.raises(RecordDecodeError, match="not a record dict"):
        resumax.decode(b"\x01")


def test_written_files_are_plain_array_record_files(tmp_path):
    examples = [{"i": np.int64(i)} for i in range(7)]
    count = resumax.write_array_record(tmp_path / "f.array_record", examples)
    reader = array_record_module.ArrayRecordReader(str(tmp_path / "f.array_record"))
    assert count == 7
    assert reader.num_records() == 7
    assert [resumax.decode(b)["i"] for b in reader.read_all()] == list(range(7))
    assert "group_size:1," in reader.writer_options_string()
    assert not list(tmp_path.glob("*.partial"))


def test_write_shards_names_files_and_splits_records(tmp_path):
    prefix = tmp_path / "new" / "dir" / "train"
    paths = resumax.write_shards(prefix, [{"i": i} for i in range(10)], num_shards=3)
    assert [p.rsplit("/", 1)[1] for p in paths] == [
        "train-00000-of-00003.array_record",
        "train-00001-of-00003.array_record",
        "train-00002-of-00003.array_record",
    ]
    read_back = []
    for path in paths:
        reader = array_record_module.ArrayRecordReader(path)
        read_back += [resumax.decode(b)["i"] for b in reader.read_all()]
    assert read_back == list(range(10))
