"""What every input format provides: its units of work (usually files, in sorted order), a cheap
count of each unit's records, the records themselves in order, and how the sources are described
in the index metadata."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from resumax.convert import inputs
from resumax.convert.options import ConvertOptions
from resumax.convert.values import BadRecord
from resumax.records import storage

Item = dict[str, Any] | BadRecord


class Reader:
    """Reads one format. A unit is a string (a file path or URL) that one worker reads whole;
    instances are picklable, so Beam workers read with the planner's reader."""

    def __init__(self, options: ConvertOptions, storage_options: storage.StorageOptions = None):
        self.options = options
        self.storage_options = storage_options

    def units(self, paths: Sequence[str]) -> list[str]:
        """The units of the inputs, in the order their records are taken."""
        return inputs.expand(paths, self.options.format, self.storage_options)

    def prepare(self) -> None:
        """Imports the libraries reading needs: a Beam worker calls it before its first shard,
        so that the import counts in its startup."""

    def count(self, unit: str) -> int:
        """The number of input records (bad ones included) of `unit`, without converting them."""
        raise NotImplementedError

    def read(self, unit: str, start: int = 0, stop: int | None = None) -> Iterator[Item]:
        """The records at input positions start..stop-1 of `unit` (all by default) in order, a
        BadRecord in place of each one that is bad. Positions before `start` are skipped without
        converting them (a Beam worker reads only its shard's part of a unit)."""
        raise NotImplementedError

    def sources(self, units: Sequence[str], counts: Sequence[int]) -> list[dict[str, Any]]:
        """The index metadata's description of the inputs: each file, its size and records."""
        return [
            {"path": unit, "bytes": inputs.size_of(unit, self.storage_options), "records": count}
            for unit, count in zip(units, counts, strict=True)
        ]

    def metadata(self) -> dict[str, Any]:
        """Format-specific index metadata (e.g. an image folder's class names)."""
        return {}

    def open(self, unit: str, mode: str = "rb"):
        return inputs.open_input(unit, self.storage_options, mode)
