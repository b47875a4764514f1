"""The state of a pipeline's operators (bare nnx.Modules run on whole batches, as in Datarax):
the user's modules hold exactly the state after the last batch the caller received.

An iterator runs private copies of the modules (`working_copies`), which a prefetch thread may
run batches ahead. A snapshot of the copies' Variables travels with each batch and is written
into the user's modules on the caller's thread as the batch is handed over (`delivered`), so
reading a module after `next()` never depends on thread timing, and a new iterator copies the
modules as they are then.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resumax.errors import StateMismatchError

# Values of the modules' Variables: {path: value}, one dict per operator.
Snapshot = list[dict[str, Any]]


def _leaves(module: nnx.Module) -> tuple[dict[str, Any], Any]:
    """{path: value} of the module's Variables, and the tree structure to rebuild them."""
    pure = nnx.to_pure_dict(nnx.state(module))
    flat, treedef = jax.tree_util.tree_flatten_with_path(pure)
    return {jax.tree_util.keystr(path): value for path, value in flat}, treedef


def _copy(value: Any) -> Any:
    """JAX arrays are immutable; numpy arrays are copied so later in-place updates miss them."""
    return np.array(value) if isinstance(value, np.ndarray) else value


def _to_json(value: Any) -> dict[str, Any]:
    """A Variable's value as JSON: dtype, shape and values (a PRNG key as its key data)."""
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        data = np.asarray(jax.random.key_data(value))
        return {"key_impl": str(jax.random.key_impl(value)), "shape": list(data.shape),
                "data": data.tolist()}  # fmt: skip
    array = np.asarray(value)
    return {"dtype": array.dtype.str, "shape": list(array.shape), "data": array.tolist()}


def _from_json(entry: Any, like: Any, where: str) -> Any:
    """The value stored by `_to_json`, of the same kind as `like` (the module's current value)."""
    try:
        if "key_impl" in entry:
            data = np.asarray(entry["data"], dtype=np.uint32).reshape(entry["shape"])
            return jax.random.wrap_key_data(data, impl=entry["key_impl"])
        array = np.asarray(entry["data"], dtype=np.dtype(entry["dtype"])).reshape(entry["shape"])
    except (KeyError, TypeError, ValueError) as error:
        raise StateMismatchError(f"pipeline state {where} is malformed ({error!r})") from error
    current = np.asarray(like)
    if (current.dtype, current.shape) != (array.dtype, array.shape):
        raise StateMismatchError(
            f"pipeline state {where} is {array.dtype}{list(array.shape)} but the module holds "
            f"{current.dtype}{list(current.shape)}"
        )
    if isinstance(like, jax.Array):
        return jnp.asarray(array)
    if isinstance(like, np.ndarray):
        return array
    return array.item() if array.shape == () else array


def _clone(module: nnx.Module) -> nnx.Module:
    """A copy of `module` sharing no Variable and no numpy array with it."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(_copy, state))


def _assign(module: nnx.Module, values: dict[str, Any]) -> None:
    """Sets the module's Variables to `values` ({path: value}, as `_leaves` names them)."""
    current, treedef = _leaves(module)
    leaves = [_copy(values[path]) for path in current]
    state = nnx.state(module)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, leaves))
    nnx.update(module, state)


class OperatorStates:
    """The Variables of a pipeline's operator stages: working copies, snapshots, JSON."""

    def __init__(self, operators: list[tuple[int, nnx.Module]]):
        """`operators`: (stage position, module) of each operator stage, in stage order."""
        self._operators = operators

    def __bool__(self) -> bool:
        return bool(self._operators)

    def working_copies(self) -> dict[int, nnx.Module]:
        """Copies of the modules as they are now, by stage position, for one iterator to run."""
        return {position: _clone(module) for position, module in self._operators}

    @staticmethod
    def snapshot(modules: dict[int, nnx.Module]) -> Snapshot | None:
        """The Variables' current values of `modules` (None without operators); no conversion."""
        if not modules:
            return None
        return [
            {path: _copy(value) for path, value in _leaves(module)[0].items()}
            for module in modules.values()
        ]

    def delivered(self, snapshot: Snapshot | None) -> None:
        """Sets the user's modules to the snapshot taken after the batch just handed over."""
        if snapshot is None:
            return
        for (_, module), values in zip(self._operators, snapshot, strict=True):
            _assign(module, values)

    def to_json(self) -> list[dict[str, Any]]:
        """The modules' Variables, JSON-safe: per operator its stage, class and Variables."""
        return [
            {
                "stage": position,
                "name": type(module).__name__,
                "variables": {path: _to_json(value) for path, value in _leaves(module)[0].items()},
            }
            for position, module in self._operators
        ]

    def parse(self, saved: Any) -> Snapshot | None:
        """A snapshot from `to_json` output; StateMismatchError naming what does not fit."""
        if not self._operators and saved is None:
            return None
        expected = [(position, type(module).__name__) for position, module in self._operators]
        if not isinstance(saved, list) or not all(isinstance(entry, dict) for entry in saved):
            raise StateMismatchError(
                f"pipeline state field 'operators' is {saved!r} but this pipeline has the "
                f"operator stages {expected}; the state was saved for other stages"
            )
        found = [(entry.get("stage"), entry.get("name")) for entry in saved]
        if found != expected:
            raise StateMismatchError(
                f"pipeline state field 'operators' holds the operator stages {found} but this "
                f"pipeline has {expected}"
            )
        snapshot = []
        for (position, module), entry in zip(self._operators, saved, strict=True):
            current = _leaves(module)[0]
            variables = entry.get("variables")
            if not isinstance(variables, dict) or set(variables) != set(current):
                raise StateMismatchError(
                    f"pipeline state of operator stage {position} ({type(module).__name__}) has "
                    f"the Variables {sorted(variables or ())} but the module has {sorted(current)}"
                )
            snapshot.append(
                {
                    path: _from_json(variables[path], like, f"operator {position} {path}")
                    for path, like in current.items()
                }
            )
        return snapshot

    def restore(self, snapshot: Snapshot | None) -> None:
        """Sets the user's modules to a parsed snapshot (`parse`)."""
        self.delivered(snapshot)
