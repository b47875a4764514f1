"""A mixture's spans made ready by its components: each span of mixture positions becomes, per
component, the span of that component's draws, which the component prepares (a remote component
fetches and pins its shards) before the mixture span is read; and the records of mixture positions
named by component.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from resumax.errors import ConfigError
from resumax.sources.base import RecordSource
from resumax.sources.record_ref import RecordRef


class Mixture(Protocol):
    names: tuple[str, ...]
    components: Mapping[str, RecordSource]

    def draws_before(self, position: int) -> np.ndarray: ...


class _Feed:
    """The spans handed to one component's `spans_ready`, one at a time."""

    def __init__(self) -> None:
        self.spans: deque[tuple[int, int]] = deque()

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> tuple[int, int]:
        if not self.spans:
            raise StopIteration
        return self.spans.popleft()


class ReadySpans:
    """`spans` of mixture positions, each yielded once every component is ready for its draws;
    `stop_reading()` stops the components' downloads (from any thread)."""

    def __init__(self, mixture: Mixture, spans: Iterator[tuple[int, int]]):
        self._mixture, self._spans = mixture, spans
        self._feeds = [_Feed() for _ in mixture.names]
        self._ready: list[Iterator[Any]] = [
            mixture.components[name].spans_ready(feed)
            for name, feed in zip(mixture.names, self._feeds, strict=True)
        ]

    def __iter__(self) -> ReadySpans:
        return self

    def __next__(self) -> tuple[int, int]:
        try:
            start, stop = next(self._spans)
        except BaseException:
            self.stop_reading()
            raise
        first, last = self._mixture.draws_before(start), self._mixture.draws_before(stop)
        _prepare(self._feeds, self._ready, first.tolist(), last.tolist())
        return start, stop

    def stop_reading(self) -> None:
        for component in self._ready:
            stop = getattr(component, "stop_reading", None)
            if stop is not None:
                stop()


def spans_ready(mixture: Mixture, spans: Iterator[tuple[int, int]]) -> ReadySpans:
    """The mixture's spans made ready by its components (see `ReadySpans`)."""
    return ReadySpans(mixture, spans)


def _prepare(
    feeds: list[_Feed], ready: list[Iterator[Any]], first: Sequence[int], last: Sequence[int]
) -> None:
    for feed, component, begin, end in zip(feeds, ready, first, last, strict=True):
        if end > begin:
            feed.spans.append((begin, end))
            next(component)


def _cache_needs(mixture: Mixture) -> dict[str, list[tuple[str, int, int, int]]]:
    """Cache directory -> (component, bytes it needs on disk at once, its cache_limit, bytes of
    its set) of the components that read through a shard cache."""
    groups: dict[str, list[tuple[str, int, int, int]]] = {}
    for name in mixture.names:
        needs = getattr(mixture.components[name], "cache_needs", None)
        found = needs() if needs is not None else None
        if found is not None:
            directory, *rest = found
            groups.setdefault(directory, []).append((name, *rest))
    return groups


def check_shared_caches(mixture: Mixture) -> None:
    """ConfigError when components that share a cache directory need more bytes on disk at
    once, together, than its cache_limit: a mixture reads all its components at once, and the
    directory holds at most cache_limit bytes whichever source fills it. Each such component
    is told the bytes of all the sets it shares the directory with (`share_cache`)."""
    for directory, members in _cache_needs(mixture).items():
        if len(members) < 2:
            continue
        total = sum(needed for _, needed, _, _ in members)
        limit = min(limit for _, _, limit, _ in members)
        if total > limit:
            each = ", ".join(f"{name!r} {needed}" for name, needed, _, _ in members)
            raise ConfigError(
                f"mixture components read through one cache_dir {directory!r} and together need "
                f"{total} bytes of shards on disk at once ({each}), more than cache_limit="
                f"{limit}: give each component its own cache_dir, raise cache_limit to at least "
                f"{total} bytes, or read with smaller shuffle_windows"
            )
        sets_bytes = sum(set_bytes for _, _, _, set_bytes in members)
        for name, *_ in members:
            mixture.components[name].share_cache(sets_bytes)


def read_ahead_limit(mixture: Mixture, shares: Sequence[int]) -> int | None:
    """The mixture positions whose draws every component can read ahead (None: no bound): a
    component with a share s of the positions and L bytes of room (its cache_limit, less what
    the components sharing its cache directory need) bounds them to about L / s."""
    room: dict[str, int] = {}
    for members in _cache_needs(mixture).values():
        for name, _, limit, _ in members:
            room[name] = limit - sum(needed for other, needed, _, _ in members if other != name)
    total = sum(shares)
    limits = []
    for name, share in zip(mixture.names, shares, strict=True):
        component = mixture.components[name]
        if name in room:
            limit = component.read_ahead_limit(room[name])
        else:
            limit = component.read_ahead_limit()
        if limit is not None:
            limits.append(limit * total // max(share, 1))
    return min(limits) if limits else None


def record_refs(mixture: Any, positions: Sequence[int]) -> list[RecordRef]:
    """The records at mixture positions: each record id (see `MixtureSource.record_indices`)
    decoded into its component, the component's epoch and dataset index, then its file."""
    refs = []
    count = len(mixture.names)
    for position in positions:
        (record_id,) = mixture.record_indices(0, int(position), int(position) + 1).tolist()
        component, draw = record_id % count, record_id // count
        name = mixture.names[component]
        source = mixture.components[name]
        epoch, index = divmod(draw, source.records_per_epoch)
        ((path, record),) = source.locate([index])
        refs.append(RecordRef(int(position), epoch, index, name, path, record))
    return refs
