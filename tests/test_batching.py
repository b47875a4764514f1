"""Chunks and batches: a batch cut from stacked chunks equals stacking its own records with numpy,
whatever the field types and wherever the chunk boundaries fall."""

from __future__ import annotations

import numpy as np
import pytest

from resumax.errors import StageError
from resumax.pipeline.batching import Chunk, combine, stack, stack_if_uniform

FIELDS = {
    "uint8 image": lambda i: np.full((4, 4, 3), i, dtype=np.uint8),
    "strided view": lambda i: np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2] + i,
    "0-d array": lambda i: np.array(i, dtype=np.uint16),
    "int64 scalar": np.int64,
    "float32 scalar": lambda i: np.float32(i / 3),
    "numpy str": lambda i: np.str_(f"r{i % 10}"),
    "python int": int,
    "python float": lambda i: i / 7,
    "python bool": lambda i: i % 2 == 0,
    "python str": lambda i: f"s{i % 10}",
    "None": lambda i: None,
}


def chunk_of(examples, first_position=0):
    positions = np.arange(first_position, first_position + len(examples))
    return Chunk(stack_if_uniform(examples), positions)


def assert_same_arrays(got, want):
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert got[key].shape == want[key].shape, key
        np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_a_uniform_chunk_is_stacked_exactly_like_np_stack(field):
    examples = [{"x": FIELDS[field](i), "id": np.int64(i)} for i in range(20)]
    stacked = stack_if_uniform(examples)
    assert isinstance(stacked, dict)
    assert_same_arrays(stacked, stack(examples))


@pytest.mark.parametrize(
    "values",
    [
        [np.int64(1), np.float64(2.0)],  # two dtypes
        [np.zeros(3, np.float32), np.zeros(3, np.float64)],  # two array dtypes
        [np.zeros(3), np.zeros(4)],  # two shapes
        ["a", "abc"],  # str widths
        [1, 2**63],  # beyond int64
        [1, 2.5],  # int and float
    ],
)
def test_a_chunk_whose_values_would_be_promoted_stays_a_list(values):
    examples = [{"x": value} for value in values]
    assert stack_if_uniform(examples) is examples


def test_examples_with_different_fields_stay_a_list():
    examples = [{"x": np.int64(1)}, {"y": np.int64(2)}]
    assert stack_if_uniform(examples) is examples


@pytest.mark.parametrize("cut", [1, 5, 8, 11])
def test_a_batch_across_chunks_equals_stacking_its_records(cut):
    # A chunk of strings of one length, then one of strings of several lengths (a list).
    first = [{"x": f"a{i}", "v": np.full(2, i, np.float32)} for i in range(8)]
    second = [{"x": "b" * (i + 1), "v": np.full(2, i, np.float32)} for i in range(8)]
    chunks = [chunk_of(first), chunk_of(second, 8)]
    assert isinstance(chunks[0].examples, dict)
    assert isinstance(chunks[1].examples, list)
    pieces = [(chunks[0], cut, 8), (chunks[1], 0, cut)]
    assert_same_arrays(combine(pieces), stack(first[cut:] + second[:cut]))


def test_a_whole_chunk_is_the_batch_without_a_copy():
    chunk = chunk_of([{"x": np.int64(i)} for i in range(4)])
    assert combine([(chunk, 0, 4)]) is chunk.examples


def test_shapes_that_differ_between_chunks_raise_stage_error_naming_the_field():
    first = chunk_of([{"x": np.zeros(3)} for _ in range(2)])
    second = chunk_of([{"x": np.zeros(4)} for _ in range(2)], 2)
    with pytest.raises(StageError, match="field 'x'.*shape"):
        combine([(first, 0, 2), (second, 0, 2)])
