"""An .npz file of arrays with one row per record: record i is `{name: array[i]}` (read without
pickle); `--fields` keeps some arrays."""

from __future__ import annotations

import zipfile
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
        """The rows of the first array, from its header alone (`read` checks the others)."""
        try:
            with self.open(unit) as file, zipfile.ZipFile(file) as archive:
                names = [name for name in archive.namelist() if name.endswith(".npy")]
                wanted = [f"{field}.npy" for field in self.options.fields or ()]
                with archive.open((wanted or names)[0]) as array:
                    major, _ = np.lib.format.read_magic(array)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if major == 1
                        else np.lib.format.read_array_header_2_0
                    )
                    shape = read_header(array)[0]
        except (OSError, ValueError, IndexError, KeyError, zipfile.BadZipFile) as error:
            raise DataSourceError(f"cannot read {unit!r} as an .npz of arrays: {error}") from error
        if not shape:
            raise DataSourceError(
                f"{unit!r}: its arrays must have one row per record (a 0-d array)"
            )
        return int(shape[0])

    def read(self, unit: str, start: int = 0, stop: int | None = None) -> Iterator[Item]:
        rows = self._rows(unit)
        for index in range(start, len(rows) if stop is None else min(stop, len(rows))):
            yield rows[index]
