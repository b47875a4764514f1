"""`RecordRef`: one record named by where it sits in the stream and where it lives on disk, so that
a batch can be traced back to its data without reading it."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RecordRef:
    """A record of the stream a pipeline reads.

    Attributes:
      position: the global position in the record stream (epoch * records_per_epoch + index of
        the pipeline's source; for a mixture, the mixture's position).
      epoch: the epoch of the source the record comes from (a mixture component's own epoch).
      index: the record's dataset index in that source (`source[index]` reads it).
      source: the mixture component's name, or None outside a mixture.
      path: the file or URL holding the record; None for sources without files
        (`MemorySource`, `DataSourceModule`).
      record: the record's index inside `path` (the item index when `path` is None).
    """

    position: int
    epoch: int
    index: int
    source: str | None
    path: str | None
    record: int

    def to_json(self) -> dict[str, object]:
        """The fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)
