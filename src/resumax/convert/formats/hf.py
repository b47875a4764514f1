"""A Hugging Face dataset saved with `save_to_disk`, through the `datasets` library (the
optional extra `resumax[hf]`): its Arrow table as records, with `arrow`'s mapping (a ClassLabel
is its int64, an Image its encoded bytes). Rows are named from 0."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from resumax.convert.formats import arrow
from resumax.convert.formats.base import Item, Reader
from resumax.errors import ConfigError, DataSourceError

_BATCH_ROWS = 4096


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as error:
        raise ConfigError(
            "reading Hugging Face datasets needs the datasets library: pip install 'resumax[hf]'"
        ) from error
    return datasets


def load(path: str, storage_options: Any = None) -> Any:
    """The `datasets.Dataset` saved at `path`; ConfigError for a DatasetDict (naming its splits)
    or a missing `datasets` library."""
    datasets = _datasets()
    try:
        dataset = datasets.load_from_disk(path, storage_options=storage_options)
    except (FileNotFoundError, ValueError, OSError) as error:
        raise DataSourceError(
            f"cannot load {path!r} as a saved Hugging Face dataset: {error}"
        ) from error
    if isinstance(dataset, datasets.DatasetDict):
        splits = sorted(dataset)
        raise ConfigError(
            f"{path!r} holds the splits {splits}: convert one split's directory, e.g. "
            f"{path.rstrip('/')}/{splits[0]}"
        )
    return dataset


class HuggingFaceReader(Reader):
    def prepare(self) -> None:
        _datasets()

    def units(self, paths: Sequence[str]) -> list[str]:
        return sorted(path.rstrip("/") for path in paths)

    def count(self, unit: str) -> int:
        return len(load(unit, self.storage_options))

    def read(self, unit: str, start: int = 0, stop: int | None = None) -> Iterator[Item]:
        dataset = load(unit, self.storage_options).with_format("arrow")
        names = arrow.check_columns(dataset.data.schema, self.options, repr(unit))
        stop = len(dataset) if stop is None else min(stop, len(dataset))
        for first in range(start, stop, _BATCH_ROWS):
            table = dataset[first : min(first + _BATCH_ROWS, stop)]
            yield from arrow.batch_records(
                table, names, self.options, lambda row, first=first: f"{unit}, row {first + row}"
            )

    def sources(self, units: Sequence[str], counts: Sequence[int]) -> list[dict[str, Any]]:
        return [{"path": unit, "records": count} for unit, count in zip(units, counts, strict=True)]
