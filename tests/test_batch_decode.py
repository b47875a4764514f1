"""Batch-level decode gives exactly what decoding record by record and stacking gives."""

from __future__ import annotations

import numpy as np
import pytest

import resumax
from resumax import ArrayRecordSourceConfig, ArrayRecordSourceModule, Filter, Pipeline, RandomMap
from resumax.pipeline.batch_decode import JOIN_LIMIT, SpanDecoder, parse_layout
from resumax.pipeline.batching import stack_if_uniform
from tests.conftest import assert_batches_equal, make_examples, take


def per_record_decode(data: bytes) -> dict:
    """resumax's codec under another name: the source then takes the per-record path."""
    return resumax.records.decode(data)


def uniform_examples(count: int) -> list[dict]:
    """One layout with every kind of field the column path takes."""
    rng = np.random.default_rng(0)
    return [
        {
            "image": rng.integers(0, 256, (5, 4, 3), dtype=np.uint8),
            "feature": rng.normal(size=(3,)).astype(np.float32),
            "wide": rng.normal(size=(2, 2)).astype(np.complex128),
            "mask": rng.random(6) < 0.5,
            "zero_d": np.array(i, dtype=np.int16),
            "label": np.int64(i % 10),
            "flag": np.bool_(i % 2),
            "empty": np.zeros((0, 3), dtype=np.float32),
            "name": "digits",
            "version": 3,
            "scale": 0.5,
            "nothing": None,
        }
        for i in range(count)
    ]


def mixed_examples(count: int) -> list[dict]:
    """Layouts that differ between records: shapes, Python ints of several msgpack widths."""
    return [
        {
            "tokens": np.arange(3 + i % 3, dtype=np.int32),
            "length": 3 + i % 3,
            "id": i * 1000,
        }
        for i in range(count)
    ]


def encoded(examples: list[dict]) -> list[bytes]:
    return [resumax.encode(example) for example in examples]


def test_a_uniform_span_stacks_to_what_per_record_decode_and_stack_give():
    raw = encoded(uniform_examples(20))
    stacked = SpanDecoder()(raw)
    assert stacked is not None
    expected = stack_if_uniform([resumax.decode(data) for data in raw])
    assert list(stacked.arrays) == list(expected)
    assert_batches_equal([stacked.arrays], [expected])
    assert all(array.flags.writeable for array in stacked.arrays.values())


def test_long_records_copied_record_by_record_stack_the_same():
    rng = np.random.default_rng(1)
    side = 90  # 90 x 90 x 3 bytes: past JOIN_LIMIT, each record's fields are copied on their own
    examples = [
        {"image": rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "label": np.int64(i)}
        for i in range(6)
    ]
    raw = encoded(examples)
    assert len(raw[0]) > JOIN_LIMIT
    expected = stack_if_uniform([resumax.decode(data) for data in raw])
    assert_batches_equal([SpanDecoder()(raw).arrays], [expected])
    examples[4] = {"image": examples[4]["image"], "label": 4}
    assert SpanDecoder()(encoded(examples)) is None


def test_per_record_views_are_what_decode_gives():
    raw = encoded(uniform_examples(8))
    examples = SpanDecoder()(raw).examples()
    for example, data in zip(examples, raw, strict=True):
        expected = resumax.decode(data)
        assert list(example) == list(expected)
        for key, want in expected.items():
            got = example[key]
            assert type(got) is type(want), key
            if isinstance(want, np.ndarray):
                assert got.dtype == want.dtype and got.shape == want.shape
                assert not got.flags.writeable
                np.testing.assert_array_equal(got, want)
            else:
                assert got == want or (got is None and want is None)


@pytest.mark.parametrize(
    "examples",
    [
        mixed_examples(12),
        [{"x": np.zeros(3, np.float32)}, {"x": np.zeros(3, np.float64)}],
        [{"x": np.zeros(3, np.float32)}, {"y": np.zeros(3, np.float32)}],
        [{"x": "ab"}, {"x": "cd"}],
        [{"x": np.array(["ab"])}, {"x": np.array(["cd"])}],
        [{"x": np.zeros(2, ">f4")}, {"x": np.ones(2, ">f4")}],
        [{"x": 2**63}, {"x": 2**63}],
    ],
    ids=["shapes-and-int-widths", "dtypes", "keys", "str-values", "str-dtype", "big-endian", "u64"],
)
def test_spans_without_one_column_layout_take_the_per_record_path(examples):
    assert SpanDecoder()(encoded(examples)) is None


def test_one_decoder_follows_a_change_of_layout():
    decoder = SpanDecoder()
    first, second = encoded(uniform_examples(4)), encoded(make_examples(4))
    for raw in (first, second, first):
        expected = stack_if_uniform([resumax.decode(data) for data in raw])
        assert_batches_equal([decoder(raw).arrays], [expected])


def test_a_record_that_is_not_a_dict_has_no_layout():
    assert parse_layout(b"\x93\x01\x02\x03") is None
    assert parse_layout(resumax.encode({"x": 1}) + b"\x00") is None
    assert parse_layout(resumax.encode({})) is None


def both_paths(path, **options) -> list[Pipeline]:
    """A pipeline per decode path over the same files and options."""
    config = ArrayRecordSourceConfig(seed=3, shuffle_files=True)
    return [
        Pipeline(ArrayRecordSourceModule(config, path, decode=decode), rngs=5, **options)
        for decode in (None, per_record_decode)
    ]


def stage_probe(example: dict) -> dict:
    """A per-record stage that reports what it was given: types and read-only flags."""
    image = example["image"]
    return {
        "image": image.astype(np.float32) + 1,
        "image_writeable": np.bool_(image.flags.writeable),
        "label_type": np.array(type(example["label"]).__name__),
        "label": example["label"],
    }


def jitter(example: dict, rng: np.random.Generator) -> dict:
    return {**example, "feature": example["feature"] + rng.normal(size=3).astype(np.float32)}


def keep_even(example: dict) -> bool:
    return int(example["label"]) % 2 == 0


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize(
    "stages",
    [(), (stage_probe,), (RandomMap(jitter), Filter(keep_even))],
    ids=["no-stages", "map", "random-map-filter"],
)
def test_batch_and_per_record_decode_give_identical_batches(tmp_path, num_workers, stages):
    path = tmp_path / "uniform.array_record"
    resumax.write_array_record(path, uniform_examples(90))
    fast, slow = both_paths(str(path), stages=stages, batch_size=16, num_workers=num_workers)
    assert fast.source.batch_decodable and not slow.source.batch_decodable
    expected = take(slow, 14)  # crosses two epoch boundaries (90 records per epoch)
    assert_batches_equal(take(fast, 14), expected)
    if stages and stages[0] is stage_probe:
        assert not expected[0]["image_writeable"].any()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mixed_layouts_give_identical_batches_on_both_paths(tmp_path, num_workers):
    path = tmp_path / "mixed.array_record"
    # Python ints of 1, 2 and 3 msgpack bytes, and numpy ints, in one field.
    examples = [
        {"tokens": np.full(4, i, np.int32), "id": i * 100 if i % 3 else np.int64(i)}
        for i in range(60)
    ]
    resumax.write_array_record(path, examples)
    fast, slow = both_paths(str(path), batch_size=8, num_workers=num_workers)
    expected = take(slow, 16)
    assert_batches_equal(take(fast, 16), expected)


def test_resume_on_the_batch_decode_path_gives_identical_batches(tmp_path):
    path = tmp_path / "uniform.array_record"
    resumax.write_array_record(path, uniform_examples(70))
    fast, slow = both_paths(str(path), batch_size=16, num_workers=0)
    take(slow, 3)
    state = slow.get_state()
    expected = take(slow, 10)
    fast.set_state(state)
    assert_batches_equal(take(fast, 10), expected)


def test_a_corrupt_record_still_names_its_file_and_index(tmp_path):
    path = tmp_path / "bad.array_record"
    raw = encoded(make_examples(10))
    raw[6] = b"\xc1 not msgpack"
    resumax.write_array_record(path, raw)
    source = ArrayRecordSourceModule(ArrayRecordSourceConfig(), str(path))
    with pytest.raises(resumax.RecordDecodeError, match=r"record 6 of .*bad\.array_record"):
        take(Pipeline(source, batch_size=10), 1)
