"""Record sources: ArrayRecord files, TFDS directories, any random-access data source, in-memory
examples and weighted mixtures of sources, sharing one order and state format."""

from resumax.sources.array_record import ArrayRecordSourceModule
from resumax.sources.base import ArrayRecordSourceConfig, RecordSource
from resumax.sources.data_source import DataSourceModule
from resumax.sources.files.resolve import resolve_paths
from resumax.sources.memory import MemorySource
from resumax.sources.mixture import MixtureSource
from resumax.sources.tfds import tfds_source

__all__ = [
    "ArrayRecordSourceConfig",
    "ArrayRecordSourceModule",
    "DataSourceModule",
    "MemorySource",
    "MixtureSource",
    "RecordSource",
    "resolve_paths",
    "tfds_source",
]
