"""The plan of a conversion, made before any shard is written: the units in order, their record
counts, the bad records to skip, the number of shards and the index metadata.

The counts come from each format's cheap count (line counts, Parquet metadata, TFRecord framing,
...). A full pass that reads and encodes every record is made first only when the plan needs
it: `--shard-size` (the number of shards follows from the encoded bytes) or `--skip-bad` (the
records skipped must be known before the shards are cut, and they go into the metadata).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from resumax.convert.formats import Reader
from resumax.convert.stream import BadLimit, encoded_items
from resumax.convert.values import BadRecord


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a conversion writes; picklable, so Beam workers follow the planner's plan."""

    units: tuple[str, ...]
    counts: tuple[int, ...]  # input records of each unit, bad ones included
    bad_positions: tuple[tuple[int, ...], ...]  # each unit's bad records to skip, in order
    num_shards: int
    metadata: dict[str, Any]

    @property
    def bad_counts(self) -> list[int]:
        return [len(positions) for positions in self.bad_positions]

    @property
    def num_records(self) -> int:
        """The records written: the units' records less the bad ones."""
        return sum(self.counts) - sum(self.bad_counts)

    def bounds(self) -> np.ndarray:
        """Shard k holds records bounds[k]..bounds[k+1]-1, as `write_shards` cuts them."""
        return np.linspace(0, self.num_records, self.num_shards + 1).astype(int)

    @functools.cached_property
    def first_indices(self) -> list[int]:
        """The global index of each unit's first good record (computed once)."""
        good = np.asarray(self.counts, dtype=np.int64) - np.asarray(self.bad_counts, np.int64)
        return [0, *np.cumsum(good)[:-1].tolist()] if len(good) else []

    def shard_reads(self, shard: int) -> tuple[tuple[str, int, int, int], ...]:
        """What shard `shard` is read from: (unit, first input position, input position past
        the last, good records) for each unit that holds some of its records."""
        start, stop = (int(bound) for bound in self.bounds()[shard : shard + 2])
        firsts = self.first_indices
        reads = []
        unit = max(bisect.bisect_right(firsts, start) - 1, 0)
        while unit < len(self.units) and firsts[unit] < stop:
            good = self.counts[unit] - len(self.bad_positions[unit])
            low, high = max(start - firsts[unit], 0), min(stop - firsts[unit], good)
            if low < high:
                first = self._input_position(unit, low)
                last = self._input_position(unit, high - 1)
                reads.append((self.units[unit], first, last + 1, high - low))
            unit += 1
        return tuple(reads)

    def _input_position(self, unit: int, good_index: int) -> int:
        """The input position of the unit's good record `good_index`."""
        position = good_index
        for bad in self.bad_positions[unit]:
            if bad > position:
                break
            position += 1
        return position


def make_plan(
    reader: Reader, inputs: Sequence[str], seen: Callable[[int], None] | None = None
) -> Plan:
    """The plan of converting `inputs` with `reader` (its options included); `seen(n)` counts
    the records of a full pass, for a progress bar."""
    options = reader.options
    units = reader.units(inputs)
    skipped: list[BadRecord] = []
    if options.needs_full_pass():
        limit = BadLimit(options.skip_bad)
        counts, bad_positions, encoded_bytes = [], [], 0
        for unit in units:
            bad, count = [], 0
            for item in encoded_items(reader, unit):
                if isinstance(item, BadRecord):
                    limit.add(item)
                    bad.append(count)
                else:
                    encoded_bytes += len(item)
                count += 1
            counts.append(count)
            bad_positions.append(tuple(bad))
            if seen is not None:
                seen(counts[-1])
        skipped = limit.found
    else:
        counts = [reader.count(unit) for unit in units]
        bad_positions, encoded_bytes = [()] * len(units), 0
    num_shards = options.shards_for(encoded_bytes)
    metadata = {
        "converted_from": options.format,
        "sources": reader.sources(units, counts),
        "options": {**options.describe(), "shards": num_shards},
        "skipped": [{"where": bad.where, "reason": bad.reason} for bad in skipped],
        **reader.metadata(),
    }
    return Plan(tuple(units), tuple(counts), tuple(bad_positions), num_shards, metadata)
