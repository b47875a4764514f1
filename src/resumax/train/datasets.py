"""Embedded default data: scikit-learn's digits (1,797 8x8 images, no download) as ArrayRecords.

Preparation writes into a temporary sibling directory and renames it into place, so a directory
under the final name is always complete; a kill mid-way leaves only debris that the next run clears.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from tqdm import tqdm

from resumax.records import shard_paths, write_array_record

DIGITS_TEST_FRACTION = 0.2
DIGITS_TRAIN_SHARDS = 4
DIGITS_TEST_SHARDS = 1
# The split is part of the data set, so it has its own fixed seed, independent of data.seed.
_DIGITS_SPLIT_SEED = 0
_PARTIAL_SUFFIX = ".partial-"


def digits_examples() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, test) records {"image": float32[8, 8] in [0, 1], "label": int64 scalar}.

    The split (20% test) is fixed. Pixel values are sklearn's 0..16 intensities divided by 16.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(labels))
    num_test = int(round(len(labels) * DIGITS_TEST_FRACTION))
    test_ids, train_ids = np.sort(order[:num_test]), np.sort(order[num_test:])

    def records(ids: np.ndarray) -> list[dict[str, Any]]:
        return [{"image": images[i], "label": labels[i]} for i in ids]

    return records(train_ids), records(test_ids)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clear_partial_dirs(directory: str) -> None:
    """Removes temporary directories left by preparations of `directory` whose process died."""
    parent, name = os.path.split(directory)
    prefix = name + _PARTIAL_SUFFIX
    for entry in os.listdir(parent):
        pid = entry[len(prefix) :]
        if entry.startswith(prefix) and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def write_split(
    prefix: str,
    items: list[Any],
    num_shards: int,
    progress: tqdm,
    to_record: Callable[[Any], dict[str, Any]] = lambda item: item,
) -> None:
    """Writes `to_record(item)` for each item as `prefix-0000K-of-0000N.array_record` shards of
    near-equal size, counting each record on `progress`."""
    bounds = np.linspace(0, len(items), num_shards + 1).astype(int)
    paths = shard_paths(prefix, num_shards)
    for path, start, stop in zip(paths, bounds[:-1], bounds[1:], strict=True):

        def counted(first: int = start, last: int = stop) -> Iterator[dict[str, Any]]:
            for item in items[first:last]:
                progress.update(1)
                yield to_record(item)

        write_array_record(path, counted())


def prepare_digits(directory: str | os.PathLike) -> bool:
    """Writes the digits as `train-*` / `test-*` ArrayRecord shards into `directory` if absent.

    Returns True if it wrote them, False if `directory` already existed (it is then complete: it
    only ever appears by an atomic rename of a fully written temporary directory).
    """

    def write(partial: str) -> None:
        train, test = digits_examples()
        with tqdm(total=len(train) + len(test), desc="preparing digits", unit="rec") as progress:
            write_split(os.path.join(partial, "train"), train, DIGITS_TRAIN_SHARDS, progress)
            write_split(os.path.join(partial, "test"), test, DIGITS_TEST_SHARDS, progress)

    return write_atomically(directory, write)


def write_atomically(directory: str | os.PathLike, write: Callable[[str], None]) -> bool:
    """Runs `write(partial)` on a temporary sibling directory, then renames it to `directory`.

    Returns False without writing if `directory` exists (it is complete), True if it wrote it.
    Debris of preparations whose process died is removed first.
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.isdir(directory):
        return False
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    _clear_partial_dirs(directory)
    partial = f"{directory}{_PARTIAL_SUFFIX}{os.getpid()}"
    os.makedirs(partial)
    write(partial)
    try:
        os.rename(partial, directory)
    except OSError:
        # Another process finished the same preparation first; its directory is complete.
        shutil.rmtree(partial, ignore_errors=True)
        if not os.path.isdir(directory):
            raise
        return False
    return True
