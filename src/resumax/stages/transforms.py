"""The stage types of a pipeline: per-record `Map`, `MapWithIndex`, `RandomMap` and `Filter`,
per-batch `BatchMap` and `Operator` (a bare nnx.Module); Grain transforms convert to these.

A stage is a named pure function. `RandomMap` gets a numpy Generator keyed by (pipeline seed,
stage position, epoch, record index), so its draws do not depend on batch size, workers or resume.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
from flax import nnx

from resumax.errors import ConfigError

_MASK64 = (1 << 64) - 1


def _name_of(fn: Callable) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


@dataclasses.dataclass(frozen=True)
class Map:
    """example -> example."""

    fn: Callable[[Any], Any]
    name: str = ""


@dataclasses.dataclass(frozen=True)
class MapWithIndex:
    """(index, example) -> example; index is the record's dataset index (`source[index]`), the
    same in every epoch whatever the shuffle."""

    fn: Callable[[int, Any], Any]
    name: str = ""


@dataclasses.dataclass(frozen=True)
class RandomMap:
    """(example, rng: numpy.random.Generator) -> example, with a per-record reproducible rng."""

    fn: Callable[[Any, np.random.Generator], Any]
    name: str = ""


@dataclasses.dataclass(frozen=True)
class Filter:
    """Keeps the examples for which predicate(example) is true."""

    predicate: Callable[[Any], bool]
    name: str = ""


@dataclasses.dataclass(frozen=True)
class BatchMap:
    """batch (dict of stacked arrays) -> batch; runs after batching."""

    fn: Callable[[dict[str, Any]], dict[str, Any]]
    name: str = ""


@dataclasses.dataclass(frozen=True)
class Operator(BatchMap):
    """A bare `nnx.Module` called on whole batches (a Datarax operator); its nnx Variables are
    part of the pipeline state (`resumax.stages.operators`)."""


Stage = Map | MapWithIndex | RandomMap | Filter | BatchMap

# Grain transform base class -> (resumax stage type, method it calls).
_GRAIN_TRANSFORMS = {
    "Map": (Map, "map"),
    "MapWithIndex": (MapWithIndex, "map_with_index"),
    "RandomMap": (RandomMap, "random_map"),
    "Filter": (Filter, "filter"),
}


def _from_grain(stage: Any, position: int) -> Stage | None:
    """The resumax stage for a `grain.transforms` (or `grain.python`) object; None otherwise.

    Found by base class name so that Grain is not imported to check.
    """
    for base in type(stage).__mro__:
        if not base.__module__.startswith("grain."):
            continue
        name = type(stage).__name__
        if base.__name__ in _GRAIN_TRANSFORMS:
            kind, method = _GRAIN_TRANSFORMS[base.__name__]
            return kind(getattr(stage, method), name=name)
        if base.__name__ == "Batch":
            raise ConfigError(
                f"stage {position} is a Grain Batch ({stage!r}); resumax batches for you: pass "
                "batch_size= (and drop_remainder=) to Pipeline instead"
            )
        raise ConfigError(
            f"stage {position} is a Grain {base.__name__} ({name}), which resumax does not run; "
            "use Map, MapWithIndex, RandomMap or Filter"
        )
    return None


def as_stage(stage: Any, position: int) -> Stage:
    """A stage from a stage object, a Grain transform, a bare nnx.Module (a batch-level
    `Operator`) or a plain callable (a Map), named for error messages."""
    if isinstance(stage, Stage):
        fn = stage.predicate if isinstance(stage, Filter) else stage.fn
        if not callable(fn):
            raise ConfigError(
                f"stage {position} ({type(stage).__name__}) wraps {fn!r}, not a callable"
            )
        return stage if stage.name else dataclasses.replace(stage, name=_name_of(fn))
    grain_stage = _from_grain(stage, position)
    if grain_stage is not None:
        return grain_stage
    if isinstance(stage, nnx.Module):
        if not callable(stage):
            raise ConfigError(f"stage {position} is an nnx.Module ({stage!r}) without __call__")
        return Operator(stage, name=type(stage).__name__)
    if callable(stage):
        return Map(stage, name=_name_of(stage))
    raise ConfigError(
        f"stage {position} is {stage!r}; a stage is a callable "
        "or a Map, MapWithIndex, RandomMap, Filter, BatchMap, Grain transform or nnx.Module"
    )


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


class RecordRng:
    """A numpy Generator re-keyed per record: Philox with key (hash(seed, stage, epoch), record).

    Philox is counter-based, so each key is an independent stream; re-keying one bit generator
    costs ~3 us where building a fresh Generator costs ~14 us.
    """

    def __init__(self, seed: int, stage_position: int):
        self._seed_hash = _splitmix64(_splitmix64(seed) ^ stage_position)
        self._bit_generator = np.random.Philox(key=0)
        self.generator = np.random.Generator(self._bit_generator)
        self._epoch = -1
        self._epoch_key = 0

    def for_record(self, epoch: int, record_index: int) -> np.random.Generator:
        """The generator positioned at the start of the stream of (epoch, record_index)."""
        if epoch != self._epoch:
            self._epoch, self._epoch_key = epoch, _splitmix64(self._seed_hash ^ epoch)
        self._bit_generator.state = {
            "bit_generator": "Philox",
            "state": {
                "counter": np.zeros(4, dtype=np.uint64),
                "key": np.array([self._epoch_key, record_index], dtype=np.uint64),
            },
            "buffer": np.zeros(4, dtype=np.uint64),
            "buffer_pos": 4,
            "has_uint32": 0,
            "uinteger": 0,
        }
        return self.generator
