"""The per-epoch order is a seeded bijection, computed in O(block) memory."""

from __future__ import annotations

import numpy as np
import pytest

from resumax import order


@pytest.mark.parametrize("num_records", [1, 2, 3, 7, 100, 1000, 4097, 200_003])
def test_permutation_is_a_bijection_on_the_record_range(num_records):
    indices = order.permute(np.arange(num_records), num_records, shuffle_seed=42)
    assert np.array_equal(np.sort(indices), np.arange(num_records))


def test_same_seed_gives_the_same_order_and_another_seed_another():
    positions = np.arange(1000)
    first = order.permute(positions, 1000, 7)
    assert np.array_equal(first, order.permute(positions, 1000, 7))
    assert not np.array_equal(first, order.permute(positions, 1000, 8))


def test_epoch_e_is_shuffled_with_seed_plus_e():
    positions = np.arange(500)
    for epoch in range(3):
        expected = order.permute(positions, 500, 42 + epoch)
        got = order.record_indices(positions, num_records=500, seed=42, epoch=epoch, shuffle=True)
        assert np.array_equal(got, expected)


def test_shuffled_order_looks_random():
    n = 10_000
    indices = order.permute(np.arange(n), n, 42)
    assert abs(np.corrcoef(np.arange(n), indices)[0, 1]) < 0.05
    assert np.sum(indices == np.arange(n)) < 10
    assert 0.25 < np.abs(np.diff(indices)).mean() / n < 0.42


@pytest.mark.parametrize("bad_position", [-1, 100, 150])
def test_positions_outside_the_record_range_are_refused(bad_position):
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        order.permute(np.array([0, bad_position]), 100, 1)


def test_identity_without_shuffle():
    positions = np.arange(10, 20)
    got = order.record_indices(positions, num_records=100, seed=1, epoch=3, shuffle=False)
    assert np.array_equal(got, positions)


def test_any_block_of_a_huge_dataset_is_computed_without_materialising_it():
    num_records = 10**12
    positions = np.arange(num_records - 256, num_records)
    indices = order.permute(positions, num_records, 3)
    assert indices.shape == (256,)
    assert ((indices >= 0) & (indices < num_records)).all()
    assert len(set(indices.tolist())) == 256
