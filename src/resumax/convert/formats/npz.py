"""An .npz file of arrays with one row per record: record i is `{name: array[i]}` (read without
pickle); `--fields` keeps some arrays."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from resumax.convert.formats.base import Item, Reader
from resumax.errors import ConfigError, DataSourceError
from resumax.records import ArrayRows


class NpzReader(Reader):
    def _rows(self, unit: str) -> ArrayRows:
        try:
            with self.open(unit) as file, np.load(file, allow_pickle=False) as arrays:
                available = list(arrays.files)
                names = self.options.fields or tuple(available)
                columns: dict[str, Any] = {
                    name: arrays[name] for name in names if name in available
                }
        except (OSError, ValueError) as error:
            raise DataSourceError(f"cannot read {unit!r} as an .npz of arrays: {error}") from error
        missing = [name for name in names if name not in available]
        if missing:
            raise ConfigError(f"{unit!r} has no array {missing[0]!r} (it has {available})")
        return ArrayRows(columns)

    def count(self, unit: str) -> int:
        return len(self._rows(unit))

    def read(self, unit: str) -> Iterator[Item]:
        rows = self._rows(unit)
        for index in range(len(rows)):
            yield rows[index]
