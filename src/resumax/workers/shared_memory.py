"""Results from worker processes: pickled with their arrays out of band, the array bytes copied
through reusable POSIX shared memory slots (/dev/shm) instead of the pipe.

A worker owns `slots` segments and writes each result to the slot the parent names with the task.
The parent names only slots that no pending result and no live array uses: it either copies a
result out when it receives it, or hands its arrays out in place and leases the slot until they
are garbage collected, so a slot is never overwritten while anything reads it. A task may build
its arrays in the slot itself (`SlotWriter.allocator`): those are not copied again. A segment's
name exists only until the parent has mapped it; `sweep` removes the names a crash leaves
behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import mmap
import os
import pickle
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

SHM_DIR = "/dev/shm"
# Results whose arrays hold fewer bytes go through the pipe: a slot costs a few syscalls to set up.
INLINE_LIMIT = 64 * 1024
_ALIGNMENT = 64
# Slot sizes are rounded up to this, so results of varying size (after a Filter) rarely regrow one.
_SLOT_GRANULE = 1 << 20


def sweep(prefix: str) -> None:
    """Removes the shared memory segments whose names start with `prefix`."""
    for path in glob.glob(os.path.join(SHM_DIR, f"{glob.escape(prefix)}*")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _round_up(size: int, granule: int) -> int:
    return -(-size // granule) * granule


def _address(buffer: Any) -> int:
    """The memory address of the first byte of a (contiguous, non-empty) buffer."""
    return np.frombuffer(buffer, dtype=np.uint8).ctypes.data


class SlotWriter:
    """A worker's side: turns results into small messages, the array bytes written to a slot."""

    def __init__(self, prefix: str, slots: int):
        self._prefix = prefix
        self._segments: list[mmap.mmap | None] = [None] * slots
        self._created = 0
        # Per slot: bytes at its start handed out by `allocator` for the task being computed.
        self._allocated = [0] * slots

    def allocator(self, slot: int) -> Callable[[int], np.ndarray]:
        """`allocate(nbytes)`: a new uint8 array, in slot `slot` while it has room, else in
        private memory. Arrays of a result that lie in its slot are sent without another copy.

        Call it before computing the result that `pack(result, slot)` then sends; the memory is
        reused by the result after next in this slot, so the task must not keep the arrays.
        """
        self._allocated[slot] = 0
        segment = self._segments[slot]
        memory = np.frombuffer(segment, dtype=np.uint8) if segment is not None else None

        def allocate(nbytes: int) -> np.ndarray:
            start = self._allocated[slot]
            if memory is None or nbytes == 0 or start + nbytes > len(memory):
                return np.empty(nbytes, dtype=np.uint8)
            self._allocated[slot] = start + _round_up(nbytes, _ALIGNMENT)
            return memory[start : start + nbytes]

        return allocate

    def pack(self, result: Any, slot: int) -> tuple:
        """A message carrying `result`; its arrays go to shared memory slot `slot` if large."""
        buffers: list[pickle.PickleBuffer] = []
        header = pickle.dumps(result, protocol=5, buffer_callback=buffers.append)
        raws = [buffer.raw() for buffer in buffers]
        allocated, self._allocated[slot] = self._allocated[slot], 0
        in_slot = self._offsets_in_slot(raws, slot, allocated)
        spans, size = [], allocated
        for raw, offset in zip(raws, in_slot, strict=True):
            if offset is None:
                offset, size = size, size + _round_up(raw.nbytes, _ALIGNMENT)
            spans.append((offset, raw.nbytes))
        if size >= INLINE_LIMIT and os.path.isdir(SHM_DIR):
            try:
                new_path = self._reserve(slot, size)
            except OSError:  # /dev/shm is full: this result goes through the pipe
                pass
            else:
                segment = self._segments[slot]
                for (offset, length), raw, place in zip(spans, raws, in_slot, strict=True):
                    if place is None or new_path is not None:
                        segment[offset : offset + length] = raw
                return ("segment", header, slot, new_path, len(segment), spans)
        return ("inline", header, [bytes(raw) for raw in raws])

    def _offsets_in_slot(
        self, raws: list[memoryview], slot: int, allocated: int
    ) -> list[int | None]:
        """Per buffer, its offset if `allocator` placed it in slot `slot`, else None."""
        segment = self._segments[slot]
        if not allocated or segment is None:
            return [None] * len(raws)
        base = _address(segment)
        offsets: list[int | None] = []
        for raw in raws:
            offset = _address(raw) - base if raw.nbytes else -1
            inside = offset >= 0 and offset + raw.nbytes <= allocated
            offsets.append(offset if inside else None)
        return offsets

    def _reserve(self, slot: int, size: int) -> str | None:
        """Makes slot `slot` hold `size` bytes; returns the path of a new segment, or None."""
        segment = self._segments[slot]
        if segment is not None and len(segment) >= size:
            return None
        path = f"{SHM_DIR}/{self._prefix}-{self._created}"
        self._created += 1
        capacity = _round_up(size, _SLOT_GRANULE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Reserves the pages now: a full tmpfs fails here with ENOSPC, not with SIGBUS later.
            os.posix_fallocate(fd, 0, capacity)
            self._segments[slot] = mmap.mmap(fd, capacity)
        except OSError:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return path


def payload_bytes(message: tuple) -> int:
    """Bytes of the arrays a `SlotWriter.pack` message carries."""
    if message[0] == "inline":
        return sum(len(raw) for raw in message[2])
    return sum(length for _, length in message[5])


class SlotReader:
    """The parent's side for one worker: maps its slots and turns messages into results.

    A result's arrays are handed out in place (no copy) while fewer than `lease_limit` slots are
    held that way; the slot is then leased until every array using it has been garbage
    collected (the caller may keep a batch as long as it likes). Past the limit, results are
    copied out and their slot is free again at once. `pick_slot` names a slot the worker may
    write its next result to.
    """

    def __init__(self, slots: int, lease_limit: int = 0):
        self._segments: list[mmap.mmap | None] = [None] * slots
        self._lease_limit = lease_limit
        # Per slot: live buffers handed out in place (0: not leased).
        self._leases = [0] * slots
        self._busy = [False] * slots  # a result is being computed into it
        self._lock = threading.RLock()  # buffers may be collected in any thread

    def pick_slot(self) -> int:
        """A slot that is neither awaiting a result nor leased, now marked as awaiting one."""
        for slot, (busy, leases) in enumerate(zip(self._busy, self._leases, strict=True)):
            if not busy and not leases:
                self._busy[slot] = True
                return slot
        raise RuntimeError("no free shared memory slot: more results in flight than slots")

    def release(self, slot: int) -> None:
        """Marks `slot` free after its message failed to arrive (the worker died)."""
        self._busy[slot] = False

    def unpack(self, message: tuple, slot: int) -> Any:
        """The result a `SlotWriter.pack` message for `slot` carries, in memory of this process."""
        self._busy[slot] = False
        if message[0] == "inline":
            _, header, raws = message
            return pickle.loads(header, buffers=raws)
        _, header, _, new_path, capacity, spans = message
        if new_path is not None:
            fd = os.open(new_path, os.O_RDWR)
            try:
                self._segments[slot] = mmap.mmap(fd, capacity)
            finally:
                os.close(fd)
            os.unlink(new_path)  # both sides have it mapped; the name is no longer needed
        segment = self._segments[slot]
        if sum(map(bool, self._leases)) >= self._lease_limit:
            view = memoryview(segment)
            return pickle.loads(header, buffers=[bytearray(view[o : o + n]) for o, n in spans])
        # One buffer over the message's arrays, leased until the last array cut from it is
        # collected: one lease per result rather than one per array (there may be hundreds).
        first = min((o for o, n in spans), default=0)
        end = max((o + n for o, n in spans), default=first)
        region = (ctypes.c_ubyte * (end - first)).from_buffer(segment, first)
        self._leases[slot] = 1
        weakref.finalize(region, self._return_buffer, slot)
        view = memoryview(region).cast("B")
        return pickle.loads(header, buffers=[view[o - first : o - first + n] for o, n in spans])

    def _return_buffer(self, slot: int) -> None:
        """Called when a buffer handed out in place is garbage collected (any thread)."""
        with self._lock:
            self._leases[slot] -= 1
