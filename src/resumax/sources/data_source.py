"""`DataSourceModule`: resumax order, state and workers over any random-access data source.

Anything with `__len__` and `__getitem__` works (Grain's `RandomAccessDataSource` protocol): Grain's
`ArrayRecordDataSource` / `SharedMemoryDataSource` / `RangeDataSource`, TFDS data sources, Hugging
Face datasets. Its fingerprint hashes a few items' contents, so moving the data keeps resume valid.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flax import nnx

from resumax.errors import ConfigError, DataSourceError, RecordDecodeError
from resumax.sources.base import ArrayRecordSourceConfig, RecordSource
from resumax.workers.worker import require_picklable

# Items hashed into the fingerprint: evenly spaced, first and last included.
FINGERPRINT_SAMPLES = 8
_FINGERPRINT_VERSION = b"resumax-data-source-fingerprint-1"


def sample_indices(num_records: int, samples: int = FINGERPRINT_SAMPLES) -> list[int]:
    """`samples` evenly spaced indices of [0, num_records), first and last included."""
    if num_records <= samples:
        return list(range(num_records))
    return sorted({i * (num_records - 1) // (samples - 1) for i in range(samples)})


def canonical_bytes(item: Any) -> bytes:
    """A byte form of an item that depends on its value only (not its identity or location).

    bytes as they are; str as UTF-8; numpy arrays, numpy scalars and objects with
    `__array__` (JAX arrays, PIL images) as dtype, shape and raw bytes; bool/int/float/None by
    value; dicts by sorted key; lists and tuples item by item (numpy arrays include objects with
    `__array_interface__`). Anything else: its type name and
    `repr`, which must not name a memory address (ConfigError otherwise).
    """
    if isinstance(item, bytes | bytearray | memoryview):
        return _tagged(b"B", bytes(item))
    if isinstance(item, str):
        return _tagged(b"S", item.encode())
    if isinstance(item, bool | int | float | type(None)):
        return _tagged(b"P", repr(item).encode())
    if isinstance(item, dict):
        entries = sorted((canonical_bytes(str(k)), canonical_bytes(v)) for k, v in item.items())
        return _tagged(b"D", b"".join(key + value for key, value in entries))
    if isinstance(item, list | tuple):
        return _tagged(b"L", b"".join(map(canonical_bytes, item)))
    if isinstance(item, np.ndarray | np.generic) or any(
        hasattr(item, name) for name in ("__array__", "__array_interface__")
    ):
        array = np.asarray(item)
        if array.dtype.kind != "O":
            header = _tagged(b"H", f"{array.dtype.str}{array.shape}".encode())
            return _tagged(b"A", header + np.ascontiguousarray(array).tobytes())
    text = f"{type(item).__module__}.{type(item).__qualname__}:{item!r}"
    if " at 0x" in text:
        raise ConfigError(
            f"cannot fingerprint a data source item of type {type(item).__qualname__}: its repr "
            f"names a memory address ({item!r}), so it would differ between runs; make the data "
            "source return bytes, arrays, dicts or lists"
        )
    return _tagged(b"R", text.encode())


def _tagged(tag: bytes, data: bytes) -> bytes:
    """tag + length + data: no two different items give the same concatenation."""
    return tag + struct.pack("<Q", len(data)) + data


class _DataSourceHolder:
    """Keeps the data source off the module's nnx state (it is data, not position)."""

    def __init__(self, data_source: Any):
        self.data_source = data_source


class DataSourceModule(RecordSource):
    """Records of any object with `__len__` and `__getitem__`, in a seeded per-epoch order.

    Args:
      config: seed, num_epochs and shuffle_files (`ArrayRecordSourceConfig`).
      data_source: the random-access data source; `__getitems__(list)` is used when present.
      rngs: accepted for Datarax compatibility; the order depends on `config.seed` alone.
      decode: item -> example, applied to each item read (None: items pass through unchanged).

    The fingerprint hashes the length and the contents of a few evenly spaced items
    (`canonical_bytes`): it identifies the data, so moved files still resume and another dataset
    of the same length is refused. Worker processes get a pickled copy of the data source
    (Grain's ArrayRecordDataSource reopens its files); a data source that does not pickle raises
    ConfigError when a pipeline with num_workers > 0 is built over it.
    """

    def __init__(
        self,
        config: ArrayRecordSourceConfig,
        data_source: Any,
        *,
        rngs: nnx.Rngs | None = None,
        decode: Callable[[Any], Any] | None = None,
    ):
        if not (hasattr(data_source, "__len__") and hasattr(data_source, "__getitem__")):
            raise ConfigError(
                f"data_source must have __len__ and __getitem__ (a random-access data source), "
                f"got {type(data_source).__name__}"
            )
        if decode is not None and not callable(decode):
            raise ConfigError(f"decode must be a callable or None, got {decode!r}")
        try:
            num_records = len(data_source)
        except Exception as error:
            raise DataSourceError(
                f"len() of the data source {data_source!r} failed: {error}"
            ) from error
        if num_records == 0:
            raise DataSourceError(f"the data source {data_source!r} holds no records")
        self._holder = _DataSourceHolder(data_source)
        self._decode = decode
        digest = hashlib.sha256(_FINGERPRINT_VERSION + struct.pack("<Q", num_records))
        for index, item in zip(
            sample_indices(num_records),
            self._read(sample_indices(num_records)),
            strict=True,
        ):
            digest.update(struct.pack("<Q", index) + canonical_bytes(item))
        super().__init__(
            config, records_per_epoch=int(num_records), fingerprint=digest.hexdigest()[:16]
        )

    @property
    def data_source(self) -> Any:
        """The wrapped data source."""
        return self._holder.data_source

    def _read(self, record_indices: Sequence[int]) -> list[Any]:
        """Raw items at the given indices; DataSourceError naming the first that fails."""
        data_source = self._holder.data_source
        getitems = getattr(data_source, "__getitems__", None)
        try:
            if getitems is not None:
                return list(getitems(list(record_indices)))
            return [data_source[index] for index in record_indices]
        except Exception as error:
            for index in record_indices:
                try:
                    data_source[index]
                except Exception as single_error:
                    raise DataSourceError(
                        f"the data source {data_source!r} failed to read record {index}: "
                        f"{single_error!r}"
                    ) from single_error
            raise DataSourceError(
                f"the data source {data_source!r} failed to read records {record_indices[:8]}...: "
                f"{error!r}"
            ) from error

    def read_records(self, record_indices: Sequence[int]) -> list[Any]:
        """Decoded items at the given dataset indices, in that order."""
        self.check_open()
        record_indices = [int(index) for index in record_indices]
        items = self._read(record_indices)
        decode = self._decode
        if decode is None:
            return items
        decoded = []
        for index, item in zip(record_indices, items, strict=True):
            try:
                decoded.append(decode(item))
            except Exception as error:
                raise RecordDecodeError(
                    f"record {index} of the data source {self._holder.data_source!r} cannot be "
                    f"decoded by {decode!r}: {error}"
                ) from error
        return decoded

    def reopener(self) -> Callable[[], DataSourceModule]:
        """A copy of this source over a pickled copy of the data source, e.g. for a worker.

        ConfigError if the data source does not pickle: workers could not read it.
        """
        data_source = self._holder.data_source
        require_picklable(
            data_source,
            f"the data source {data_source!r}",
            "use num_workers=0, or a data source that pickles (Grain's ArrayRecordDataSource "
            "reopens its files in each worker)",
        )
        return functools.partial(DataSourceModule, self.config, data_source, decode=self._decode)

    def close(self) -> None:
        """Marks the source closed and closes the data source if it has `close()`."""
        close = getattr(self._holder.data_source, "close", None)
        if callable(close) and not self._closed:
            close()
        super().close()
