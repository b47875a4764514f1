"""`open_many`: the readers a read needs that a `ReaderPool` lacks, opened half in a helper thread
while the calling thread opens the other half (ArrayRecord's reader releases the GIL in part);
`close_in_background`: readers of evicted copies closed in that thread.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol


class ReaderPool(Protocol):
    """What `open_many` needs of `resumax.sources.files.readers.ReaderPool`."""

    open_readers: Any
    max_open_files: int

    def get(self, file_id: int) -> Any: ...

    def put(self, file_id: int, reader: Any) -> None: ...

    def open_checked(self, file_id: int) -> Any: ...


# Fewer missing files than this are opened in the calling thread: a hand-off costs more.
MIN_PARALLEL = 16
# (process id, helper): a forked child starts its own helper instead of the parent's dead thread.
_helper: tuple[int, ThreadPoolExecutor] | None = None


def _executor() -> ThreadPoolExecutor:
    global _helper
    if _helper is None or _helper[0] != os.getpid():
        _helper = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="resumax-open"))
    return _helper[1]


def open_many(pool: ReaderPool, file_ids: Sequence[int]) -> None:
    """Opens the files of `file_ids` (distinct) that `pool` has not open; call with its lock held.

    The readers are the same whichever thread opens them, so nothing read depends on timing.
    When any file fails to open, every missing file is opened again in order in this thread,
    which raises the error of the first failing one, as one-by-one opening would.
    """
    missing = [file_id for file_id in file_ids if file_id not in pool.open_readers]
    if len(missing) < MIN_PARALLEL or len(missing) > pool.max_open_files:
        for file_id in missing:
            pool.get(file_id)
        return
    half = len(missing) // 2
    theirs_future = _executor().submit(_open_each, pool, missing[:half])
    mine = _open_each(pool, missing[half:])
    theirs = theirs_future.result()
    if mine is None or theirs is None:
        for reader in (mine or []) + (theirs or []):
            reader.close()
        for file_id in missing:
            pool.get(file_id)
        return
    for file_id, reader in zip(missing, theirs + mine, strict=True):
        pool.put(file_id, reader)


def close_in_background(readers: Sequence[Any]) -> None:
    """Closes readers in the helper thread: closing a reader of a deleted file frees its disk,
    which can take milliseconds that the read asking for it need not wait."""
    _executor().submit(_close_each, readers)


def _close_each(readers: Sequence[Any]) -> None:
    for reader in readers:
        reader.close()


def _open_each(pool: ReaderPool, file_ids: Sequence[int]) -> list[Any] | None:
    """Checked readers of the files, in order; None (and none left open) if any fails."""
    readers: list[Any] = []
    try:
        for file_id in file_ids:
            readers.append(pool.open_checked(file_id))
    except Exception:
        for reader in readers:
            reader.close()
        return None
    return readers
