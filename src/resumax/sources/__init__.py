"""Record sources: ArrayRecord files, in-memory examples and weighted mixtures of sources, sharing
one order and state format."""

from resumax.sources.array_record import ArrayRecordSourceModule, resolve_paths
from resumax.sources.base import ArrayRecordSourceConfig, RecordSource
from resumax.sources.memory import MemorySource
from resumax.sources.mixture import MixtureSource

__all__ = [
    "ArrayRecordSourceConfig",
    "ArrayRecordSourceModule",
    "MemorySource",
    "MixtureSource",
    "RecordSource",
    "resolve_paths",
]
