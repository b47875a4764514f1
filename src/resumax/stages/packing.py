"""`PackSequences`: variable-length records packed first-fit into fixed-length rows, one fixed
window of global positions at a time, so rows depend only on (seed, window) and resume is O(1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from resumax.errors import ConfigError, StageError, StateMismatchError

# Records per window. First-fit over 512 records of lengths uniform in [1, length/2] fills ~98%
# of the tokens (benchmarks/packing.py); a restore re-packs at most one window of records.
DEFAULT_WINDOW = 512
LONG_CHOICES = ("truncate", "split")
_INT32_MAX = np.iinfo(np.int32).max

Rows = dict[str, np.ndarray]


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"PackSequences {name} must be a positive int, got {name}={value!r}")


@dataclasses.dataclass(frozen=True)
class PackSequences:
    """Packs the 1-D integer `fields` of consecutive records into rows of `length` tokens.

    Goes last in a pipeline's `stages`; `batch_size` then counts rows. Each row holds
    `<field>` (int32, 0 on padding), `<field>_segment_ids` (1, 2, ... per packed record, 0 on
    padding) and `<field>_positions` (0-based within each record); other fields are dropped.
    A record goes into the first row of its window where all its fields fit. Records longer than
    `length` are cut to `length` ("truncate") or cut into `length`-token pieces, each packed as a
    record of its own ("split", positions restart at 0 in each piece).
    `window` consecutive global positions are packed together: rows are a pure function of the
    records of one window, so they do not depend on workers, prefetch or where a run resumed.
    """

    length: int
    fields: Sequence[str]
    window: int = DEFAULT_WINDOW
    long: str = "truncate"

    def __post_init__(self) -> None:
        _positive_int("length", self.length)
        _positive_int("window", self.window)
        fields = (self.fields,) if isinstance(self.fields, str) else tuple(self.fields)
        if not fields or not all(isinstance(f, str) and f for f in fields):
            raise ConfigError(
                f"PackSequences fields must be a non-empty list of field names, got {self.fields!r}"
            )
        if len(set(fields)) != len(fields):
            raise ConfigError(f"PackSequences fields repeat a name: {list(fields)}")
        if self.long not in LONG_CHOICES:
            raise ConfigError(
                f"PackSequences long must be one of {LONG_CHOICES}, got {self.long!r}"
            )
        object.__setattr__(self, "fields", fields)

    @property
    def name(self) -> str:
        return "PackSequences"

    # One window ---------------------------------------------------------------------------------

    def pack(self, chunk: Any) -> Rows:
        """The rows of one window from its kept records (a RecordPath `Chunk`), first-fit."""
        num_rows, placements, _ = self._place(chunk)
        return self._write_rows(num_rows, placements)

    def row_positions(self, chunk: Any) -> list[list[int]]:
        """The global positions of the records packed into each row of the window, in order
        (a record split over several rows is listed in each)."""
        num_rows, placements, positions = self._place(chunk)
        rows: list[list[int]] = [[] for _ in range(num_rows)]
        for (row, _, _), position in zip(placements, positions, strict=True):
            if not rows[row] or rows[row][-1] != position:
                rows[row].append(position)
        return rows

    def _place(self, chunk: Any) -> tuple[int, list, list[int]]:
        """(rows, (row, offsets, tokens) of each piece, position of each piece's record)."""
        pieces, positions = [], []
        for example, position in zip(
            chunk.examples_between(0, len(chunk)), chunk.positions.tolist(), strict=True
        ):
            record_pieces = self._pieces(example, position)
            pieces.extend(record_pieces)
            positions.extend([position] * len(record_pieces))
        width = len(self.fields)
        used = np.zeros((max(len(pieces), 1), width), dtype=np.int64)
        placements = []
        num_rows = 0
        for tokens in pieces:
            lengths = np.array([len(t) for t in tokens])
            fits = (used[:num_rows] + lengths <= self.length).all(axis=1)
            row = int(fits.argmax()) if fits.any() else num_rows
            num_rows = max(num_rows, row + 1)
            placements.append((row, used[row].copy(), tokens))
            used[row] += lengths
        return num_rows, placements, positions

    def _pieces(self, example: Any, position: int) -> list[list[np.ndarray]]:
        """The record's fields as int32 token arrays, cut to `length` or split into pieces."""
        tokens = [self._tokens(example, field, position) for field in self.fields]
        longest = max(len(t) for t in tokens)
        if longest == 0:
            return []
        count = 1 if self.long == "truncate" else -(-longest // self.length)
        return [[t[k * self.length : (k + 1) * self.length] for t in tokens] for k in range(count)]

    def _tokens(self, example: Any, field: str, position: int) -> np.ndarray:
        where = f"PackSequences field {field!r} of the record at position {position}"
        if not isinstance(example, dict) or field not in example:
            keys = sorted(example) if isinstance(example, dict) else type(example).__name__
            raise StageError(f"{where} is missing (the record has {keys})")
        values = np.asarray(example[field])
        if values.ndim != 1 or values.dtype.kind not in "iub":
            raise StageError(
                f"{where} must be a 1-D integer array, got dtype {values.dtype} and shape "
                f"{values.shape}; tokenize it in an earlier stage"
            )
        if values.size and values.dtype.itemsize >= 4 and int(values.max()) > _INT32_MAX:
            raise StageError(f"{where} holds token {int(values.max())}, beyond int32")
        return values.astype(np.int32, copy=False)

    def _write_rows(self, num_rows: int, placements: list) -> Rows:
        segments = np.zeros(num_rows, dtype=np.int32)
        rows: Rows = {}
        for field in self.fields:
            rows[field] = np.zeros((num_rows, self.length), dtype=np.int32)
            rows[f"{field}_segment_ids"] = np.zeros((num_rows, self.length), dtype=np.int32)
            rows[f"{field}_positions"] = np.zeros((num_rows, self.length), dtype=np.int32)
        ramp = np.arange(self.length, dtype=np.int32)
        for row, offsets, tokens in placements:
            segments[row] += 1
            for field, offset, values in zip(self.fields, offsets.tolist(), tokens, strict=True):
                stop = offset + len(values)
                rows[field][row, offset:stop] = values
                rows[f"{field}_segment_ids"][row, offset:stop] = segments[row]
                rows[f"{field}_positions"][row, offset:stop] = ramp[: len(values)]
        return rows

    # The stream of windows ----------------------------------------------------------------------

    def window_spans(self, start: int, end: int | None) -> Iterator[tuple[int, int]]:
        """[start, stop) global positions of each window from the one starting at `start`."""
        if start % self.window and start != end:
            raise StateMismatchError(
                f"the source is at global position {start}, inside packing window "
                f"{start // self.window} (window={self.window}); a packed pipeline starts at a "
                "window boundary: seek the source to a multiple of the window, or restore a "
                "state saved by a pipeline with the same PackSequences"
            )
        while end is None or start < end:
            stop = start + self.window if end is None else min(start + self.window, end)
            yield start, stop
            start = stop

    def get_state(self, window_index: int, rows_delivered: int) -> dict[str, Any]:
        """The packing part of a pipeline state: settings plus (window, rows delivered from it)."""
        return {
            "length": self.length,
            "fields": list(self.fields),
            "window": self.window,
            "long": self.long,
            "window_index": window_index,
            "rows_delivered": rows_delivered,
        }

    def check_state(
        self, state: Any, position: int, end: int | None, source_changed: bool = False
    ) -> int:
        """Validates a saved packing state against this packer and the source's global position;
        returns the rows already delivered from the window at that position.

        `source_changed`: the source restored into another state than the saved one (e.g. a
        mixture with new weights); allowed only at a window boundary (no rows delivered yet).
        """
        if not isinstance(state, dict):
            raise StateMismatchError(
                "pipeline state has no 'packing' entry (it was saved without PackSequences); "
                "resume with the stages it was saved with"
            )
        expected = self.get_state(position // self.window, 0)
        for field in ("length", "fields", "window", "long", "window_index"):
            if state.get(field) != expected[field]:
                raise StateMismatchError(
                    f"pipeline state field 'packing.{field}' is {state.get(field)!r} but this "
                    f"pipeline has {expected[field]!r}; rows are packed per window with these "
                    "settings, so resume with the PackSequences the state was saved with"
                )
        if position % self.window and position != end:
            raise StateMismatchError(
                f"pipeline state puts the source at global position {position}, inside packing "
                f"window {position // self.window}: the state was not saved by a packed pipeline"
            )
        rows = state.get("rows_delivered")
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
            raise StateMismatchError(f"pipeline state field 'packing.rows_delivered' is {rows!r}")
        if rows and source_changed:
            raise StateMismatchError(
                f"pipeline state was saved after {rows} rows of packing window "
                f"{position // self.window}, but the source restored into another state (e.g. a "
                "mixture with new weights), which would re-pack that window from other records "
                "and repeat or skip some; resume with the saved source settings, or from a state "
                "saved at a window boundary (packing.rows_delivered == 0)"
            )
        return rows
