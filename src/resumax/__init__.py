"""resumax: training input for JAX / Flax NNX whose data position is part of the checkpoint.

The names below are imported on first use (PEP 562), so that a process that needs only part of
the library (a converter's Beam worker, `resumax convert` or `resumax index`, code importing
`resumax.records`) does not pay for JAX and Flax: `resumax.Pipeline` imports the pipeline then.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from resumax import order, records
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

# Each lazily imported name and the module that defines it.
_LAZY = {
    **dict.fromkeys(("order", "records"), "resumax"),
    "Pipeline": "resumax.pipeline",
    **dict.fromkeys(
        ("TFExample", "decode", "encode", "write_array_record", "write_shards"), "resumax.records"
    ),
    **dict.fromkeys(
        (
            "ArrayRecordSourceConfig",
            "ArrayRecordSourceModule",
            "DataSourceModule",
            "MemorySource",
            "MixtureSource",
            "RecordSource",
            "tfds_source",
        ),
        "resumax.sources",
    ),
    "RecordRef": "resumax.sources.record_ref",
    **dict.fromkeys(
        ("BatchMap", "Filter", "Map", "MapWithIndex", "PackSequences", "Pad", "RandomMap"),
        "resumax.stages",
    ),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'resumax' has no attribute {name!r}")
    if module == "resumax":
        value = importlib.import_module(f"resumax.{name}")
    else:
        value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
