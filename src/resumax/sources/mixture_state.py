"""Reading a saved mixture state: its position, its weights as shares, and each component's
draws, every field checked (StateMismatchError naming the one at fault)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from resumax.errors import StateMismatchError
from resumax.sources import mixture_schedule as schedule
from resumax.sources.base import RecordSource

# Fields of a component's state that say which records it orders, and how.
COMPONENT_IDENTITY = ("fingerprint", "num_records", "seed", "shuffle", "shuffle_window")


def non_negative(value: Any, name: str) -> int:
    """`value` if it is an int >= 0; StateMismatchError naming the field `name` otherwise."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise StateMismatchError(f"mixture state field {name!r} must be an int >= 0, got {value!r}")
    return value


def position(state: dict[str, Any]) -> int:
    """The saved mixture position (epoch x num_records + index), its fields checked."""
    epoch = non_negative(state["current_epoch"], "current_epoch")
    index = non_negative(state["current_index"], "current_index")
    block = state["num_records"]
    if not isinstance(block, int) or isinstance(block, bool) or not 0 <= index < block:
        raise StateMismatchError(
            f"mixture state has current_index={index!r} and num_records={block!r}"
        )
    return epoch * block + index


def shares(state: dict[str, Any], names: tuple[str, ...]) -> tuple[int, ...] | None:
    """The saved weights as integer shares over `names`, None if they name other components."""
    weights = state["weights"]
    if not isinstance(weights, dict) or sorted(weights) != list(names):
        return None
    values = [weights[name] for name in names]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
        raise StateMismatchError(f"mixture state field 'weights' is {weights!r}")
    return schedule.integer_weights(values)


def component_draws(
    saved: Any, components: Mapping[str, RecordSource], allow_new_components: bool
) -> list[int]:
    """Each component's saved draws (0 for an allowed new one), in the order of `components`;
    refuses components added (unless `allow_new_components`) or removed, and any whose data or
    order changed."""
    if not isinstance(saved, dict):
        raise StateMismatchError(f"mixture state field 'components' is {saved!r}, not a dict")
    removed = sorted(set(saved) - set(components))
    if removed:
        raise StateMismatchError(
            f"the mixture state has component(s) {removed} that this mixture lacks; their "
            "positions would be lost: build the mixture with them (any positive weight)"
        )
    added = sorted(set(components) - set(saved))
    if added and not allow_new_components:
        raise StateMismatchError(
            f"this mixture has component(s) {added} that the saved state lacks; build it "
            "with allow_new_components=True to start them at their beginning"
        )
    draws = []
    for name in components:
        if name not in saved:
            draws.append(0)
            continue
        entry, expected = saved[name], components[name].get_state()
        if not isinstance(entry, dict):
            raise StateMismatchError(f"mixture component {name!r}: state {entry!r}")
        for field in COMPONENT_IDENTITY:
            if entry.get(field) != expected.get(field):
                raise StateMismatchError(
                    f"mixture component {name!r}: saved {field}={entry.get(field)!r} but "
                    f"this component has {expected.get(field)!r}; the state was saved for "
                    "other data or another order of it"
                )
        epoch = non_negative(entry.get("current_epoch"), f"{name}.current_epoch")
        index = non_negative(entry.get("current_index"), f"{name}.current_index")
        non_negative(entry.get("origin_draws"), f"{name}.origin_draws")
        draws.append(epoch * expected["num_records"] + index)
    return draws
