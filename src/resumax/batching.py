"""Chunks and batches: the kept records of a span stacked into arrays, and batches cut from them.

A batch cut from chunks holds exactly the arrays that stacking its own records would give, so
batches do not depend on where spans start (resume) or which process computed them (workers).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import numpy as np

from resumax.errors import StageError

_dtype_of = operator.attrgetter("dtype")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclasses.dataclass
class Chunk:
    """The records of one span that every stage kept, with their global positions.

    `examples` holds stacked fields when all records share fields and per-field types (a few
    arrays travel cheaply from a worker), else the list of examples.
    """

    examples: dict[str, np.ndarray] | list[Any]
    positions: np.ndarray

    def __len__(self) -> int:
        return len(self.positions)

    def examples_between(self, start: int, stop: int) -> list[Any]:
        """Examples [start, stop) as a list (rows of the stacked fields, if stacked)."""
        if isinstance(self.examples, list):
            return self.examples[start:stop]
        fields = self.examples.items()
        return [{key: values[row] for key, values in fields} for row in range(start, stop)]


def stack_if_uniform(examples: list[Any]) -> dict[str, np.ndarray] | list[Any]:
    """Stacked fields if every example is a dict with the same fields and per-field dtypes.

    Uniform dtypes keep stacking exact: a batch cut from several chunks then holds the same
    arrays as one stacked from its own records, whatever the chunk boundaries. The checks run
    as C-level `map`s: they cost ~1% of reading the records.
    """
    if not examples or set(map(type, examples)) != {dict}:
        return examples
    keys = examples[0].keys()
    if set(map(len, examples)) != {len(keys)}:  # with every key of the first: the same keys
        return examples
    stacked = {}
    for key in keys:
        try:
            values = list(map(operator.itemgetter(key), examples))
        except KeyError:
            return examples
        if not _stack_keeps_each_dtype(values):
            return examples
        try:
            stacked[key] = np.stack(values)
        except (ValueError, TypeError):
            return examples
    return stacked


def _stack_keeps_each_dtype(values: list[Any]) -> bool:
    """True if every value would become an array of the same dtype (so none is promoted)."""
    types = set(map(type, values))
    if len(types) != 1:
        return False
    (kind,) = types
    if kind is np.ndarray:
        return len(set(map(_dtype_of, values))) == 1
    if issubclass(kind, (str, bytes)):  # the dtype's width is the longest value's length
        return len(set(map(len, values))) == 1
    if kind is int:  # beyond int64, numpy picks uint64 or object
        return min(values) >= _INT64_MIN and max(values) <= _INT64_MAX
    return True  # a numpy scalar type or float, bool, None: the type fixes the dtype


Piece = tuple[Chunk, int, int]


def stack(examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Stacks each field of the examples into one array; StageError if they do not match."""
    first = examples[0]
    try:
        return {key: np.stack([example[key] for example in examples]) for key in first}
    except (KeyError, ValueError, TypeError) as error:
        raise StageError(
            f"cannot batch examples: fields or shapes differ between records ({error!r}); "
            f"the first record has fields {sorted(first)}"
        ) from error


def combine(pieces: list[Piece]) -> dict[str, np.ndarray]:
    """One batch from [start, stop) slices of chunks: the same arrays as stacking its records.

    A batch that is one whole stacked chunk (no Filter, no epoch edge inside) is used as is.
    """
    chunks = [chunk.examples for chunk, _, _ in pieces]
    if all(isinstance(examples, dict) for examples in chunks):
        chunk, start, stop = pieces[0]
        if len(pieces) == 1 and (start, stop) == (0, len(chunk)):
            return chunk.examples
        if all(examples.keys() == chunks[0].keys() for examples in chunks):
            try:
                return {
                    key: np.concatenate([c.examples[key][a:b] for c, a, b in pieces])
                    for key in chunks[0]
                }
            except (ValueError, TypeError):
                pass  # fields differ between chunks: stack() names the problem
    return stack([example for c, a, b in pieces for example in c.examples_between(a, b)])
