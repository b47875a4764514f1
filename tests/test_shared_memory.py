"""Shared memory slots between a worker and the parent: results come back equal whether their
arrays were built in the slot (no copy) or in private memory, including when a slot must grow,
and a slot whose arrays the parent handed out in place is not written again while they live.
"""

from __future__ import annotations

import gc
import secrets

import numpy as np
import pytest

from resumax.workers.shared_memory import SlotReader, SlotWriter, sweep


@pytest.fixture
def slots():
    prefix = f"resumax-test-{secrets.token_hex(4)}"
    writer, reader = SlotWriter(prefix, 2), SlotReader(2, lease_limit=0)
    yield writer, reader
    sweep(f"{prefix}-")


def result_in(allocate, rows: int, seed: int) -> dict[str, np.ndarray]:
    """A result whose image array lives in memory from `allocate` and label in private memory."""
    rng = np.random.default_rng(seed)
    image = allocate(rows * 3072).reshape(rows, 32, 32, 3)
    image[...] = rng.integers(0, 256, image.shape, dtype=np.uint8)
    return {"image": image, "label": rng.integers(0, 10, rows)}


def test_results_built_in_their_slot_come_back_equal_and_writable(slots):
    writer, reader = slots
    for count in range(6):  # the first use of each slot creates it, later ones build in it
        slot = count % 2
        sent = result_in(writer.allocator(slot), 64, count)
        expected = {key: value.copy() for key, value in sent.items()}
        received = reader.unpack(writer.pack(sent, slot), slot)
        for key in expected:
            np.testing.assert_array_equal(received[key], expected[key])
            assert received[key].flags.writeable
            assert not np.shares_memory(received[key], sent[key])


def test_a_result_larger_than_its_slot_is_copied_whole_into_a_grown_slot(slots):
    writer, reader = slots
    small = result_in(writer.allocator(0), 32, 0)
    reader.unpack(writer.pack(small, 0), 0)
    allocate = writer.allocator(0)
    big = {"part": result_in(allocate, 64, 1), "more": np.arange(400_000)}  # outgrows 1 MiB
    expected = {"image": big["part"]["image"].copy(), "more": big["more"].copy()}
    received = reader.unpack(writer.pack(big, 0), 0)
    np.testing.assert_array_equal(received["part"]["image"], expected["image"])
    np.testing.assert_array_equal(received["more"], expected["more"])


def test_memory_beyond_the_slot_comes_from_private_memory(slots):
    writer, reader = slots
    reader.unpack(writer.pack(result_in(writer.allocator(0), 16, 0), 0), 0)
    allocate = writer.allocator(0)
    arrays = [allocate(512 * 1024) for _ in range(3)]  # the 1 MiB slot holds two
    for index, array in enumerate(arrays):
        array[...] = index
    received = reader.unpack(writer.pack(arrays, 0), 0)
    for index, array in enumerate(received):
        assert (array == index).all()


@pytest.fixture
def leasing():
    prefix = f"resumax-test-{secrets.token_hex(4)}"
    writer, reader = SlotWriter(prefix, 3), SlotReader(3, lease_limit=2)
    yield writer, reader
    sweep(f"{prefix}-")


def send(writer, reader, seed):
    """One result through the slot the reader picks: (slot, result, a copy of what was sent)."""
    slot = reader.pick_slot()
    sent = result_in(writer.allocator(slot), 64, seed)
    expected = {key: value.copy() for key, value in sent.items()}
    return slot, reader.unpack(writer.pack(sent, slot), slot), expected


def test_a_slot_is_not_written_again_while_arrays_handed_out_from_it_live(leasing):
    writer, reader = leasing
    first_slot, first, first_expected = send(writer, reader, 0)
    view = first["image"][10:20]  # a view keeps the slot leased as the batch does
    del first
    gc.collect()
    for seed in range(1, 8):
        slot, result, expected = send(writer, reader, seed)
        assert slot != first_slot
        np.testing.assert_array_equal(result["image"], expected["image"])
        del result
    np.testing.assert_array_equal(view, first_expected["image"][10:20])
    del view
    gc.collect()
    assert reader.pick_slot() == first_slot


def test_past_the_lease_limit_results_are_copied_and_stay_correct(leasing):
    writer, reader = leasing
    kept = [send(writer, reader, seed) for seed in range(6)]  # the caller keeps every batch
    for _, result, expected in kept:
        np.testing.assert_array_equal(result["image"], expected["image"])
        np.testing.assert_array_equal(result["label"], expected["label"])
        assert result["image"].flags.writeable
