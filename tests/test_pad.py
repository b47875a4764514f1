"""Pad: variable-length 1-D fields padded or truncated to fixed lengths, with masks, in any
pipeline (workers too), and clear errors for what it cannot pad."""

from __future__ import annotations

import numpy as np
import pytest

import resumax
from resumax import ArrayRecordSourceConfig, ArrayRecordSourceModule, MemorySource, Pad, Pipeline
from resumax.errors import ConfigError, StageError
from tests.conftest import assert_batches_equal, take


def sequences(count: int) -> list[dict]:
    """Token records of lengths 1..9 with a per-record label."""
    return [
        {
            "tokens": np.arange(100 * i, 100 * i + 1 + i % 9, dtype=np.int32),
            "label": np.int64(i),
        }
        for i in range(count)
    ]


def test_pad_gives_fixed_shapes_and_masks_true_on_real_tokens():
    padded = Pad({"tokens": 6}, pad_value=-1)({"tokens": np.array([5, 6, 7], np.int32), "x": 1})
    np.testing.assert_array_equal(padded["tokens"], [5, 6, 7, -1, -1, -1])
    assert padded["tokens"].dtype == np.int32
    np.testing.assert_array_equal(padded["tokens_mask"], [True] * 3 + [False] * 3)
    assert padded["tokens_mask"].dtype == bool
    assert padded["x"] == 1


def test_pad_truncates_longer_fields_and_masks_every_position():
    padded = Pad({"tokens": 3})({"tokens": [1, 2, 3, 4, 5]})
    np.testing.assert_array_equal(padded["tokens"], [1, 2, 3])
    assert padded["tokens_mask"].all()


def test_pad_pads_several_fields_to_their_own_lengths():
    record = {"a": np.ones(2, np.float32), "b": np.ones(7, np.uint8)}
    padded = Pad({"a": 4, "b": 5})(record)
    assert (padded["a"].shape, padded["b"].shape) == ((4,), (5,))
    assert padded["a_mask"].sum() == 2 and padded["b_mask"].sum() == 5


@pytest.mark.parametrize("num_workers", [0, 2])
def test_padded_records_batch_into_fixed_shapes_in_a_pipeline(tmp_path, num_workers):
    path = tmp_path / "tokens.array_record"
    resumax.write_array_record(path, sequences(30))
    source = ArrayRecordSourceModule(ArrayRecordSourceConfig(seed=1, shuffle_files=True), path)
    pipeline = Pipeline(source, [Pad({"tokens": 8})], batch_size=10, num_workers=num_workers)
    batches = take(pipeline, 3)
    for batch in batches:
        assert batch["tokens"].shape == (10, 8) and batch["tokens_mask"].shape == (10, 8)
        lengths = 1 + batch["label"] % 9
        np.testing.assert_array_equal(batch["tokens_mask"].sum(axis=1), np.minimum(lengths, 8))
        assert (batch["tokens"][~batch["tokens_mask"]] == 0).all()
    in_process = Pipeline(
        ArrayRecordSourceModule(ArrayRecordSourceConfig(seed=1, shuffle_files=True), path),
        [Pad({"tokens": 8})],
        batch_size=10,
    )
    assert_batches_equal(batches, take(in_process, 3))


@pytest.mark.parametrize(
    ("lengths", "pad_value", "match"),
    [
        ({}, 0, "non-empty dict"),
        ([("tokens", 4)], 0, "non-empty dict"),
        ({"tokens": 0}, 0, "'tokens' must be a positive int"),
        ({"tokens": 2.5}, 0, "'tokens' must be a positive int"),
        ({"tokens": True}, 0, "'tokens' must be a positive int"),
        ({"tokens": 4}, "0", "pad_value must be a number"),
    ],
)
def test_bad_pad_arguments_raise_config_error(lengths, pad_value, match):
    with pytest.raises(ConfigError, match=match):
        Pad(lengths, pad_value=pad_value)


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"text": np.arange(3)}, r"no field 'tokens'.*\['text'\]"),
        ({"tokens": np.zeros((2, 3))}, r"'tokens' must be 1-D, got shape \(2, 3\)"),
        ({"tokens": np.int64(3)}, r"'tokens' must be 1-D, got shape \(\)"),
    ],
)
def test_records_pad_cannot_pad_raise_stage_error_naming_the_field(record, match):
    source = MemorySource(ArrayRecordSourceConfig(), [record])
    with pytest.raises(StageError, match=match):
        next(iter(Pipeline(source, [Pad({"tokens": 4})], batch_size=1)))


def test_a_pad_value_the_dtype_cannot_hold_raises_stage_error():
    with pytest.raises(StageError, match=r"pad_value=0.5.*'tokens'.*int32"):
        Pad({"tokens": 4}, pad_value=0.5)({"tokens": np.arange(2, dtype=np.int32)})
