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

from resumax.errors import CheckpointError, ConfigError, StateMismatchError
from resumax.pipeline import Pipeline
from resumax.sources.base import RecordSource

Stateful = RecordSource | Pipeline
_STATE_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def state_file_name(process_index: int, process_count: int) -> str:
    """`process_{i}-of-{n}.json`: one file per JAX process, so hosts never write the same file."""
    return f"process_{process_index}-of-{process_count}.json"


def _own_state_file(directory: epath.Path) -> epath.Path:
    return epath.Path(directory) / state_file_name(jax.process_index(), jax.process_count())


def snapshot(item: Stateful) -> str:
    """The item's state as JSON text, taken now: later iteration does not change what is saved."""
    return json.dumps(item.get_state())


async def _write_state(directory: epath.Path, text: str) -> None:
    """Writes this process's state file; runs in a background thread once `directory` exists.

    A write of a few hundred bytes: handing it to yet another thread would cost more than it.
    """
    _own_state_file(directory).write_text(text)


def find_state_file(directory: epath.Path) -> epath.Path:
    """This process's state file in an item directory, or CheckpointError naming what is there.

    A checkpoint written with another process count has no file of this name. Every file holds
    the same global record position, so process 0's is read; splitting that position between the
    new processes is the pipeline's job (elastic resume), not this module's.
    """
    own = _own_state_file(directory)
    if own.exists():
        return own
    directory = own.parent
    names = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    saved_counts = sorted({int(m[2]) for name in names if (m := _STATE_FILE.fullmatch(name))})
    if not saved_counts:
        raise CheckpointError(
            f"no resumax data state in {directory} (expected {own.name}, found {names}); "
            "save the item with resumax.checkpoint.CheckpointSave"
        )
    fallback = directory / state_file_name(0, saved_counts[0])
    if jax.process_count() in saved_counts or not fallback.exists():
        raise CheckpointError(
            f"{own.name} is missing in {directory}, which holds {names}: the step is incomplete; "
            "restore an earlier step"
        )
    return fallback


def read_state(path: epath.Path) -> dict[str, Any]:
    """The JSON object stored in a state file; CheckpointError naming the file if it is not one."""
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read the resumax data state {path}: {error}") from error
    if not isinstance(state, dict):
        raise CheckpointError(
            f"the resumax data state {path} holds a JSON {type(state).__name__}, not an object"
        )
    return state


def restore_into(item: Stateful, directory: epath.Path) -> Stateful:
    """Reads this process's state file in `directory`, sets it on `item` and returns `item`.

    Raises StateMismatchError naming the file and the differing field when the state belongs to
    another dataset, seed or config, and CheckpointError when the file is missing or malformed.
    """
    path = find_state_file(directory)
    state = read_state(path)
    try:
        item.set_state(state)
    except StateMismatchError as error:
        raise StateMismatchError(f"{path}: {error}") from error
    return item


_SHARED_FIELDS = ("fingerprint", "num_records", "seed", "shuffle", "shuffle_window")


def check_process_states(directory: epath.Path, process_count: int) -> None:
    """Raises CheckpointError unless all `process_count` state files exist and agree on the data.

    Their positions may differ only for Filter pipelines, which refuse a restore with another
    process count themselves (see `Pipeline.set_state`).
    """
    states = [
        read_state(directory / state_file_name(i, process_count)) for i in range(process_count)
    ]
    first = states[0].get("source", states[0])
    for index, state in enumerate(states[1:], start=1):
        source_state = state.get("source", state)
        for field in _SHARED_FIELDS:
            if source_state.get(field) != first.get(field):
                raise CheckpointError(
                    f"{directory}: process {index} saved {field}={source_state.get(field)!r} but "
                    f"process 0 saved {first.get(field)!r}; every process must feed the same "
                    "dataset with the same seed"
                )


@dataclasses.dataclass(frozen=True)
class DataStateMetadata:
    """A saved data position as `CheckpointManager.item_metadata(step)` shows it.

    `batches_emitted` is None for a bare source; `process_count` is how many processes saved it.
    """

    current_epoch: int
    current_index: int
    batches_emitted: int | None
    num_records: int
    fingerprint: str
    process_count: int


def read_metadata(directory: epath.Path) -> DataStateMetadata:
    """The position stored in an item directory, read without the source or pipeline."""
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
        raise CheckpointError(f"{path} is not a resumax data state: it lacks {error}") from error


class DataStateHandler(ocp.AsyncCheckpointHandler):
    """Saves a source's or pipeline's state as `process_{i}-of-{n}.json` in its item directory.

    `async_save` snapshots the state on the calling thread and returns a commit future that writes
    the file once Orbax has created the (temporary) step directory: `mngr.save` does not wait for
    the disk, and the file becomes visible only when the whole step is committed.
    """

    async def async_save(
        self, directory: epath.Path, args: CheckpointSave
    ) -> list[ocp.future.Future]:
        write = _write_state(directory, snapshot(args.item))
        return [ocp.future.CommitFutureAwaitingContractedSignals(write, name="resumax_data")]

    def save(self, directory: epath.Path, args: CheckpointSave) -> None:
        _own_state_file(directory).write_text(snapshot(args.item))

    def restore(self, directory: epath.Path, args: CheckpointRestore | None = None) -> Stateful:
        """Sets the saved state on `args.item` and returns it."""
        if args is None:
            raise CheckpointError(
                f"restoring the resumax data state in {directory} needs the object to restore "
                "into: pass args=resumax.checkpoint.CheckpointRestore(pipeline_or_source)"
            )
        return restore_into(args.item, directory)

    def metadata(self, directory: epath.Path) -> DataStateMetadata:
        return read_metadata(directory)

    def finalize(self, directory: epath.Path) -> None:
        """Checks, once all processes have written, that the step can restore elsewhere.

        A restore with another process count reads process 0's file alone, so every process
        must have written its file, for the same dataset and seeds. Raising here keeps the step
        from being committed.
        """
        check_process_states(epath.Path(directory), jax.process_count())

    @classmethod
    def typestr(cls) -> str:
        return "resumax.DataStateHandler"


def _check_stateful(item: Any) -> None:
    if not isinstance(item, Stateful):
        raise ConfigError(
            "resumax checkpoint args take an ArrayRecordSourceModule, another resumax source or a "
            f"Pipeline, got {type(item).__name__}"
        )


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


async def save_v1(item: Stateful, directory: ocp.v1.path.PathAwaitingCreation) -> Awaitable[None]:
    """Orbax v1 `StatefulCheckpointable.save`: snapshots now; the awaitable writes the file."""
    text = snapshot(item)

    async def write() -> None:
        await _write_state(await directory.await_creation(), text)

    return write()


async def load_v1(item: Stateful, directory: epath.Path) -> Awaitable[None]:
    """Orbax v1 `StatefulCheckpointable.load`: the awaitable reads the file and sets the state."""
    return asyncio.to_thread(restore_into, item, directory)
