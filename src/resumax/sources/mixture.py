"""`MixtureSource`: an infinite weighted mixture of named resumax sources, each in its own order.

The state is the mixture position plus a few integers per component; a resume may change the
weights (every component continues where it stopped) and, if allowed, add components.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from resumax.errors import ConfigError, StateMismatchError
from resumax.sources import mixture_reads
from resumax.sources import mixture_schedule as schedule
from resumax.sources import mixture_state as saved_state
from resumax.sources.base import ArrayRecordSourceConfig, RecordSource, fingerprint
from resumax.sources.record_ref import RecordRef


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Where the current weights took effect: the mixture position `origin` and, per component,
    the records it had drawn before it (`offsets`)."""

    origin: int
    offsets: tuple[int, ...]


class _ScheduleBox:
    """The mixture's schedule, kept off its nnx state; a reopener pickles the box when workers
    start, so they read with the schedule a `set_state` chose."""

    def __init__(self, value: Schedule):
        self.value = value


class _LayoutCache:
    """The last few block layouts, swapped in as one tuple (a prefetch thread reads it too, a
    few blocks ahead of the caller's position)."""

    def __init__(self) -> None:
        self._entries: tuple[tuple[tuple[int, int], schedule.BlockLayout], ...] = ()

    def get(self, key: tuple[int, int]) -> schedule.BlockLayout | None:
        return next((layout for k, layout in self._entries if k == key), None)

    def put(self, key: tuple[int, int], layout: schedule.BlockLayout) -> None:
        self._entries = ((key, layout), *self._entries[:3])


def _check_components(sources: Any, weights: Any) -> list[str]:
    """The component names, sorted, once sources and weights are checked; ConfigError otherwise."""
    if not isinstance(sources, Mapping) or not sources:
        raise ConfigError(
            f"MixtureSource sources must be a non-empty dict {{name: source}}, got {sources!r}"
        )
    if not isinstance(weights, Mapping):
        raise ConfigError(f"MixtureSource weights must be a dict {{name: weight}}, got {weights!r}")
    for name, source in sources.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"mixture component names must be non-empty strings, got {name!r}")
        if not isinstance(source, RecordSource):
            raise ConfigError(
                f"mixture component {name!r} is a {type(source).__name__}, not a resumax source "
                "(ArrayRecordSourceModule, MemorySource, ...)"
            )
        if isinstance(source, MixtureSource):
            raise ConfigError(
                f"mixture component {name!r} is itself a MixtureSource; list its components in "
                "this mixture instead, with their weights multiplied by its weight"
            )
    missing, extra = sorted(set(sources) - set(weights)), sorted(set(weights) - set(sources))
    if missing or extra:
        raise ConfigError(
            f"mixture weights must name exactly the sources {sorted(sources)}: "
            f"no weight for {missing}, weights for unknown {extra}"
        )
    for name, weight in weights.items():
        valid = isinstance(weight, (int, float, np.integer, np.floating))
        if not valid or isinstance(weight, bool) or not math.isfinite(weight) or weight <= 0:
            raise ConfigError(
                f"mixture weight of {name!r} must be a positive finite number, got {weight!r}"
            )
    return sorted(sources)


class MixtureSource(RecordSource):
    """Records of several sources, mixed by weight, forever; each source keeps its own order.

    Args:
      config: the mixture's seed (with the weights, it decides which component serves each
        position) and shuffle_files (True: seeded order inside each block of positions; False:
        each component's positions spread evenly through the block). num_epochs must be -1.
      sources: {name: resumax source}. Each cycles through its own epochs in its own order (its
        own config's seed and shuffle), forever, whatever its own num_epochs.
      weights: {name: positive number}; proportions, they need not sum to 1.
      allow_new_components: let `set_state` accept a state that lacks some of these components;
        they start at their beginning. A component of the state missing here is always refused.

    Positions are counted in blocks of `records_per_epoch` (the "epochs" a pipeline sees): within
    the first T positions every component gets the floor or ceiling of weight x T, for every block
    boundary T. `mixture[p]` is the record at mixture position p.
    """

    def __init__(
        self,
        config: ArrayRecordSourceConfig,
        sources: Mapping[str, RecordSource],
        weights: Mapping[str, float],
        *,
        allow_new_components: bool = False,
    ):
        if not isinstance(config, ArrayRecordSourceConfig):
            raise ConfigError(f"config must be an ArrayRecordSourceConfig, got {config!r}")
        if config.num_epochs != -1:
            raise ConfigError(
                "a MixtureSource is infinite: its config needs num_epochs=-1, got "
                f"num_epochs={config.num_epochs}; limit training by steps instead"
            )
        if config.shuffle_window is not None:
            raise ConfigError("a MixtureSource takes no shuffle_window; set it on its components")
        self.names = tuple(_check_components(sources, weights))
        self.components = {name: sources[name] for name in self.names}
        mixture_reads.check_shared_caches(self)
        self.weights = {name: _json_number(weights[name]) for name in self.names}
        self.allow_new_components = bool(allow_new_components)
        self._shares = schedule.integer_weights([self.weights[n] for n in self.names])
        self._sizes = np.array([sources[n].records_per_epoch for n in self.names], dtype=np.int64)
        self._schedule = _ScheduleBox(Schedule(0, (0,) * len(self.names)))
        self._layouts = _LayoutCache()
        super().__init__(
            config,
            records_per_epoch=schedule.block_size_for(self._shares),
            fingerprint=fingerprint(
                [
                    (f"{n}:{self.components[n].fingerprint}", size)
                    for n, size in zip(self.names, self._sizes.tolist(), strict=True)
                ]
            ),
        )

    # Positions -> component draws -> records ---------------------------------------------------

    def _layout(self, origin: int, block: int) -> schedule.BlockLayout:
        layout = self._layouts.get((origin, block))
        if layout is None:
            layout = schedule.block_layout(
                self._shares,
                self.records_per_epoch,
                block,
                seed=self.config.seed,
                origin=origin,
                shuffle=self.config.shuffle_files,
            )
            self._layouts.put((origin, block), layout)
        return layout

    def _block_of(self, position: int, origin: int) -> tuple[int, int]:
        """(block after the origin, slot in it) of a mixture position."""
        if position < origin:
            raise ConfigError(
                f"mixture position {position} lies before position {origin}, where the current "
                "weights took effect; a mixture cannot go back past a change of weights"
            )
        return divmod(position - origin, self.records_per_epoch)

    def draws_before(self, position: int) -> np.ndarray:
        """How many records each component (in `names` order) serves before `position`."""
        current = self._schedule.value
        block, slot = self._block_of(position, current.origin)
        layout = self._layout(current.origin, block)
        served = np.bincount(layout.components[:slot], minlength=len(self.names))
        return np.asarray(current.offsets, dtype=np.int64) + layout.before + served

    def record_indices(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Record ids of mixture positions [start, stop) of block `epoch`.

        An id encodes (component c, component epoch e, dataset index i) as
        (e * len(c) + i) * number_of_components + c: unique per record of each component epoch,
        so RandomMap draws differ between them.
        """
        current = self._schedule.value
        offsets = np.asarray(current.offsets, dtype=np.int64)
        position = epoch * self.records_per_epoch + start
        ids = np.empty(stop - start, dtype=np.int64)
        done = 0
        while done < len(ids):
            block, slot = self._block_of(position + done, current.origin)
            slot_stop = min(self.records_per_epoch, slot + len(ids) - done)
            layout = self._layout(current.origin, block)
            components = layout.components[slot:slot_stop]
            draws = offsets[components] + layout.before[components] + layout.ranks[slot:slot_stop]
            ids[done : done + len(components)] = self._encode(components, draws)
            done += len(components)
        return ids

    def _encode(self, components: np.ndarray, draws: np.ndarray) -> np.ndarray:
        """Record ids of the given draws of the given components (see `record_indices`)."""
        ids = np.empty(len(components), dtype=np.int64)
        for component in np.unique(components).tolist():
            where = np.flatnonzero(components == component)
            first = int(draws[where[0]])  # one component's draws in a block run consecutively
            indices = self._component_indices(component, first, len(where))
            size = int(self._sizes[component])
            epoch_starts = (np.arange(first, first + len(where)) // size) * size
            ids[where] = (epoch_starts + indices) * len(self.names) + component
        return ids

    def _component_indices(self, component: int, first: int, count: int) -> np.ndarray:
        """Dataset indices of a component's draws [first, first + count), in its own order."""
        source, size = self.components[self.names[component]], int(self._sizes[component])
        parts = []
        while count > 0:
            epoch, index = divmod(first, size)
            take = min(count, size - index)
            parts.append(source.record_indices(epoch, index, index + take))
            first, count = first + take, count - take
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def read_records(self, record_indices: Sequence[int]) -> list[Any]:
        """Decoded records for ids from `record_indices`, each read by its component."""
        self.check_open()
        ids = np.asarray(record_indices, dtype=np.int64)
        components, per_component = ids % len(self.names), ids // len(self.names)
        records: list[Any] = [None] * len(ids)
        for component in np.unique(components).tolist():
            where = np.flatnonzero(components == component)
            source = self.components[self.names[component]]
            indices = per_component[where] % self._sizes[component]
            for at, record in zip(where.tolist(), source.read_records(indices), strict=True):
                records[at] = record
        return records

    def __getitem__(self, position: int) -> Any:
        """The record at mixture position `position` (>= 0), under the current schedule."""
        if position < 0:
            raise IndexError(f"mixture positions are >= 0, got {position}")
        return self.read_records(self.record_indices(0, position, position + 1))[0]

    def record_refs(self, positions: Sequence[int]) -> list[RecordRef]:
        """The records at mixture positions, named by component, the component's own epoch and
        dataset index, and file; nothing is read."""
        return mixture_reads.record_refs(self, positions)

    def spans_ready(self, spans: Iterator[tuple[int, int]]) -> Iterator[tuple[int, int]]:
        """Each span once every component is ready for its draws (remote shards fetched)."""
        return mixture_reads.spans_ready(self, spans)

    def read_ahead_limit(self) -> int | None:
        return mixture_reads.read_ahead_limit(self, self._shares)

    def close(self) -> None:
        """Closes every component source; reading afterwards raises DataSourceError."""
        for source in self.components.values():
            source.close()
        super().close()

    def seek(self, epoch: int, index: int) -> None:
        """Moves to (block, index) and each component to the next record it will serve."""
        super().seek(epoch, index)
        draws = self.draws_before(epoch * self.records_per_epoch + index)
        for name, count in zip(self.names, draws.tolist(), strict=True):
            self.components[name].seek(0, count)

    def reopener(self) -> Callable[[], MixtureSource]:
        """Reopens every component (each through its own reopener) and the current schedule."""
        openers = {}
        for name in self.names:
            try:
                openers[name] = self.components[name].reopener()
            except ConfigError as error:
                raise ConfigError(f"mixture component {name!r}: {error}") from error
        return functools.partial(
            _reopen,
            self.config,
            openers,
            dict(self.weights),
            self.allow_new_components,
            self._schedule,
        )

    # State ------------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """Position, weights, schedule and each component's own state: O(components) integers."""
        state = super().get_state()
        current = self._schedule.value
        state["origin"] = current.origin
        state["weights"] = dict(self.weights)
        state["components"] = {
            name: {**self.components[name].get_state(), "origin_draws": offset}
            for name, offset in zip(self.names, current.offsets, strict=True)
        }
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from a saved mixture state, with these weights from the saved position on.

        Saved with the same weights: continues exactly as if never interrupted. With other
        weights, every component continues at its next record and the new weights count from
        the saved position. Raises StateMismatchError naming a component that was added (unless
        allow_new_components), removed, or whose data or order changed.
        """
        if not isinstance(state, dict):
            raise StateMismatchError(f"a source state must be a dict, got {type(state).__name__}")
        own = super().get_state()
        missing = sorted({*own, "origin", "weights", "components"} - set(state))
        if missing:
            raise StateMismatchError(f"mixture state lacks the field(s) {missing}; got {state!r}")
        for field in ("version", "seed", "shuffle"):
            if state[field] != own[field]:
                raise StateMismatchError(
                    f"mixture state field {field!r} is {state[field]!r} but this mixture has "
                    f"{own[field]!r}"
                )
        position = saved_state.position(state)
        saved_draws = saved_state.component_draws(
            state["components"], self.components, self.allow_new_components
        )
        shares = saved_state.shares(state, self.names)
        if shares == self._shares and state["num_records"] == self.records_per_epoch:
            offsets = tuple(state["components"][n]["origin_draws"] for n in self.names)
            previous = self._schedule.value
            self._schedule.value = Schedule(
                saved_state.non_negative(state["origin"], "origin"), offsets
            )
            if position < state["origin"] or self.draws_before(position).tolist() != saved_draws:
                self._schedule.value = previous
                raise StateMismatchError(
                    "mixture state is inconsistent: its component positions do not follow from "
                    "its position, origin and origin_draws"
                )
        else:
            self._schedule.value = Schedule(position, tuple(saved_draws))
        self.seek(0, position)


def _json_number(weight: Any) -> float | int:
    return int(weight) if isinstance(weight, (int, np.integer)) else float(weight)


def _reopen(
    config: ArrayRecordSourceConfig,
    openers: dict[str, Callable[[], RecordSource]],
    weights: dict[str, float],
    allow_new_components: bool,
    box: _ScheduleBox,
) -> MixtureSource:
    """A mixture over reopened components, with the schedule of the mixture it copies."""
    mixture = MixtureSource(
        config,
        {name: opener() for name, opener in openers.items()},
        weights,
        allow_new_components=allow_new_components,
    )
    mixture._schedule.value = box.value
    return mixture
