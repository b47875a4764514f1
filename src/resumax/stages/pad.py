"""Sequence stages: `Pad` brings variable-length 1-D fields to fixed lengths with a mask, so
records of different lengths batch into fixed-shape arrays."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from resumax.errors import ConfigError, StageError


def _is_count(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


class Pad:
    """A per-record stage: pads or truncates named 1-D fields to fixed lengths, adding masks.

    Args:
      lengths: {field: length}; each field must be a 1-D array (or list) in every record.
      pad_value: the value written after a shorter field's end; it must fit the field's dtype.

    Each field becomes exactly `length` long (its first `length` items, then `pad_value`), and
    `<field>_mask` is added: a bool array, True on the field's own items. Other fields pass
    through. A plain picklable object, so it runs in worker processes too.
    """

    def __init__(self, lengths: Mapping[str, int], pad_value: int | float = 0):
        if not isinstance(lengths, Mapping) or not lengths:
            raise ConfigError(
                f"Pad lengths must be a non-empty dict {{field: length}}, got {lengths!r}"
            )
        for field, length in lengths.items():
            if not isinstance(field, str):
                raise ConfigError(f"Pad field names must be strings, got {field!r}")
            if not _is_count(length):
                raise ConfigError(
                    f"Pad length of field {field!r} must be a positive int, got {length!r}"
                )
        if isinstance(pad_value, bool) or not isinstance(
            pad_value, (int, float, np.integer, np.floating)
        ):
            raise ConfigError(f"Pad pad_value must be a number, got {pad_value!r}")
        self.lengths = {field: int(length) for field, length in lengths.items()}
        self.pad_value = pad_value
        self._fills: dict[np.dtype, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"Pad({self.lengths!r}, pad_value={self.pad_value!r})"

    def __call__(self, example: Any) -> dict[str, Any]:
        """The example with each named field padded or truncated, plus its `<field>_mask`."""
        if not isinstance(example, Mapping):
            raise StageError(f"Pad needs dict records, got a {type(example).__name__}")
        padded = dict(example)
        for field, length in self.lengths.items():
            padded[field], padded[f"{field}_mask"] = self._pad(example, field, length)
        return padded

    def _pad(self, example: Mapping[str, Any], field: str, length: int) -> tuple[np.ndarray, ...]:
        if field not in example:
            raise StageError(
                f"Pad: the record has no field {field!r} (it has {sorted(example)}); "
                "name fields the records hold"
            )
        values = np.asarray(example[field])
        if values.ndim != 1:
            raise StageError(
                f"Pad: field {field!r} must be 1-D, got shape {values.shape}; Pad pads "
                "sequences of tokens, one axis"
            )
        kept = min(len(values), length)
        out = np.empty(length, dtype=values.dtype)
        out[:kept] = values[:kept]
        out[kept:] = self._fill(field, values.dtype)
        mask = np.zeros(length, dtype=bool)
        mask[:kept] = True
        return out, mask

    def _fill(self, field: str, dtype: np.dtype) -> np.ndarray:
        """pad_value as a `dtype` scalar; StageError if that changes its value (0.5 as an int)."""
        fill = self._fills.get(dtype)
        if fill is None:
            fill = np.asarray(self.pad_value).astype(dtype)
            if not np.array_equal(fill, self.pad_value, equal_nan=dtype.kind in "fc"):
                raise StageError(
                    f"Pad: pad_value={self.pad_value!r} does not fit field {field!r} of dtype "
                    f"{dtype}"
                )
            self._fills[dtype] = fill
        return fill
