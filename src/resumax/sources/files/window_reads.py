"""`BlockCache`: reads for the file-grouped shuffle (`shuffle_window`), each aligned block of a file
read once into a bounded buffer, so a window's records cost one pass over each of its files.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from resumax.sources.files.parallel_open import open_many
from resumax.sources.files.readers import ArrayRecordFiles

# Records per cached block: whole small shards, and bounded pieces of large files.
MAX_BLOCK = 1024


class BlockCache:
    """Records read by aligned blocks of `block` records of a file, least recently used dropped
    once more than `capacity` records are held.

    Under the windowed shuffle a window's records lie in W consecutive records of the epoch's
    file order, so every block it touches is read once, whole, in file order, and serves the
    window's later spans from memory. The capacity (2W + 2 blocks) holds a window's blocks and
    those it shares with its neighbours. Which records are cached never changes what is read.
    """

    def __init__(self, files: ArrayRecordFiles, window: int):
        self.files = files
        self.block = max(1, min(MAX_BLOCK, window // 4))
        self.capacity = 2 * window + 2 * self.block
        self.held = 0
        # first global record index of a block -> its records' bytes, least recently used first.
        self.blocks: OrderedDict[int, list[bytes]] = OrderedDict()
        self.lock = threading.Lock()

    def read(self, record_indices: np.ndarray) -> list[bytes]:
        """Raw bytes of the records at the given global indices, in that order."""
        files = self.files
        file_ids = np.searchsorted(files.starts, record_indices, side="right") - 1
        offsets = (record_indices - files.starts[file_ids]) % self.block
        keys = (record_indices - offsets).tolist()
        with self.lock:
            blocks = self.blocks
            missing = sorted(set(keys).difference(blocks))
            if missing:
                self._read_blocks(missing)
            for key in dict.fromkeys(keys):
                blocks.move_to_end(key)
            offsets = offsets.tolist()
            result = [blocks[key][offset] for key, offset in zip(keys, offsets, strict=True)]
            while self.held > self.capacity and len(blocks) > 1:
                self.held -= len(blocks.popitem(last=False)[1])
        return result

    def _read_blocks(self, keys: list[int]) -> None:
        """Reads whole blocks (first global indices `keys`, ascending) through the reader pool."""
        files, pool = self.files, self.files.pool
        starts = files.starts
        file_ids = (np.searchsorted(starts, keys, side="right") - 1).tolist()
        with pool.lock:
            pool.close_evicted()
            open_many(pool, sorted(set(file_ids)))
            for key, file_id in zip(keys, file_ids, strict=True):
                read = pool.get(file_id).read
                local = key - int(starts[file_id])
                stop = min(local + self.block, files.counts[file_id])
                self.blocks[key] = [read(i, i + 1)[0] for i in range(local, stop)]
                self.held += stop - local

    def clear(self) -> None:
        with self.lock:
            self.blocks.clear()
            self.held = 0
