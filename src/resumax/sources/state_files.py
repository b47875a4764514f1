"""A data state on disk: `process_{i}-of-{n}.json` files in a checkpoint item directory, and
`StateFileCheckpointable`, the Orbax v1 `save` / `load` methods that sources and pipelines carry.

Only the file format lives here; the Orbax handler that puts these files in a checkpoint step is
`resumax.checkpoint`. Anything with `get_state()` / `set_state(state)` can be saved this way.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable
from typing import Any, Protocol

import jax
from etils import epath

from resumax.errors import CheckpointError, StateMismatchError

STATE_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


class HasState(Protocol):
    """What a state file holds the state of: a source or a pipeline."""

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any]) -> None: ...


def state_file_name(process_index: int, process_count: int) -> str:
    """`process_{i}-of-{n}.json`: one file per JAX process, so hosts never write the same file."""
    return f"process_{process_index}-of-{process_count}.json"


def own_state_file(directory: epath.Path) -> epath.Path:
    """This process's state file in `directory`."""
    return epath.Path(directory) / state_file_name(jax.process_index(), jax.process_count())


def snapshot(item: HasState) -> str:
    """The item's state as JSON text, taken now: later iteration does not change what is saved."""
    return json.dumps(item.get_state())


async def write_state(directory: epath.Path, text: str) -> None:
    """Writes this process's state file; runs in a background thread once `directory` exists.

    A write of a few hundred bytes: handing it to yet another thread would cost more than it.
    """
    own_state_file(directory).write_text(text)


def find_state_file(directory: epath.Path) -> epath.Path:
    """This process's state file in an item directory, or CheckpointError naming what is there.

    A checkpoint written with another process count has no file of this name. Every file holds
    the same global record position, so process 0's is read; splitting that position between the
    new processes is the pipeline's job (elastic resume), not this module's.
    """
    own = own_state_file(directory)
    if own.exists():
        return own
    directory = own.parent
    names = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    saved_counts = sorted({int(m[2]) for name in names if (m := STATE_FILE.fullmatch(name))})
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


def restore_into(item: HasState, directory: epath.Path) -> HasState:
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


class StateFileCheckpointable:
    """Orbax v1 `StatefulCheckpointable` for objects with `get_state` / `set_state`: each process
    writes its state file in the item directory (the same file the Orbax handler writes)."""

    async def save(self, directory: Any) -> Awaitable[None]:
        """Snapshots the state now; the returned awaitable writes it once `directory` exists."""
        text = snapshot(self)

        async def write() -> None:
            await write_state(await directory.await_creation(), text)

        return write()

    async def load(self, directory: Any) -> Awaitable[None]:
        """The returned awaitable reads this process's state file in `directory` and sets it."""
        return asyncio.to_thread(restore_into, self, directory)
