"""`MemorySource`: records held in a Python list, for tests, demos and small in-memory data."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from flax import nnx

from resumax.errors import DataSourceError
from resumax.sources.base import ArrayRecordSourceConfig, RecordSource, fingerprint


class _Examples:
    """Holds the examples off the module's nnx state (they are data, not position)."""

    def __init__(self, examples: Sequence[Any]):
        self.items = list(examples)


class MemorySource(RecordSource):
    """The same order, position and state as an ArrayRecord source, over in-memory examples.

    Its fingerprint is (name, number of examples): give different datasets different names.
    """

    def __init__(
        self,
        config: ArrayRecordSourceConfig,
        examples: Sequence[Any],
        *,
        name: str = "memory",
        rngs: nnx.Rngs | None = None,
    ):
        if len(examples) == 0:
            raise DataSourceError(f"MemorySource {name!r} got no examples")
        self._examples = _Examples(examples)
        self._name = name
        super().__init__(
            config,
            records_per_epoch=len(examples),
            fingerprint=fingerprint([(name, len(examples))]),
        )

    def reopener(self) -> Callable[[], MemorySource]:
        """A copy of this source over the same examples (pickled with it), e.g. for a worker."""
        return functools.partial(MemorySource, self.config, self._examples.items, name=self._name)

    def read_records(self, record_indices: Sequence[int]) -> list[Any]:
        """The examples at the given indices, in that order."""
        self.check_open()
        items = self._examples.items
        return [items[int(i)] for i in record_indices]
