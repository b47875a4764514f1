"""The records of a conversion's units as encoded bytes, in input order, with each bad record
counted against `--skip-bad`: more than allowed fails the conversion, naming the record."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from resumax.convert.formats import Reader
from resumax.convert.values import BadRecord
from resumax.errors import DataSourceError, RecordEncodeError
from resumax.records.codec import encode


def encoded_items(
    reader: Reader, unit: str, start: int = 0, stop: int | None = None
) -> Iterator[bytes | BadRecord]:
    """The records of `unit` (input positions start..stop-1) encoded, a BadRecord in place of
    each bad one (one the codec cannot store included)."""
    for position, item in enumerate(reader.read(unit, start, stop), start=start):
        if isinstance(item, BadRecord):
            yield item
            continue
        try:
            yield encode(item)
        except RecordEncodeError as error:
            yield BadRecord(f"{unit}, record {position} (from 0)", str(error))


class BadLimit:
    """The bad records found so far, at most `limit` of them; the next one raises."""

    def __init__(self, limit: int):
        self.limit = limit
        self.found: list[BadRecord] = []

    def add(self, bad: BadRecord) -> None:
        self.found.append(bad)
        if len(self.found) <= self.limit:
            return
        if self.limit == 0:
            raise DataSourceError(
                f"{bad.where}: {bad.reason}. Nothing was written: fix the input, or let "
                "--skip-bad N skip up to N bad records"
            )
        raise DataSourceError(
            f"{bad.where}: {bad.reason}. That is bad record {len(self.found)}, more than "
            f"--skip-bad {self.limit} allows (the first: {self.found[0].where}); nothing was "
            "written"
        )


def good_records(
    reader: Reader,
    units: list[str],
    limit: BadLimit,
    seen: Callable[[int], None] | None = None,
) -> Iterator[bytes]:
    """The encoded good records of `units` in order; `seen(n)` is told every 1024 input
    records (bad ones included), for a progress bar."""
    pending = 0
    for unit in units:
        # encoded_items inlined: one generator less per record on the local engine's hot path.
        for position, item in enumerate(reader.read(unit)):
            pending += 1
            if pending == 1024 and seen is not None:
                seen(pending)
                pending = 0
            if isinstance(item, BadRecord):
                limit.add(item)
                continue
            try:
                yield encode(item)
            except RecordEncodeError as error:
                limit.add(BadRecord(f"{unit}, record {position} (from 0)", str(error)))
    if pending and seen is not None:
        seen(pending)


def shard_records(reader: Reader, reads: Sequence[tuple[str, int, int, int]]) -> Iterator[bytes]:
    """The encoded records of one shard, read from the parts of the units that hold them
    (`Plan.shard_reads`: what one Beam worker writes)."""
    limit = BadLimit(reader.options.skip_bad)
    for unit, start, stop, good in reads:
        found = 0
        for item in encoded_items(reader, unit, start, stop):
            if isinstance(item, BadRecord):
                limit.add(item)
                continue
            found += 1
            yield item
        if found != good:
            raise DataSourceError(
                f"{unit} held {good} good records at positions {start}..{stop - 1} when counted "
                f"but {found} when read: did it change during the conversion?"
            )
