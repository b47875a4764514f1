"""CSV with a header row: each row a record, each column a field. A cell is an int, a float or
a string as it reads, each cell on its own; an empty cell is null. A row with another number of
cells than the header is a bad record named by its file and line (from 1)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

from resumax.convert.formats.base import Item, Reader
from resumax.convert.values import (
    BadRecord,
    RecordError,
    csv_cell,
    csv_value,
    json_value,
    make_record,
)
from resumax.errors import DataSourceError


class CsvReader(Reader):
    def _rows(self, unit: str) -> Iterator[tuple[int, list[str]]]:
        """(first line of the row, cells) of each row after the header."""
        with self.open(unit) as binary:
            text = io.TextIOWrapper(binary, encoding="utf-8", newline="")
            reader = csv.reader(text)
            line = 1
            try:
                for cells in reader:
                    yield line, cells
                    line = reader.line_num + 1
            except (csv.Error, UnicodeDecodeError) as error:
                raise DataSourceError(
                    f"{unit}, line {reader.line_num}: cannot read it as CSV: {error}"
                ) from error

    def count(self, unit: str) -> int:
        with self.open(unit) as file:
            data = file.read()
        if b'"' not in data:  # no quoted cell, so no newline inside one: count the lines
            return max(0, sum(1 for line in data.splitlines() if line) - 1)
        return max(0, sum(1 for _, cells in self._rows(unit) if cells) - 1)

    def read(self, unit: str, start: int = 0, stop: int | None = None) -> Iterator[Item]:
        rows = self._rows(unit)
        header = next((cells for _, cells in rows if cells), None)
        if header is None:
            return
        # Without --fields or --fill-null, a row without empty cells becomes a record directly.
        fast = self.options.fields is None and self.options.fill_null is None
        position = -1
        for line, cells in rows:
            if not cells:
                continue
            position += 1
            if position < start:
                continue
            if stop is not None and position >= stop:
                return
            if len(cells) != len(header):
                reason = f"{len(cells)} cells where the header has {len(header)}"
                yield BadRecord(f"{unit}, line {line}", reason)
                continue
            if fast:
                values = list(map(csv_cell, cells))
                if None not in values:
                    yield dict(zip(header, values, strict=True))
                    continue
            raw = {name: csv_value(cell) for name, cell in zip(header, cells, strict=True)}
            try:
                yield make_record(raw, self.options, json_value)
            except RecordError as error:
                yield BadRecord(f"{unit}, line {line}", str(error))
