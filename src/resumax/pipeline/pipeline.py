"""`Pipeline`: read -> stages -> batch -> device -> prefetch, with a state that describes exactly
the batches the caller has received.

Reading top to bottom follows a record. The stream of positions (epoch * records_per_epoch +
index) is cut into spans of `batch_size` positions. `RecordPath` reads a span's records, decodes
them, runs the per-record stages and stacks what they keep, in this process or in worker
processes. The kept records are cut into batches, batch stages run and the batch is placed on
devices, a background thread keeps `prefetch` batches ready, and `PipelineIterator` advances the
position only when it hands a batch to the caller.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from resumax import order
from resumax.errors import ConfigError, StageError
from resumax.pipeline.batching import BatchFields, Chunk, Piece, batch_positions, combine
from resumax.pipeline.device import check_sharding, put_batch
from resumax.pipeline.iterator import ActiveIterator, Delivery, PipelineIterator
from resumax.pipeline.options import process_shard, seed_from_rngs, worker_group_size
from resumax.pipeline.packing import WindowPacker, open_window_packer, row_batches, split_packing
from resumax.pipeline.pipeline_state import PipelineState
from resumax.pipeline.prefetch import Prefetcher
from resumax.pipeline.provenance import BatchRecords, Jump, add_jump
from resumax.pipeline.record_path import RecordPath, open_record_path
from resumax.pipeline.stream_checks import (
    FilterStarvation,
    describe_records,
    require_batch,
    watch_windows,
)
from resumax.sources.base import DataPosition, RecordSource
from resumax.sources.record_ref import RecordRef
from resumax.sources.state_files import StateFileCheckpointable
from resumax.stages.operators import OperatorStates
from resumax.stages.transforms import BatchMap, Filter, Operator, as_stage
from resumax.workers.pool import WorkerPool
from resumax.workers.worker import check_worker_timeout, require_picklable

DEFAULT_PREFETCH = 2


# The pipeline: spans -> RecordPath chunks -> batches -> devices -> prefetch -> caller ----


# Not a JAX pytree: Orbax v1 rebuilds the pytrees it loads into, so it would restore a copy
# and leave this pipeline where it was.
class Pipeline(PipelineState, StateFileCheckpointable, nnx.Module, pytree=False):
    """Batches of a source's records after per-record and per-batch stages.

    Args:
      source: a resumax source (`ArrayRecordSourceModule`, `MemorySource`).
      stages: callables (maps) and `Map` / `MapWithIndex` / `RandomMap` / `Filter` / `BatchMap`
        objects or Grain transforms, applied in order; batch stages (`BatchMap`, and bare
        `nnx.Module`s, whose Variables join the state) come after all per-record stages. A last
        `PackSequences` packs the records into rows of tokens (no batch stages then).
      batch_size: records per batch (> 0), or rows per batch with `PackSequences`.
      rngs: seeds `RandomMap` generators (with epoch and record index); an `nnx.Rngs` or an int.
      drop_remainder: in finite mode, drop the last batch if it is partial.
      num_workers: worker processes that read, decode and run the per-record stages (0: this
        process does). Their stage functions and the source's decode must be picklable (defined
        at module level), and a script that iterates needs an `if __name__ == "__main__":` guard.
      prefetch: batches a background thread keeps ready ahead of the caller (0: none).
      sharding: a `jax.sharding.Sharding`; batches then arrive as `jax.Array`s placed with it
        (each process passes its own rows). None keeps numpy arrays.
      shard_by_process: with several JAX processes, each reads a disjoint, contiguous slice of
        every global batch (`batch_size * process_count` records in the global order); False
        gives every process the whole stream.
      process_index: overrides `jax.process_index()` (for launchers that split data
        differently, and for tests).
      process_count: overrides `jax.process_count()`, likewise.
      worker_timeout: seconds a worker may take to answer before a WorkerError names it, its
        records and the stage it runs (None: wait, logging a warning every
        `resumax.workers.pool.WORKER_WAIT_WARNING_SECONDS`).

    Batches are identical for any num_workers and prefetch, and after a resume. Iterating
    continues from the current position; the state always describes the batches the caller has
    received, never those computed ahead. A new iterator ends the previous one.
    """

    def __init__(
        self,
        source: RecordSource,
        stages: Sequence[Any] = (),
        batch_size: int = 32,
        rngs: nnx.Rngs | int | None = None,
        drop_remainder: bool = False,
        *,
        num_workers: int = 0,
        prefetch: int = DEFAULT_PREFETCH,
        sharding: jax.sharding.Sharding | None = None,
        shard_by_process: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
        worker_timeout: float | None = None,
    ):
        if not isinstance(source, RecordSource):
            raise ConfigError(f"source must be a resumax source, got {type(source).__name__}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ConfigError(f"batch_size must be a positive int, got batch_size={batch_size!r}")
        for name, value in (("num_workers", num_workers), ("prefetch", prefetch)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be an int >= 0, got {name}={value!r}")
        check_worker_timeout(worker_timeout)
        stages, packing = split_packing(stages)
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
        self.num_workers = num_workers
        self.prefetch = prefetch
        self.worker_timeout = worker_timeout
        self.sharding = check_sharding(sharding)
        self.process_index, self.process_count = process_shard(
            shard_by_process, process_index, process_count
        )
        self._has_filter = any(isinstance(stage, Filter) for stage in stages)
        self.batches_emitted = DataPosition(0)
        self._record_path = RecordPath(source, stages[:first_batch_stage], self.rng_seed)
        self._batch_stages = stages[first_batch_stage:]
        self._first_batch_stage = first_batch_stage
        self.operator_states = OperatorStates(
            [(i, s.fn) for i, s in enumerate(stages) if isinstance(s, Operator)]
        )
        self._packing = packing
        if packing is not None and self._batch_stages:
            raise ConfigError("PackSequences must be the last stage, after every BatchMap stage")
        self.packed_rows = DataPosition(0)
        self._worker_recipe = self._make_worker_recipe() if num_workers else None
        span = self._packing.window if self._packing is not None else self.batch_size
        self._max_group = worker_group_size(
            self.batch_size,
            span * self.process_count,
            grouped=self._packing is None and not self._record_path.record_stages,
            prefetch=self.prefetch,
            num_workers=self.num_workers,
            read_ahead_limit=self.source.read_ahead_limit(),
        )
        self._active = ActiveIterator()
        self._jumps: tuple[Jump, ...] = ()
        self._batch_records = BatchRecords(
            source,
            self._record_path,
            packing,
            batch_size,
            (self.process_index, self.process_count),
            drop_remainder=self.drop_remainder,
            has_filter=self._has_filter,
        )

    def _make_worker_recipe(self) -> Callable[[], RecordPath]:
        """What each worker runs once: open the source again and build its RecordPath.

        Checked here, so that a stage that cannot reach a worker fails at construction.
        """
        record_stages = self._record_path.record_stages
        for position, stage in enumerate(record_stages):
            require_picklable(stage, f"stage {position} ({stage.name})")
        reopen = self.source.reopener()
        require_picklable(reopen, f"the source ({reopen!r})")
        recipe = functools.partial(
            open_record_path, reopen, record_stages, self.rng_seed, self.source.records_per_epoch
        )
        if self._packing is not None:
            return functools.partial(open_window_packer, recipe, self._packing)
        return recipe

    def __iter__(self) -> PipelineIterator:
        """Batches from the current position: spans -> chunks -> batches -> prefetch -> caller."""
        self._active.close()
        self.source.check_open()  # workers read through their own copies: check here
        working = self.operator_states.working_copies()
        records_per_epoch = self.source.records_per_epoch
        epoch, index = self.source.position
        num_epochs = self.source.config.num_epochs
        end = None if num_epochs == -1 else num_epochs * records_per_epoch
        start = epoch * records_per_epoch + index
        task: Callable[[tuple[int, int]], Any] = self._record_path
        if self._packing is not None:
            span_stream = self._packing.window_spans(start, end)
            task = WindowPacker(self._record_path, self._packing)
        elif self.process_count == 1:
            span_stream = order.spans(start, self.batch_size, end)
        else:
            span_stream = order.process_spans(
                start,
                self.batch_size,
                self.process_index,
                self.process_count,
                end,
                aligned=self._has_filter,
            )
        span_stream = self.source.spans_ready(span_stream)
        pool = None
        if self._worker_recipe is not None:
            pool = WorkerPool(
                self._worker_recipe,
                self.num_workers,
                timeout=self.worker_timeout,
                activities=self._record_path.activities,
                describe_task=lambda span: f"the records at positions [{span[0]}, {span[1]})",
            )
            chunks = pool.map(span_stream, self._max_group)  # see worker_group_size
        else:
            chunks = map(task, span_stream)
        if self._packing is not None:
            deliveries = self._packed_deliveries(chunks, start, end)
        else:
            deliveries = self._deliveries(chunks, start, end, working)
        prefetcher = Prefetcher(deliveries, self.prefetch) if self.prefetch else None
        iterator = PipelineIterator(
            self._receive,
            prefetcher or deliveries,
            pool,
            prefetcher,
            getattr(span_stream, "stop_reading", None),
        )
        self._active.set(iterator)
        return iterator

    def _batch_functions(self, working: dict[int, nnx.Module]) -> list[tuple[str, Callable]]:
        """(name, function) of each batch stage, an operator stage running its working copy
        (`OperatorStates.working_copies`) instead of the user's module."""
        return [
            (stage.name, working.get(position, stage.fn))
            for position, stage in enumerate(self._batch_stages, start=self._first_batch_stage)
        ]

    def _deliveries(
        self,
        chunks: Iterator[Chunk],
        start: int,
        end: int | None,
        working: dict[int, nnx.Module],
    ) -> Iterator[Delivery]:
        """Cuts the kept records into batches, each with the position after its last record.

        A finite run ends with its last partial batch (unless drop_remainder) and then a
        Delivery(None) that moves the position to the end. Across processes without a Filter,
        the position after a batch is the end of its global batch, the same on every process;
        a last partial global batch is dropped, so that every process gets as many batches.
        """
        global_batch = self.batch_size * self.process_count
        to_window_end = self.process_count > 1 and not self._has_filter
        records_per_epoch = self.source.records_per_epoch
        starvation = FilterStarvation(
            self._record_path.record_stages, records_per_epoch, start, end
        )
        fields = BatchFields(functools.partial(describe_records, self.source))
        batch_functions = self._batch_functions(working)
        pieces: list[Piece] = []
        pending = 0
        for chunk in chunks:
            starvation.observe(chunk.span, chunk.positions)
            taken = 0
            while taken < len(chunk):
                take = min(self.batch_size - pending, len(chunk) - taken)
                pieces.append((chunk, taken, taken + take))
                pending, taken = pending + take, taken + take
                if pending == self.batch_size:
                    after = int(chunk.positions[taken - 1]) + 1
                    if to_window_end:
                        after = order.window_end(after - 1, start, global_batch)
                    batch = self._finish_batch(pieces, fields, batch_functions)
                    yield self._delivery(batch, after, working)
                    pieces, pending = [], 0
        if end is not None:
            keep_last = pieces and not self.drop_remainder and self.process_count == 1
            last = self._finish_batch(pieces, fields, batch_functions) if keep_last else None
            yield self._delivery(last, end, working)

    def _packed_deliveries(
        self, windows: Iterator[dict[str, np.ndarray]], start: int, end: int | None
    ) -> Iterator[Delivery]:
        """Batches of packed rows, each with the (window, rows delivered) after its global batch."""
        window = self._packing.window
        starvation = FilterStarvation(
            self._record_path.record_stages, self.source.records_per_epoch, start, end
        )
        batches = row_batches(
            watch_windows(windows, starvation, start // window, window),
            start // window,
            self.packed_rows.get_value(),
            self.batch_size,
            self.process_index,
            self.process_count,
            keep_last=end is not None and not self.drop_remainder and self.process_count == 1,
        )
        for batch, window_index, rows in batches:
            if self.sharding is not None:
                batch = put_batch(batch, self.sharding)
            position = window_index * window if end is None else min(window_index * window, end)
            yield self._delivery(batch, position, {}, rows)
        if end is not None:
            yield self._delivery(None, end, {}, 0)

    def _finish_batch(
        self, pieces: list[Piece], fields: BatchFields, batch_functions: list[tuple[str, Callable]]
    ) -> Any:
        """Combines the pieces, runs the batch stages and places the batch on devices."""
        describe = functools.partial(describe_records, self.source)
        batch = combine(pieces, describe)
        fields.check(batch, pieces)
        for name, function in batch_functions:
            try:
                batch = function(batch)
            except Exception as error:
                raise StageError(f"batch stage ({name}) failed: {error!r}") from error
            require_batch(batch, name, lambda: describe(batch_positions(pieces)))
        if self.sharding is not None:
            batch = put_batch(batch, self.sharding)
        return batch

    def _delivery(
        self, batch: Any, position: int, working: dict[int, nnx.Module], packed_rows: int = 0
    ) -> Delivery:
        epoch, index = divmod(position, self.source.records_per_epoch)
        operators = OperatorStates.snapshot(working)
        return Delivery(batch, epoch, index, operators, packed_rows)

    def _receive(self, delivery: Delivery) -> None:
        """Moves the state past a batch as the caller receives it (on the caller's thread)."""
        self.source.seek(delivery.epoch, delivery.index)
        self.operator_states.delivered(delivery.operators)
        self.packed_rows.set_position(delivery.packed_rows)  # ints: see RecordSource.seek
        if delivery.batch is not None:
            self.batches_emitted.set_position(self.batches_emitted.get_raw_value() + 1)

    # Provenance and skips -----------------------------------------------------------------------

    def records_of_batch(
        self, batch_number: int, *, all_processes: bool = False
    ) -> list[list[RecordRef]]:
        """The records that form batch `batch_number`, one list per row of the batch.

        Batches are numbered as the state's `batches_emitted` counts them: 0 is the first batch
        of the run, skipped batches are not counted, and the batch may lie before or after the
        pipeline's position. A plain row is one record; a `PackSequences` row lists every
        record packed into it, in order. `all_processes=True` gives the rows of the global
        batch (every process's slice, in process order); the default, this process's rows.

        Nothing is read but, with PackSequences, the windows between the pipeline's position
        and the batch (re-packed as a restore does). A Filter makes the answer depend on the
        data: ConfigError. A batch past the end of a finite stream: ConfigError.
        """
        return self._batch_records.records_of_batch(
            batch_number, all_processes, self._batch_line(), self.packed_rows.get_value()
        )

    def skip(self, num_batches: int) -> None:
        """Moves ahead so that the next batch delivered is the one that would have come
        `num_batches` batches later; the skipped batches are never read (without packing, O(1)).

        The state records the skip (merged with one made just before), so a resume is exact and
        `records_of_batch` keeps its numbering. A live iterator is ended first: iterate again.
        Every process of a multi-process run must make the same skip. With PackSequences the
        windows skipped over are re-packed (read) to count their rows. With a Filter:
        ConfigError.
        """
        packed_rows = self.packed_rows.get_value()
        jump = self._batch_records.skip(num_batches, self._batch_line(), packed_rows)
        if num_batches == 0:
            return
        self._active.close()
        self._jumps = tuple(add_jump(list(self._jumps), jump))
        self.source.seek(*divmod(jump.stop, self.source.records_per_epoch))
        if jump.rows is not None:
            self.packed_rows.set_position(jump.rows[1])

    def close(self) -> None:
        """Ends the live iterator (its workers and prefetch thread) and closes the source."""
        self._active.close()
        self.source.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
