"""`resumax state` and `resumax batches`: a training run's data position and the records of its
batches, read from the checkpoint's data item and the run's config alone (no model, no params).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from resumax.errors import CheckpointError, ConfigError
from resumax.pipeline import Pipeline
from resumax.sources import MixtureSource
from resumax.sources.record_ref import RecordRef
from resumax.sources.state_files import find_state_file, read_state
from resumax.train.config import Config, load_config
from resumax.train.recovery import checkpoint_steps

DATA_ITEM = "data"
_PREVIEW = 12  # values (or characters / 4) of a field shown by --show


def locate_run(path: str) -> tuple[str, Config | None]:
    """(checkpoint directory, the run's config or None) of a run directory or its checkpoint
    directory."""
    if not os.path.isdir(path):
        raise ConfigError(f"{path!r} is not a directory: give a run directory or its checkpoints")
    parent = os.path.dirname(os.path.abspath(path))
    for run_dir, directory in ((path, os.path.join(path, "checkpoints")), (parent, path)):
        if checkpoint_steps(directory):
            config_file = os.path.join(run_dir, "config.yaml")
            config = load_config(config_file) if os.path.isfile(config_file) else None
            return directory, config
    raise CheckpointError(
        f"no committed checkpoint step in {path!r} or {os.path.join(path, 'checkpoints')!r}"
    )


def saved_data_state(directory: str, step: int | None) -> tuple[int, dict[str, Any]]:
    """(step, the pipeline state saved in it): the latest step unless `step` is given."""
    steps = checkpoint_steps(directory)
    if step is None:
        step = steps[-1] if steps else None
    if step not in steps:
        raise CheckpointError(
            f"step {step} is not a committed checkpoint in {directory!r} (steps: {steps or 'none'})"
        )
    item = epath.Path(directory) / str(step) / DATA_ITEM
    return step, read_state(find_state_file(item))


def build_pipeline(config: Config, state: dict[str, Any] | None) -> Pipeline:
    """The run's training pipeline (one process standing for all: the saved process count),
    restored to `state` when given; nothing is read but what the source needs to open."""
    from resumax.train.loop import make_task

    task = make_task(config)
    process_count = state.get("process_count", 1) if state is not None else None
    pipeline = task.build_pipeline(None, process_count=process_count, check_data=False)
    if state is not None:
        pipeline.set_state(state)
    return pipeline


def rows_json(rows: list[list[RecordRef]]) -> list[list[dict[str, Any]]]:
    keys = ("path", "record", "epoch", "position", "source", "index")
    return [[{key: getattr(ref, key) for key in keys} for ref in row] for row in rows]


def describe_state(step: int, state: dict[str, Any], pipeline: Pipeline | None) -> list[str]:
    """The saved data state in words, one line each."""
    source = state["source"]
    per_epoch = source["num_records"]
    index = source["current_index"]
    lines = [f"step {step}: {state['batches_emitted']} batches delivered"]
    if pipeline is not None:
        paths = getattr(pipeline.source, "paths", None)
        if isinstance(pipeline.source, MixtureSource):
            paths = {n: getattr(s, "paths", None) for n, s in pipeline.source.components.items()}
        lines.append(f"dataset: {_dataset_words(paths, pipeline)}")
    lines.append(f"fingerprint: {source['fingerprint']}")
    lines.append(
        f"position: epoch {source['current_epoch']}, record {index} of {per_epoch} "
        f"({100 * index / per_epoch:.1f}% of the epoch; global position "
        f"{source['current_epoch'] * per_epoch + index}); seed {source['seed']}, "
        f"shuffle {source['shuffle']}"
    )
    if isinstance(getattr(pipeline, "source", None), MixtureSource):
        mixture = pipeline.source
        draws = mixture.draws_before(source["current_epoch"] * per_epoch + index).tolist()
        counts = ", ".join(
            f"{name} {count} (weight {mixture.weights[name]})"
            for name, count in zip(mixture.names, draws, strict=True)
        )
        lines.append(f"mixture: records served per component: {counts}")
    packing = state.get("packing")
    if packing is not None:
        lines.append(
            "  (with packing the position is the current window's start; rows delivered below)"
        )
        lines.append(
            f"packing: window {packing['window_index']} of {packing['window']} records, "
            f"{packing['rows_delivered']} rows of it delivered (rows of {packing['length']} "
            f"tokens of {packing['fields']})"
        )
    skips = state.get("skips", [])
    for jump in skips:
        first, last = jump["positions"]
        if jump["batches"]:
            lines.append(
                f"skip: after batch {jump['batch']}, {jump['batches']} batches (global "
                f"positions {first}..{last})"
            )
        else:
            lines.append(
                f"resumed at batch {jump['batch']} on another layout (before: batch size "
                f"{jump['batch_size']} x {jump['process_count']} processes)"
            )
    if not skips:
        lines.append("skips: none")
    processes = state.get("process_count")
    lines.append(
        f"batch size {state.get('batch_size')} per process x {processes} "
        f"process{'es' if processes != 1 else ''}"
    )
    return lines


def show_record(pipeline: Pipeline, ref: RecordRef) -> str:
    """The record's fields as `name dtype shape: preview`; byte tokens as text."""
    source = pipeline.source
    epoch, offset = divmod(ref.position, source.records_per_epoch)
    (record,) = source.read_records(source.record_indices(epoch, offset, offset + 1))
    parts = []
    for name, value in record.items() if isinstance(record, dict) else [("record", record)]:
        array = np.asarray(value)
        parts.append(f"{name} {array.dtype} {list(array.shape)}: {_preview(array)}")
    return "; ".join(parts)


def _dataset_words(paths: Any, pipeline: Pipeline) -> str:
    """The files of the source (of each component): their count, first and last."""
    if paths is None:
        return type(pipeline.source).__name__
    if isinstance(paths, dict):
        return "; ".join(f"{name}: {_dataset_words(p, pipeline)}" for name, p in paths.items())
    if len(paths) <= 2:
        return ", ".join(paths)
    return f"{len(paths)} files, {paths[0]} ... {paths[-1]}"


def _preview(array: np.ndarray) -> str:
    byte_tokens = array.dtype.kind in "iu" and array.ndim == 1 and array.size > 1
    if byte_tokens and array.min() >= 0 and array.max() < 256:
        text = bytes(array.astype(np.uint8).tolist()).decode("utf-8", errors="replace")
        return json.dumps(text[: 4 * _PREVIEW] + ("..." if len(text) > 4 * _PREVIEW else ""))
    if array.ndim == 0:
        return str(array.item())
    flat = array.reshape(-1)[:_PREVIEW].tolist()
    shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in flat)
    return f"[{shown}{', ...' if array.size > _PREVIEW else ''}]"


def state_command(path: str, step: int | None, as_json: bool) -> str:
    """What `resumax state PATH [--step N] [--json]` prints."""
    directory, config = locate_run(path)
    step, state = saved_data_state(directory, step)
    pipeline = build_pipeline(config, state) if config is not None else None
    next_batch = None
    if pipeline is not None:
        next_batch = pipeline.records_of_batch(state["batches_emitted"], all_processes=True)
    if as_json:
        rows = rows_json(next_batch) if next_batch is not None else None
        return json.dumps({"step": step, "state": state, "next_batch": rows}, indent=2)
    lines = describe_state(step, state, pipeline)
    if next_batch is None:
        lines.append("next batch: unknown (no config.yaml beside the checkpoints)")
    else:
        lines.append(f"next batch (batch {state['batches_emitted']}, step {step + 1}):")
        lines += [f"  row {i}: {_row_words(row)}" for i, row in enumerate(next_batch)]
    return "\n".join(lines)


def _row_words(row: Sequence[RecordRef]) -> str:
    words = []
    for ref in row:
        where = f"{ref.path} record {ref.record}" if ref.path else f"item {ref.record}"
        named = f"{ref.source}: " if ref.source else ""
        words.append(f"{named}{where} (epoch {ref.epoch}, position {ref.position})")
    return "; ".join(words)


def batches_command(config: Config, step: int, count: int, as_json: bool, show: bool) -> str:
    """What `resumax batches --config CFG --step N [--count K] [--json] [--show]` prints: the
    records steps N .. N+K-1 train on (step s: batch s - 1), with the skips of the run's latest
    checkpoint."""
    directory = os.path.abspath(config.train.checkpoint_dir)
    state = saved_data_state(directory, None)[1] if checkpoint_steps(directory) else None
    pipeline = build_pipeline(config, state)
    found = [
        (s, pipeline.records_of_batch(s - 1, all_processes=True)) for s in range(step, step + count)
    ]
    if as_json:
        return json.dumps([{"step": s, "rows": rows_json(rows)} for s, rows in found], indent=2)
    lines = []
    for s, rows in found:
        lines.append(f"step {s} (batch {s - 1}): {len(rows)} rows")
        for i, row in enumerate(rows):
            lines.append(f"  row {i}: {_row_words(row)}")
            if show:
                lines += [f"    {show_record(pipeline, ref)}" for ref in row]
    return "\n".join(lines)
