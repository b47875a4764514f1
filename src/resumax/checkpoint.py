"""Orbax integration: a source's or pipeline's position as one item of a checkpoint step.

Importing it registers `CheckpointSave` / `CheckpointRestore` with Orbax; sources and pipelines
also serve Orbax v1 directly: their `save` / `load` methods call `save_v1` / `load_v1` here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import Awaitable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from resumax.errors import CheckpointError, StateMismatchError
from resumax.pipeline import Pipeline
from resumax.sources.base import RecordSource

Stateful = RecordSource | Pipeline
_STATE_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def state_file_name(process_index: int, process_count: int) -> str:
    """`process_{i}-of-{n}.json`: one file per JAX process, so hosts never write the same file."""
    return f"process_{process_index}-of-{process_count}.json"


async def _write(path: epath.Path, text: str) -> None:
    """Runs in Orbax's commit thread, after the step directory exists."""
    path.write_text(text)


def _check_stateful(item: Any) -> None:
    if not isinstance(item, Stateful):
        raise CheckpointError(
            "resumax checkpoint args take an ArrayRecordSourceModule, another resumax source or a "
            f"Pipeline, got {type(item).__name__}"
        )


def snapshot(item: Stateful) -> str:
    """The item's state as JSON text, taken now: later iteration does not change what is saved."""
    return json.dumps(item.get_state())


def find_state_file(directory: epath.Path) -> epath.Path:
    """This process's state file in an item directory.

    A checkpoint written with another process count has no file of this name; its files all hold
    the same global record position, so process 0's is read. Splitting that position between a
    new number of processes is the pipeline's job (elastic resume), not this module's.
    """
    directory = epath.Path(directory)
    own = directory / state_file_name(jax.process_index(), jax.process_count())
    if own.exists():
        return own
    counts = sorted(
        {int(match[2]) for p in directory.iterdir() if (match := _STATE_FILE.fullmatch(p.name))}
        if directory.is_dir()
        else set()
    )
    if not counts:
        raise CheckpointError(
            f"no resumax data state in {directory}: expected {own.name}; was this item saved "
            "with resumax.checkpoint.CheckpointSave?"
        )
    if jax.process_count() in counts or not (directory / state_file_name(0, counts[0])).exists():
        raise CheckpointError(
            f"{own} is missing: the checkpoint was written by {counts} process(es) but this "
            "process's file was not; the step is incomplete, restore an earlier step"
        )
    return directory / state_file_name(0, counts[0])


def read_state(path: epath.Path) -> dict[str, Any]:
    """The JSON object stored in a state file; CheckpointError naming the file if it is not one."""
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read the resumax data state {path}: {error}") from error
    if not isinstance(state, dict):
        raise CheckpointError(
            f"the resumax data state {path} holds a {type(state).__name__}, not a JSON object"
        )
    return state


def restore_into(item: Stateful, directory: epath.Path) -> Stateful:
    """Reads this process's state file and sets it on `item`, which is returned.

    StateMismatchError (from `set_state`, naming the field, prefixed with the file) when the state
    belongs to another dataset, seed or config; CheckpointError when the file is missing or bad.
    """
    path = find_state_file(directory)
    state = read_state(path)
    try:
        item.set_state(state)
    except StateMismatchError as error:
        raise StateMismatchError(f"{path}: {error}") from error
    return item


@dataclasses.dataclass(frozen=True)
class DataStateMetadata:
    """What `CheckpointManager.item_metadata(step)` shows of a saved data position."""

    current_epoch: int
    current_index: int
    batches_emitted: int | None
    num_records: int
    fingerprint: str
    process_count: int


def read_metadata(directory: epath.Path) -> DataStateMetadata:
    """The position stored in an item directory, without needing the source or pipeline."""
    path = find_state_file(directory)
    state = read_state(path)
    source_state = state.get("source", state)
    try:
        return DataStateMetadata(
            current_epoch=source_state["current_epoch"],
            current_index=source_state["current_index"],
            batches_emitted=state.get("batches_emitted"),
            num_records=source_state["num_records"],
            fingerprint=source_state["fingerprint"],
            process_count=int(_STATE_FILE.fullmatch(path.name)[2]),
        )
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{path} is not a resumax data state: lacks {error}") from error


class DataStateHandler(ocp.AsyncCheckpointHandler):
    """Saves a source's or pipeline's state as `process_{i}-of-{n}.json` in its item directory.

    `async_save` snapshots the state on the calling thread and returns a commit future that writes
    the file once Orbax has created the (temporary) step directory, so `mngr.save` does not wait
    for the disk and the file is renamed into place together with the rest of the step.
    """

    async def async_save(
        self, directory: epath.Path, args: CheckpointSave
    ) -> list[ocp.future.Future]:
        text = snapshot(args.item)
        path = directory / state_file_name(jax.process_index(), jax.process_count())
        return [
            ocp.future.CommitFutureAwaitingContractedSignals(
                _write(path, text), name="resumax_data_state_save"
            )
        ]

    def save(self, directory: epath.Path, args: CheckpointSave) -> None:
        text = snapshot(args.item)
        (directory / state_file_name(jax.process_index(), jax.process_count())).write_text(text)

    def restore(self, directory: epath.Path, args: CheckpointRestore | None = None) -> Stateful:
        if args is None:
            raise CheckpointError(
                f"restoring the resumax data state in {directory} needs the object to restore "
                "into: pass args=resumax.checkpoint.CheckpointRestore(pipeline_or_source)"
            )
        return restore_into(args.item, directory)

    def metadata(self, directory: epath.Path) -> DataStateMetadata:
        return read_metadata(directory)

    @classmethod
    def typestr(cls) -> str:
        return "resumax.DataStateHandler"


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class CheckpointSave(ocp.args.CheckpointArgs):
    """Saves `item` (a resumax source or Pipeline) as the data item of a checkpoint step."""

    item: Stateful

    def __post_init__(self) -> None:
        _check_stateful(self.item)


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class CheckpointRestore(ocp.args.CheckpointArgs):
    """Restores the data item of a checkpoint step into `item` (a resumax source or Pipeline)."""

    item: Stateful

    def __post_init__(self) -> None:
        _check_stateful(self.item)


# Orbax v1 ------------------------------------------------------------------------------------


async def save_v1(item: Stateful, directory: Any) -> Awaitable[None]:
    """`StatefulCheckpointable.save`: snapshots now, writes once `directory` has been created."""
    text = snapshot(item)

    async def write() -> None:
        created = await directory.await_creation()
        path = created / state_file_name(jax.process_index(), jax.process_count())
        await asyncio.to_thread(path.write_text, text)

    return write()


async def load_v1(item: Stateful, directory: epath.Path) -> Awaitable[None]:
    """`StatefulCheckpointable.load`: reads and sets the state in the background."""

    async def read() -> None:
        await asyncio.to_thread(restore_into, item, directory)

    return read()
