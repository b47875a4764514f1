"""JSON Lines: one JSON object per line; blank lines are skipped. A line that is not a JSON
object is a bad record named by its file and line number (from 1)."""

from __future__ import annotations

import json
from collections.abc import Iterator

from resumax.convert.formats.base import Item, Reader
from resumax.convert.values import BadRecord, RecordError, json_value, make_record

_DECODER = json.JSONDecoder()


class JsonLinesReader(Reader):
    def count(self, unit: str) -> int:
        with self.open(unit) as file:
            return sum(1 for line in file if line.strip())

    def read(self, unit: str, start: int = 0, stop: int | None = None) -> Iterator[Item]:
        position = -1
        with self.open(unit) as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                position += 1
                if position < start:
                    continue
                if stop is not None and position >= stop:
                    return
                try:
                    raw = _DECODER.decode(line.decode().rstrip("\r\n"))
                except ValueError as error:  # UnicodeDecodeError included
                    yield BadRecord(f"{unit}, line {number}", f"not JSON: {error}")
                    continue
                if not isinstance(raw, dict):
                    reason = f"a JSON {type(raw).__name__}, not an object"
                    yield BadRecord(f"{unit}, line {number}", reason)
                    continue
                try:
                    yield make_record(raw, self.options, json_value)
                except RecordError as error:
                    yield BadRecord(f"{unit}, line {number}", str(error))
