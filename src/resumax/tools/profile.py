"""Where a pipeline's time goes: each step of a record's path timed alone, the end-to-end rate for
each number of workers, and a one-line recommendation. Backs `resumax profile`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from resumax.errors import ConfigError, StageError
from resumax.pipeline import Pipeline
from resumax.pipeline.batch_decode import SpanDecoder
from resumax.pipeline.batching import stack_if_uniform
from resumax.pipeline.device import put_batch
from resumax.records import decode
from resumax.stages.transforms import Map, RandomMap, RecordRng, Stage

# Steps that run where the records are read (in workers when num_workers > 0).
_WORKER_STEPS = ("read", "decode", "read + decode")


@dataclasses.dataclass(frozen=True)
class StepTime:
    """The time one step of the path took over `records` records."""

    name: str
    seconds: float
    records: int

    @property
    def us_per_record(self) -> float:
        return 1e6 * self.seconds / max(self.records, 1)

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else float("inf")


@dataclasses.dataclass(frozen=True)
class ProfileReport:
    """Per-step times, end-to-end records/s by num_workers, and what to change."""

    steps: list[StepTime]
    end_to_end: dict[int, float]
    recommendation: str
    description: str

    def format(self) -> str:
        """The report as the table `resumax profile` prints."""
        total = sum(step.seconds for step in self.steps) or 1.0
        lines = [
            self.description,
            "",
            f"{'step':<34} {'us/record':>10} {'records/s':>12} {'share':>6}",
        ]
        for step in self.steps:
            lines.append(
                f"{step.name:<34} {step.us_per_record:>10.2f} {step.records_per_s:>12,.0f} "
                f"{100 * step.seconds / total:>5.0f}%"
            )
        lines += ["", f"{'end to end':<34} {'num_workers':>11} {'records/s':>12}"]
        for workers, rate in self.end_to_end.items():
            lines.append(f"{'':<34} {workers:>11} {rate:>12,.0f}")
        lines += ["", f"recommendation: {self.recommendation}"]
        return "\n".join(lines)


class _Timer:
    """Seconds and records accumulated per step name, in first-seen order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.records: dict[str, int] = {}

    def add(self, name: str, started: float, records: int) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        self.records[name] = self.records.get(name, 0) + records

    def steps(self) -> list[StepTime]:
        return [StepTime(name, self.seconds[name], self.records[name]) for name in self.seconds]


def _stage_label(stage: Stage) -> str:
    return f"{type(stage).__name__} {stage.name!r}"


def _apply_stage(
    stage: Stage, rng: RecordRng | None, epoch: int, indices: np.ndarray, examples: list[Any]
) -> tuple[list[Any], np.ndarray]:
    """A per-record stage over a span's examples, as the pipeline applies it."""
    if isinstance(stage, Map):
        return [stage.fn(example) for example in examples], indices
    if isinstance(stage, RandomMap):
        pairs = zip(examples, indices.tolist(), strict=True)
        fn = stage.fn
        return [fn(example, rng.for_record(epoch, index)) for example, index in pairs], indices
    keep = [bool(stage.predicate(example)) for example in examples]
    return [e for e, k in zip(examples, keep, strict=True) if k], indices[np.array(keep, bool)]


def _span_indices(pipeline: Pipeline) -> Iterator[tuple[int, np.ndarray]]:
    """(epoch, record indices) of the pipeline's spans from the start of epoch 0, forever."""
    source, size = pipeline.source, pipeline.batch_size
    epoch, start = 0, 0
    while True:
        stop = min(start + size, source.records_per_epoch)
        yield epoch, source.record_indices(epoch, start, stop)
        epoch, start = (epoch + 1, 0) if stop == source.records_per_epoch else (epoch, stop)


def time_steps(pipeline: Pipeline, seconds: float) -> list[StepTime]:
    """Runs the pipeline's path step by step in this process for about `seconds`.

    Steps: read, decode (resumax's batch-level decode, or one `read + decode` step for a custom
    decode), each per-record stage by name, batch (stacking), each BatchMap by name, and device
    put (onto the pipeline's sharding, or jax.device_put to the default device).
    """
    source = pipeline.source
    record_stages = pipeline._record_path.record_stages
    rngs = [
        RecordRng(pipeline.rng_seed, position) if isinstance(stage, RandomMap) else None
        for position, stage in enumerate(record_stages)
    ]
    decoder = SpanDecoder() if source.batch_decodable else None
    # Operators run on copies: profiling leaves the user's modules as they were.
    batch_functions = pipeline._batch_functions(pipeline.operator_states.working_copies())
    timer = _Timer()
    deadline = time.perf_counter() + seconds
    for epoch, indices in _span_indices(pipeline):
        if time.perf_counter() > deadline and timer.seconds:
            break
        started = time.perf_counter()
        if decoder is None:
            examples: Any = source.read_records(indices)
            timer.add("read + decode", started, len(indices))
        else:
            raw = source.read_raw(indices)
            timer.add("read", started, len(indices))
            started = time.perf_counter()
            stacked = decoder(raw)
            if stacked is None:  # records of several layouts: decoded one by one
                examples = [decode(data) for data in raw]
            else:
                examples = stacked.examples() if record_stages else stacked.arrays
            timer.add("decode", started, len(indices))
        for stage, rng in zip(record_stages, rngs, strict=True):
            started = time.perf_counter()
            count = len(examples)
            try:
                examples, indices = _apply_stage(stage, rng, epoch, indices, examples)
            except Exception as error:
                raise StageError(f"stage {_stage_label(stage)} failed: {error!r}") from error
            timer.add(_stage_label(stage), started, count)
        started = time.perf_counter()
        batch = examples if isinstance(examples, dict) else stack_if_uniform(examples)
        timer.add("batch", started, len(indices))
        if not isinstance(batch, dict):
            continue  # records that do not stack: batches of them are not put on devices
        for stage, (_, function) in zip(pipeline._batch_stages, batch_functions, strict=True):
            started = time.perf_counter()
            batch = function(batch)
            timer.add(_stage_label(stage), started, len(indices))
        started = time.perf_counter()
        if pipeline.sharding is not None:
            placed = put_batch(batch, pipeline.sharding)
        else:
            placed = jax.device_put(batch)
        jax.block_until_ready(placed)
        timer.add("device put", started, len(indices))
    return timer.steps()


def end_to_end_rates(
    pipeline: Pipeline, seconds: float, worker_counts: list[int]
) -> dict[int, float]:
    """Records/s of copies of the pipeline (same source files, stages, batch size, prefetch and
    sharding) with each number of workers, each run for about `seconds` after its first batch."""
    stages = [*pipeline._record_path.record_stages, *pipeline._batch_stages]
    rates = {}
    for num_workers in worker_counts:
        source = pipeline.source.reopener()()
        copy = Pipeline(
            source,
            stages,
            batch_size=pipeline.batch_size,
            rngs=pipeline.rng_seed,
            num_workers=num_workers,
            prefetch=pipeline.prefetch,
            sharding=pipeline.sharding,
            process_index=pipeline.process_index,
            process_count=pipeline.process_count,
        )
        records = 0
        with iter(copy) as batches:
            next(batches, None)
            started = time.perf_counter()
            while time.perf_counter() - started < seconds:
                batch = next(batches, None)
                if batch is None:
                    break
                records += len(next(iter(batch.values()))) if isinstance(batch, dict) else 0
            rates[num_workers] = records / (time.perf_counter() - started)
        if hasattr(source, "close"):
            source.close()
    return rates


def recommend(steps: list[StepTime], end_to_end: dict[int, float]) -> str:
    """One line: the costliest step and the fastest num_workers."""
    total = sum(step.seconds for step in steps) or 1.0
    top = max(steps, key=lambda step: step.seconds)
    share = f"{100 * top.seconds / total:.0f}%"
    label = top.name if " " in top.name and top.name[0].isupper() else f"{top.name} step"
    best = max(end_to_end, key=end_to_end.get)
    in_workers = top.name in _WORKER_STEPS or top.name.split()[0] in ("Map", "RandomMap", "Filter")
    speedup = end_to_end[best] / end_to_end[0] if end_to_end.get(0) else 1.0
    if best == 0:
        return (
            f"the {label} takes {share}: keep num_workers=0 (workers do not pay off here, "
            f"{end_to_end[0]:,.0f} records/s)"
        )
    where = "" if in_workers else " (it runs in the main process; workers take the rest)"
    return (
        f"the {label} takes {share}: use num_workers={best}{where} "
        f"({end_to_end[best]:,.0f} records/s, {speedup:.1f}x num_workers=0)"
    )


def profile_pipeline(
    pipeline: Pipeline, *, seconds: float = 2.0, max_workers: int | None = None
) -> ProfileReport:
    """Profiles the data side of `pipeline` for about `seconds` per measurement.

    The steps are timed alone in this process, then copies of the pipeline run end to end with
    num_workers 0..max_workers (default: the number of cores). The pipeline itself is not
    advanced. Sources that cannot be reopened in workers are measured with num_workers=0 only.
    """
    if not seconds > 0:
        raise ConfigError(f"seconds must be > 0, got {seconds!r}")
    cores = os.cpu_count() or 1
    max_workers = cores if max_workers is None else max_workers
    try:
        pipeline.source.reopener()
        worker_counts = list(range(max_workers + 1))
    except ConfigError:
        worker_counts = [0]
    steps = time_steps(pipeline, seconds)
    end_to_end = end_to_end_rates(pipeline, seconds, worker_counts)
    source = pipeline.source
    description = (
        f"resumax profile: {type(source).__name__} of {source.records_per_epoch:,} records, "
        f"batch_size {pipeline.batch_size}, {cores} cores, {seconds:g} s per measurement"
    )
    return ProfileReport(steps, end_to_end, recommend(steps, end_to_end), description)
