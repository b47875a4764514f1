"""Orbax integration: a source's or pipeline's position as one item of a checkpoint step.

Importing it registers `CheckpointSave` / `CheckpointRestore` with Orbax. The files it writes are
those of `resumax.sources.state_files`, whose Orbax v1 methods sources and pipelines also carry.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from resumax.errors import CheckpointError, ConfigError
from resumax.pipeline import Pipeline
from resumax.sources.base import RecordSource
from resumax.sources.state_files import (
    STATE_FILE,
    find_state_file,
    own_state_file,
    read_state,
    restore_into,
    snapshot,
    state_file_name,
    write_state,
)

Stateful = RecordSource | Pipeline


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
            process_count=int(STATE_FILE.fullmatch(path.name)[2]),
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
        write = write_state(directory, snapshot(args.item))
        return [ocp.future.CommitFutureAwaitingContractedSignals(write, name="resumax_data")]

    def save(self, directory: epath.Path, args: CheckpointSave) -> None:
        own_state_file(directory).write_text(snapshot(args.item))

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
