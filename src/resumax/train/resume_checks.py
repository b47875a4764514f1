"""Before a run restores a checkpoint step: is it the same model, and the same data order?
A difference is reported as the config key a user changed, not as Orbax's or the pipeline's terms.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from resumax.checkpoint import find_state_file, read_state
from resumax.errors import CheckpointError, StateMismatchError

# Fields of a saved pipeline state that a restore refuses to change, and the config key that
# sets each in the training app (see train.loop: the pipeline's rngs and source come from data.*).
_DATA_KEYS = {
    ("rng_seed",): "data.seed",
    ("source", "seed"): "data.seed",
    ("source", "shuffle"): "data.shuffle_files",
    ("source", "shuffle_window"): "data.shuffle_window",
    ("source", "num_records"): "data.train_paths",
    ("source", "fingerprint"): "data.train_paths",
}


def _shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path of str keys: shape} for every leaf; list indices and dict keys both become str."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    shapes = {}
    for path, leaf in flat:
        keys = tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        shapes[keys] = tuple(getattr(leaf, "shape", ()))
    return shapes


def check_same_model(step_dir: epath.Path, tree: Any) -> None:
    """Compares the array shapes in the checkpoint's `state` item with those of `tree` (the
    model and optimizer state about to be restored) and raises CheckpointError at the first
    differing parameter path, before Orbax reads any array."""
    handler = ocp.StandardCheckpointHandler()
    try:
        saved = _shapes(handler.metadata(step_dir / "state"))
    finally:
        handler.close()
    wanted = _shapes(tree)
    for path in sorted(saved.keys() | wanted.keys()):
        if saved.get(path) == wanted.get(path):
            continue
        name = ".".join(path)
        there = f"shape {saved[path]}" if path in saved else "no such array"
        here = f"shape {wanted[path]}" if path in wanted else "no such array"
        raise CheckpointError(
            f"step {step_dir.name} in {step_dir.parent} was written with another model: "
            f"{name} has {there} in the checkpoint but {here} in the model of this config. "
            "Resume with the model.* (and optimizer.*) settings it was written with, or set "
            "another train.run_dir to start a new run"
        )


def _field(state: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        state = state.get(key, {}) if isinstance(state, dict) else {}
    return state


def check_same_data(step_dir: epath.Path, current: dict[str, Any], config_values: dict) -> None:
    """Compares the data state saved in the checkpoint with the pipeline's `current` state and
    raises StateMismatchError naming the config key whose change makes them differ.

    `config_values` maps config keys (e.g. "data.seed") to their values in this run.
    """
    saved = read_state(find_state_file(step_dir / "data"))
    for path, key in _DATA_KEYS.items():
        before, now = _field(saved, path), _field(current, path)
        if before == now:
            continue
        if key == "data.train_paths":
            what = "record count" if path[-1] == "num_records" else "content fingerprint"
            change = (
                f"the files {key} matches ({config_values[key]!r}) differ from the ones it was "
                f"trained on ({what} {before!r} then, {now!r} now)"
            )
        else:
            change = f"it was written with {key}={before!r}, this config has {key}={now!r}"
        raise StateMismatchError(
            f"cannot resume step {step_dir.name} in {os.fspath(step_dir.parent)}: {change}. "
            f"Resume with the {key} it was written with, or set another train.run_dir to start "
            "a new run"
        )
