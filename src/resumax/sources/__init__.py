"""Record sources: ArrayRecord files and in-memory examples, sharing one order and state format."""

from resumax.sources.array_record import ArrayRecordSourceModule, resolve_paths
from resumax.sources.base import ArrayRecordSourceConfig, RecordSource
from resumax.sources.memory import MemorySource

__all__ = [
    "ArrayRecordSourceConfig",
    "ArrayRecordSourceModule",
    "MemorySource",
    "RecordSource",
    "resolve_paths",
]
