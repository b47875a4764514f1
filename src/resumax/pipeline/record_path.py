"""`RecordPath`: the records of a span of positions, read, decoded, transformed and stacked.

One `RecordPath` runs in the pipeline's process, or one per worker process over its own source.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from resumax.errors import DataSourceError, StageError
from resumax.pipeline.batch_decode import Allocate, SpanDecoder, new_bytes
from resumax.pipeline.batching import Chunk, stack_if_uniform
from resumax.pipeline.stream_checks import record_producer, require_records, unsendable_error
from resumax.records import decode
from resumax.sources.base import RecordSource
from resumax.stages.transforms import Filter, Map, MapWithIndex, RandomMap, RecordRng, Stage
from resumax.workers.worker import report_activity


class RecordPath:
    """Reads, decodes, transforms and stacks the records of a span of positions.

    It runs in this process, or in each worker rebuilt by `open_record_path` over the worker's
    own copy of the source. RandomMap draws depend only on (seed, stage, epoch, record index),
    so every process computes the same chunk for a span. In a worker (`in_worker`) even a
    SystemExit or KeyboardInterrupt a stage raises becomes a StageError naming it.
    """

    def __init__(
        self,
        source: RecordSource,
        record_stages: Sequence[Stage],
        rng_seed: int,
        *,
        in_worker: bool = False,
    ):
        self.source = source
        self.record_stages = list(record_stages)
        self.rng_seed = rng_seed
        self._producer = record_producer(self.record_stages)
        self._catch = BaseException if in_worker else Exception
        self._rngs = {
            position: RecordRng(rng_seed, position)
            for position, stage in enumerate(self.record_stages)
            if isinstance(stage, RandomMap)
        }
        self._decode_span = SpanDecoder() if source.batch_decodable else None
        self._allocate: Allocate = new_bytes

    def use_allocator(self, allocate: Allocate) -> None:
        """Stacks the next span's decoded fields (no per-record stages) in memory from
        `allocate`: a worker passes its result's shared memory slot, which saves a copy."""
        self._allocate = allocate

    def __call__(self, span: tuple[int, int]) -> Chunk:
        allocate, self._allocate = self._allocate, new_bytes
        records_per_epoch = self.source.records_per_epoch
        segments = list(self._epoch_segments(*span))
        if self._decode_span is not None and not self.record_stages and len(segments) == 1:
            # The common case: the span's records decoded and stacked at once, straight to a chunk.
            report_activity(0)
            epoch, start, stop = segments[0]
            record_indices = self.source.record_indices(epoch, start, stop)
            raw = self.source.read_raw(record_indices)
            stacked = self._decode_span(raw, allocate)
            positions = np.arange(start, stop, dtype=np.int64) + epoch * records_per_epoch
            if stacked is not None:
                return Chunk(stacked.arrays, positions, span)
            examples = self._decode_each(record_indices, raw)
            return Chunk(stack_if_uniform(examples), positions, span)
        examples: list[Any] = []
        positions = []
        for epoch, start, stop in segments:
            report_activity(0)
            record_indices = self.source.record_indices(epoch, start, stop)
            records = self._read_examples(record_indices)
            kept, kept_indices = self._apply_record_stages(epoch, start, record_indices, records)
            examples.extend(kept)
            positions.append(kept_indices + epoch * records_per_epoch)
        positions = positions[0] if len(positions) == 1 else np.concatenate(positions)
        return Chunk(stack_if_uniform(examples), positions, span)

    def unsendable_error(self, chunk: Chunk, error: Exception) -> StageError:
        """Names the stage and record whose value cannot be pickled to the parent process."""
        return unsendable_error(chunk, self._producer, self.source, error)

    @property
    def activities(self) -> list[str]:
        """What the codes given to `report_activity` mean: reading, then stage k at k + 1."""
        stages = [f"stage {k} ({stage.name})" for k, stage in enumerate(self.record_stages)]
        return ["reading and decoding records", *stages]

    def _read_examples(self, record_indices: np.ndarray) -> list[Any]:
        """The decoded records, per record dicts (views of a span stacked at once if possible)."""
        if self._decode_span is None:
            return self.source.read_records(record_indices)
        raw = self.source.read_raw(record_indices)
        stacked = self._decode_span(raw)
        if stacked is not None:
            return stacked.examples()
        return self._decode_each(record_indices, raw)

    def _decode_each(self, record_indices: np.ndarray, raw: list[bytes]) -> list[Any]:
        """Records of mixed layouts, decoded one by one; on failure the source reads them again
        and raises its error naming the file and record."""
        try:
            return [decode(data) for data in raw]
        except Exception:
            return self.source.read_records(record_indices)

    def _epoch_segments(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(epoch, first index, stop index) of the parts of [start, stop) in each epoch."""
        records_per_epoch = self.source.records_per_epoch
        while start < stop:
            epoch, index = divmod(start, records_per_epoch)
            count = min(stop - start, records_per_epoch - index)
            yield epoch, index, index + count
            start += count

    def _apply_record_stages(
        self, epoch: int, start: int, record_indices: np.ndarray, examples: list[Any]
    ) -> tuple[list[Any], np.ndarray]:
        """The examples every stage kept, transformed, and their indices in the epoch."""
        positions = np.arange(start, start + len(examples))
        for stage_position, stage in enumerate(self.record_stages):
            done = 0
            report_activity(stage_position + 1)
            try:
                if isinstance(stage, Map):
                    fn = stage.fn
                    for done, example in enumerate(examples):
                        examples[done] = fn(example)
                elif isinstance(stage, MapWithIndex):
                    fn = stage.fn
                    for done, record_id in enumerate(record_indices.tolist()):
                        examples[done] = fn(record_id, examples[done])
                elif isinstance(stage, RandomMap):
                    fn, rng = stage.fn, self._rngs[stage_position]
                    for done, record_id in enumerate(record_indices.tolist()):
                        examples[done] = fn(examples[done], rng.for_record(epoch, record_id))
                elif isinstance(stage, Filter):
                    keep = np.zeros(len(examples), dtype=bool)
                    for done, example in enumerate(examples):
                        keep[done] = bool(stage.predicate(example))
                    examples = [e for e, k in zip(examples, keep.tolist(), strict=True) if k]
                    positions, record_indices = positions[keep], record_indices[keep]
            except self._catch as error:
                raise StageError(
                    f"stage {stage_position} ({stage.name}) failed on record "
                    f"{record_indices[done]} (epoch {epoch}, position {positions[done]}): "
                    f"{error!r}"
                ) from error
        require_records(examples, self._producer, epoch, record_indices, positions)
        return examples, positions


def open_record_path(
    open_source: Callable[[], RecordSource],
    record_stages: Sequence[Stage],
    rng_seed: int,
    records_per_epoch: int,
) -> RecordPath:
    """A worker's RecordPath over its own copy of the source (file readers cannot be pickled)."""
    source = open_source()
    if source.records_per_epoch != records_per_epoch:
        raise DataSourceError(
            f"a worker process found {source.records_per_epoch} records per epoch where the "
            f"pipeline's source has {records_per_epoch}; did the data files change?"
        )
    return RecordPath(source, record_stages, rng_seed, in_worker=True)
