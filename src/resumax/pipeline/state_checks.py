"""Checks of a saved pipeline state against the pipeline restoring it: field types, version,
seeds and, with a Filter, the process layout. Each failure is a StateMismatchError naming the field.
"""

from __future__ import annotations

from typing import Any

from resumax.errors import StateMismatchError

PIPELINE_STATE_VERSION = 1


def check_pipeline_state(state: Any, rng_seed: int, *, packs: bool) -> int:
    """Checks the pipeline's own fields of `state`; returns its `batches_emitted`.

    `packs`: whether the restoring pipeline ends with PackSequences.
    """
    if not isinstance(state, dict):
        raise StateMismatchError(f"a pipeline state must be a dict, got {type(state).__name__}")
    for field in ("version", "source", "batches_emitted", "rng_seed"):
        if field not in state:
            raise StateMismatchError(f"pipeline state lacks the field {field!r}; got {state!r}")
    for field in ("version", "rng_seed", "batch_size", "process_count"):
        value = state.get(field, 0)
        if type(value) is not int:  # 1.0 and True equal 1 to Python, not to a state
            raise StateMismatchError(
                f"pipeline state field {field!r} must be an int, got {value!r} "
                f"({type(value).__name__}); the state was edited or saved by other software"
            )
    if state["version"] != PIPELINE_STATE_VERSION:
        raise StateMismatchError(
            f"pipeline state field 'version' is {state['version']!r}; this resumax reads "
            f"version {PIPELINE_STATE_VERSION}"
        )
    if state["rng_seed"] != rng_seed:
        raise StateMismatchError(
            f"pipeline state field 'rng_seed' is {state['rng_seed']!r} but this pipeline has "
            f"{rng_seed!r}; build the pipeline with the same rngs to resume exactly"
        )
    batches = state["batches_emitted"]
    if not isinstance(batches, int) or isinstance(batches, bool) or batches < 0:
        raise StateMismatchError(f"pipeline state field 'batches_emitted' is {batches!r}")
    if not packs and "packing" in state:
        raise StateMismatchError(
            "pipeline state has a 'packing' entry (saved with PackSequences) but this "
            "pipeline does not pack; resume with the stages it was saved with"
        )
    return batches


def check_filter_layout(state: dict[str, Any], process_count: int, batch_size: int) -> None:
    """A Filter pipeline resumes only on the process layout it was saved with.

    Without a Filter the saved position is global and any process count can continue from
    it. With one, each process stops at its own position inside its slice of a global batch,
    and those positions do not carry over to another split of the batch.
    """
    saved = (state.get("process_count", 1), state.get("batch_size", batch_size))
    if saved == (process_count, batch_size) or saved[0] == process_count == 1:
        return
    field = "process_count" if saved[0] != process_count else "batch_size"
    current = {"process_count": process_count, "batch_size": batch_size}[field]
    raise StateMismatchError(
        f"pipeline state field {field!r} is {state.get(field)!r} but this pipeline has "
        f"{current!r}: a pipeline with a Filter stage keeps one position per "
        "process inside its slice of a global batch, so it resumes only with the process "
        "count and batch size it was saved with. Resume with those, or remove the Filter "
        "(filter the data offline) for elastic resume"
    )
