"""Parquet files through pyarrow (the optional extra `resumax[parquet]`), read in batches of
rows; the mapping of column types to record values is `arrow`'s. Rows are named from 0."""

from __future__ import annotations

from collections.abc import Iterator

from resumax.convert.formats import arrow
from resumax.convert.formats.base import Item, Reader
from resumax.errors import ConfigError, DataSourceError

_BATCH_ROWS = 4096


def _parquet():
    try:
        import pyarrow.parquet
    except ImportError as error:
        raise ConfigError(
            "reading Parquet needs pyarrow: pip install 'resumax[parquet]'"
        ) from error
    return pyarrow.parquet


class ParquetReader(Reader):
    def prepare(self) -> None:
        _parquet()

    def _file(self, unit: str):
        parquet = _parquet()
        try:
            return parquet.ParquetFile(self.open(unit))
        except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ...
            raise DataSourceError(f"cannot read {unit!r} as Parquet: {error}") from error

    def count(self, unit: str) -> int:
        return self._file(unit).metadata.num_rows

    def read(self, unit: str, start: int = 0, stop: int | None = None) -> Iterator[Item]:
        file = self._file(unit)
        names = arrow.check_columns(file.schema_arrow, self.options, repr(unit))
        stop = file.metadata.num_rows if stop is None else stop
        first = 0
        for batch in file.iter_batches(batch_size=_BATCH_ROWS, columns=names):
            low, high = max(start - first, 0), min(stop - first, batch.num_rows)
            if low < high:
                offset = first + low
                yield from arrow.batch_records(
                    batch.slice(low, high - low),
                    names,
                    self.options,
                    lambda row, offset=offset: f"{unit}, row {offset + row}",
                )
            first += batch.num_rows
            if first >= stop:
                return
