"""resumax: training input for JAX / Flax NNX whose data position is part of the checkpoint."""

from resumax import errors, order, records
from resumax.errors import (
    CheckpointError,
    ConfigError,
    DataFileNotFoundError,
    DataSourceError,
    RecordDecodeError,
    RecordEncodeError,
    ResumaxError,
    StageError,
    StateMismatchError,
    WorkerError,
)
from resumax.pipeline import Pipeline
from resumax.records import TFExample, decode, encode, write_array_record, write_shards
from resumax.sources import (
    ArrayRecordSourceConfig,
    ArrayRecordSourceModule,
    DataSourceModule,
    MemorySource,
    MixtureSource,
    RecordSource,
    tfds_source,
)
from resumax.sources.record_ref import RecordRef
from resumax.stages import BatchMap, Filter, Map, MapWithIndex, PackSequences, Pad, RandomMap

__version__ = "0.1.0"

__all__ = [
    "ArrayRecordSourceConfig",
    "ArrayRecordSourceModule",
    "BatchMap",
    "CheckpointError",
    "ConfigError",
    "DataFileNotFoundError",
    "DataSourceError",
    "DataSourceModule",
    "Filter",
    "Map",
    "MapWithIndex",
    "MemorySource",
    "MixtureSource",
    "PackSequences",
    "Pad",
    "Pipeline",
    "RandomMap",
    "RecordDecodeError",
    "RecordEncodeError",
    "RecordRef",
    "RecordSource",
    "ResumaxError",
    "StageError",
    "StateMismatchError",
    "TFExample",
    "WorkerError",
    "decode",
    "encode",
    "errors",
    "order",
    "records",
    "tfds_source",
    "write_array_record",
    "write_shards",
]
