"""`Pipeline`: read -> stages -> batch, with a state that describes exactly the batches delivered.

Reading top to bottom follows a record: the source gives the order and the bytes, per-record
stages transform or drop it, batches are stacked, batch stages run, and the position is advanced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from resumax.errors import ConfigError, StageError, StateMismatchError
from resumax.sources.base import DataPosition, RecordSource
from resumax.stages import BatchMap, Filter, Map, RandomMap, RecordRng, as_stage

PIPELINE_STATE_VERSION = 1


@dataclasses.dataclass
class _Chunk:
    """Processed records of one contiguous span of an epoch: kept examples and their positions."""

    epoch: int
    examples: list[Any]
    positions: list[int]


def seed_from_rngs(rngs: nnx.Rngs | int | None) -> int:
    """An integer seed from an `nnx.Rngs` (its default stream's key), an int, or None (0).

    The key is read, not split: the pipeline consumes no randomness from the caller's Rngs.
    """
    if rngs is None:
        return 0
    if isinstance(rngs, int) and not isinstance(rngs, bool):
        if rngs < 0:
            raise ConfigError(f"rngs seed must be >= 0, got {rngs}")
        return rngs
    if isinstance(rngs, nnx.Rngs):
        streams = {n: s for n, s in vars(rngs).items() if isinstance(s, nnx.RngStream)}
        stream = streams.get("default") or streams[min(streams)]
        words = np.asarray(jax.random.key_data(stream.key.get_value())).astype(np.uint64)
        return int(words[0]) << 32 | int(words[1])
    raise ConfigError(f"rngs must be an nnx.Rngs, an int or None, got {rngs!r}")


def _stack(examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    first = examples[0]
    try:
        return {key: np.stack([example[key] for example in examples]) for key in first}
    except (KeyError, ValueError, TypeError) as error:
        raise StageError(
            f"cannot batch examples: fields or shapes differ between records ({error!r}); "
            f"the first record has fields {sorted(first)}"
        ) from error


# Not a JAX pytree: Orbax v1 rebuilds the pytrees it loads into, so it would restore a copy
# and leave this pipeline where it was.
class Pipeline(nnx.Module, pytree=False):
    """Batches of a source's records after per-record and per-batch stages.

    Args:
      source: a resumax source (`ArrayRecordSourceModule`, `MemorySource`).
      stages: callables (maps) and `Map` / `RandomMap` / `Filter` / `BatchMap` objects, applied in
        order; `BatchMap` stages come after all per-record stages.
      batch_size: records per batch (> 0).
      rngs: seeds `RandomMap` generators (with epoch and record index); an `nnx.Rngs` or an int.
      drop_remainder: in finite mode, drop the last batch if it is partial.

    Iterating continues from the current position; the state always describes the batches the
    caller has received.
    """

    def __init__(
        self,
        source: RecordSource,
        stages: Sequence[Any] = (),
        batch_size: int = 32,
        rngs: nnx.Rngs | int | None = None,
        drop_remainder: bool = False,
    ):
        if not isinstance(source, RecordSource):
            raise ConfigError(f"source must be a resumax source, got {type(source).__name__}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ConfigError(f"batch_size must be a positive int, got batch_size={batch_size!r}")
        stages = [as_stage(stage, position) for position, stage in enumerate(stages)]
        first_batch_stage = next(
            (i for i, stage in enumerate(stages) if isinstance(stage, BatchMap)), len(stages)
        )
        for position, stage in enumerate(stages[first_batch_stage:], start=first_batch_stage):
            if not isinstance(stage, BatchMap):
                raise ConfigError(
                    f"stage {position} ({stage.name}) is a per-record stage after a BatchMap; "
                    "put per-record stages before every BatchMap"
                )
        self.source = source
        self.batch_size = batch_size
        self.drop_remainder = bool(drop_remainder)
        self.rng_seed = seed_from_rngs(rngs)
        self.batches_emitted = DataPosition(0)
        self._record_stages = stages[:first_batch_stage]
        self._batch_stages = stages[first_batch_stage:]
        self._rngs = {
            position: RecordRng(self.rng_seed, position)
            for position, stage in enumerate(self._record_stages)
            if isinstance(stage, RandomMap)
        }

    # Reading and per-record stages ----------------------------------------------------------

    def _chunks(self, epoch: int, index: int) -> Iterator[_Chunk]:
        """Processed chunks from (epoch, index) on; a chunk never crosses an epoch boundary."""
        source = self.source
        while not source.finished(epoch):
            stop = min(index + self.batch_size, source.records_per_epoch)
            record_indices = source.record_indices(epoch, index, stop)
            examples = source.read_records(record_indices)
            yield self._apply_record_stages(epoch, index, record_indices, examples)
            index = stop
            if index == source.records_per_epoch:
                epoch, index = epoch + 1, 0

    def _apply_record_stages(
        self, epoch: int, start: int, record_indices: np.ndarray, examples: list[Any]
    ) -> _Chunk:
        positions = list(range(start, start + len(examples)))
        record_ids = record_indices.tolist()
        for stage_position, stage in enumerate(self._record_stages):
            done = 0
            try:
                if isinstance(stage, Map):
                    fn = stage.fn
                    for done, example in enumerate(examples):
                        examples[done] = fn(example)
                elif isinstance(stage, RandomMap):
                    fn, rng = stage.fn, self._rngs[stage_position]
                    for done, (example, record_id) in enumerate(
                        zip(examples, record_ids, strict=True)
                    ):
                        examples[done] = fn(example, rng.for_record(epoch, record_id))
                elif isinstance(stage, Filter):
                    keep = []
                    for example in examples:
                        keep.append(bool(stage.predicate(example)))
                        done += 1
                    examples = [e for e, k in zip(examples, keep, strict=True) if k]
                    positions = [p for p, k in zip(positions, keep, strict=True) if k]
                    record_ids = [r for r, k in zip(record_ids, keep, strict=True) if k]
            except Exception as error:
                raise StageError(
                    f"stage {stage_position} ({stage.name}) failed on record {record_ids[done]} "
                    f"(epoch {epoch}, position {positions[done]}): {error!r}"
                ) from error
        return _Chunk(epoch, examples, positions)

    # Batching ---------------------------------------------------------------------------------

    def _finish_batch(self, examples: list[Any]) -> dict[str, Any]:
        batch = _stack(examples)
        for stage in self._batch_stages:
            try:
                batch = stage.fn(batch)
            except Exception as error:
                raise StageError(f"batch stage ({stage.name}) failed: {error!r}") from error
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Yields batches from the current position, advancing the state as each is delivered."""
        source = self.source
        pending: list[Any] = []
        for chunk in self._chunks(*source.position):
            taken = 0
            while taken < len(chunk.examples):
                need = self.batch_size - len(pending)
                pending.extend(chunk.examples[taken : taken + need])
                taken = min(taken + need, len(chunk.examples))
                if len(pending) == self.batch_size:
                    batch = self._finish_batch(pending)
                    pending = []
                    self._advance(chunk.epoch, chunk.positions[taken - 1] + 1)
                    yield batch
        last_epoch = max(source.config.num_epochs, 0)
        if pending and not self.drop_remainder:
            batch = self._finish_batch(pending)
            self._advance(last_epoch, 0)
            yield batch
        elif source.position != (last_epoch, 0):
            source.seek(last_epoch, 0)

    def _advance(self, epoch: int, index: int) -> None:
        self.source.seek(epoch, index)
        self.batches_emitted.set_value(self.batches_emitted.get_value() + 1)

    # State ------------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state: the source's position plus what the pipeline owns.

        Prefetched or in-flight batches are not stored: they are recomputed on resume.
        """
        return {
            "version": PIPELINE_STATE_VERSION,
            "source": self.source.get_state(),
            "batches_emitted": self.batches_emitted.get_value(),
            "batch_size": self.batch_size,
            "rng_seed": self.rng_seed,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores `get_state()` output; raises StateMismatchError naming any differing field."""
        if not isinstance(state, dict):
            raise StateMismatchError(f"a pipeline state must be a dict, got {type(state).__name__}")
        for field in ("version", "source", "batches_emitted", "rng_seed"):
            if field not in state:
                raise StateMismatchError(f"pipeline state lacks the field {field!r}; got {state!r}")
        if state["version"] != PIPELINE_STATE_VERSION:
            raise StateMismatchError(
                f"pipeline state field 'version' is {state['version']!r}; this resumax reads "
                f"version {PIPELINE_STATE_VERSION}"
            )
        if state["rng_seed"] != self.rng_seed:
            raise StateMismatchError(
                f"pipeline state field 'rng_seed' is {state['rng_seed']!r} but this pipeline has "
                f"{self.rng_seed!r}; build the pipeline with the same rngs to resume exactly"
            )
        batches = state["batches_emitted"]
        if not isinstance(batches, int) or isinstance(batches, bool) or batches < 0:
            raise StateMismatchError(f"pipeline state field 'batches_emitted' is {batches!r}")
        self.source.set_state(state["source"])
        self.batches_emitted.set_value(batches)

    # Orbax v1 `StatefulCheckpointable` ------------------------------------------------------

    async def save(self, directory: Any) -> Awaitable[None]:
        """Snapshots the state now; the returned awaitable writes it once `directory` exists."""
        from resumax.checkpoint import save_v1

        return await save_v1(self, directory)

    async def load(self, directory: Any) -> Awaitable[None]:
        """The returned awaitable reads this process's state file in `directory` and sets it."""
        from resumax.checkpoint import load_v1

        return await load_v1(self, directory)
