"""What every resumax source shares: its config, its order, its position and its O(1) state.

A source knows how many records an epoch has and how to read records by index; the order they come
in is `resumax.order` of (seed, epoch, position), and the position lives in two `nnx.Variable`s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from flax import nnx

from resumax import order
from resumax.errors import ConfigError, DataSourceError, StateMismatchError
from resumax.sources.record_ref import RecordRef
from resumax.sources.state_files import StateFileCheckpointable
from resumax.sources.window_order import WindowOrder

STATE_VERSION = 1
# Positions whose order is computed together: large enough to amortise numpy call overhead,
# small enough (64 KiB of int64) to stay O(1) in the dataset size.
ORDER_BLOCK = 8192
_MAX_SEED = 2**63 - 1
# Global positions (epoch * records_per_epoch + index) are int64 in the order functions.
_MAX_POSITION = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class ArrayRecordSourceConfig:
    """How a source orders its records.

    Attributes:
      seed: shuffle seed; epoch e is shuffled with `seed + e`.
      num_epochs: -1 iterates forever; N > 0 stops after N epochs.
      shuffle_files: True shuffles records globally (across files) with a fresh order each epoch.
      shuffle_window: None (default) keeps that global record-level shuffle. An int W (with
        shuffle_files=True) shuffles the files' order each epoch and permutes the records within
        windows of W consecutive records of that file order (`resumax.sources.window_order`):
        each file is read once per window instead of once per record, which over many small
        shards is far faster, at the price of a shuffle that mixes records only within a window.
    """

    seed: int = 42
    num_epochs: int = -1
    shuffle_files: bool = False
    shuffle_window: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an int, got {self.seed!r}")
        if not 0 <= self.seed <= _MAX_SEED:
            raise ConfigError(f"seed must be between 0 and 2**63-1, got seed={self.seed}")
        if not isinstance(self.num_epochs, int) or isinstance(self.num_epochs, bool):
            raise ConfigError(f"num_epochs must be an int, got {self.num_epochs!r}")
        if self.num_epochs == 0 or self.num_epochs < -1:
            raise ConfigError(
                "num_epochs must be -1 (infinite) or a positive int, "
                f"got num_epochs={self.num_epochs}"
            )
        if not isinstance(self.shuffle_files, bool):
            raise ConfigError(f"shuffle_files must be a bool, got {self.shuffle_files!r}")
        window = self.shuffle_window
        if window is not None:
            if not isinstance(window, int) or isinstance(window, bool) or window < 1:
                raise ConfigError(
                    f"shuffle_window must be None (global shuffle) or an int >= 1 (records per "
                    f"shuffle window), got shuffle_window={window!r}"
                )
            if not self.shuffle_files:
                raise ConfigError(
                    f"shuffle_window={window} needs shuffle_files=True: it says how records are "
                    "shuffled; drop it to read in order"
                )


class DataPosition(nnx.Variable):
    """A source's position: the epoch and the next position within it, in epoch order."""

    def set_position(self, value: int) -> None:
        """Sets the Python int `value`, as `set_raw_value` does, without its trace-context check.

        The pipeline moves its positions once per batch on the caller's thread; nnx's check
        (twice per write, about 3 us) guards arrays that a jax trace could capture, which a
        position, a plain int never traced, is not.
        """
        object.__setattr__(self, "_raw_value", value)


def fingerprint(names_and_counts: Sequence[tuple[str, int]]) -> str:
    """A short hash of (name, record count) pairs: identifies a dataset, not where it lives."""
    payload = json.dumps([[name, int(count)] for name, count in names_and_counts])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class _OrderBlockCache:
    """The last computed block of an epoch's order; kept off the module's nnx state.

    Key and block are swapped in as one tuple, so a reader in another thread (a pipeline's
    prefetch thread) never pairs a key with another key's block.
    """

    def __init__(self) -> None:
        self._entry: tuple[tuple[int, int], np.ndarray] | None = None

    def get(self, epoch: int, block: int) -> np.ndarray | None:
        entry = self._entry
        return entry[1] if entry is not None and entry[0] == (epoch, block) else None

    def put(self, epoch: int, block: int, indices: np.ndarray) -> None:
        self._entry = ((epoch, block), indices)


# Not a JAX pytree, nor are its subclasses: Orbax v1 rebuilds the pytrees it loads into, so it
# would restore a copy and leave this source where it was.
class RecordSource(StateFileCheckpointable, nnx.Module, pytree=False):
    """Base of resumax sources: order, position and state over `read_records` of a subclass."""

    def __init_subclass__(cls, pytree: bool = False, **kwargs: Any) -> None:
        # Subclasses stay non-pytrees too unless they say otherwise.
        super().__init_subclass__(pytree=pytree, **kwargs)

    def __init__(
        self, config: ArrayRecordSourceConfig, *, records_per_epoch: int, fingerprint: str
    ):
        if not isinstance(config, ArrayRecordSourceConfig):
            raise ConfigError(f"config must be an ArrayRecordSourceConfig, got {config!r}")
        self.config = config
        self.records_per_epoch = records_per_epoch
        self.fingerprint = fingerprint
        self.current_epoch = DataPosition(0)
        self.current_index = DataPosition(0)
        self._order_cache = _OrderBlockCache()
        self._window_order: WindowOrder | None = None
        self._closed = False

    def read_records(self, record_indices: Sequence[int]) -> list[Any]:
        """Decoded records at the given dataset indices, in that order."""
        raise NotImplementedError

    @property
    def batch_decodable(self) -> bool:
        """True when `read_raw` gives records in resumax's codec (`resumax.records.decode`)."""
        return False

    def read_raw(self, record_indices: Sequence[int]) -> list[bytes]:
        """Undecoded bytes of the records at the given dataset indices, for sources of bytes."""
        raise NotImplementedError

    def reopener(self) -> Callable[[], RecordSource]:
        """A picklable zero-argument callable that opens this source's data again.

        Worker processes read through it, since open file readers cannot be pickled. The source
        it returns has the same config and records, at position (0, 0).
        """
        raise ConfigError(
            f"{type(self).__name__} cannot be read in worker processes: it does not implement "
            "reopener(); use num_workers=0"
        )

    def read_ahead_limit(self) -> int | None:
        """The most positions a pipeline may read ahead of the caller (None: no bound); a
        remote source's cache holds only so many shards."""
        return None

    def spans_ready(self, spans: Iterator[tuple[int, int]]) -> Iterator[tuple[int, int]]:
        """The spans of global positions a pipeline will read, each yielded once this source can
        read it without waiting (a remote source fetches its shards first); default: as given.
        What it returns may have a `stop_reading()` method, which the pipeline calls (from any
        thread) when its iterator ends, to stop downloads and release what it holds."""
        return spans

    def __len__(self) -> int:
        return self.records_per_epoch

    def file_record_counts(self) -> Sequence[int]:
        """Records of each file in dataset order, which `shuffle_window` keeps together; a source
        without files is one file."""
        return [self.records_per_epoch]

    # Lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Releases what the source holds open; reading afterwards raises DataSourceError."""
        self._closed = True

    def check_open(self) -> None:
        """Raises DataSourceError if `close()` was called (subclasses call it before reading)."""
        if self._closed:
            raise DataSourceError(
                f"this {type(self).__name__} is closed (by close() or the end of a `with` block); "
                "open a new source to read again"
            )

    def __enter__(self) -> RecordSource:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __getitem__(self, index: int) -> Any:
        if not -self.records_per_epoch <= index < self.records_per_epoch:
            raise IndexError(f"record index {index} out of range for {self.records_per_epoch}")
        return self.read_records([index % self.records_per_epoch])[0]

    # Position ---------------------------------------------------------------------------------

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, index of the next record in that epoch's order)."""
        return self.current_epoch.get_raw_value(), self.current_index.get_raw_value()

    def seek(self, epoch: int, index: int) -> None:
        """Moves to (epoch, index); an index at the end of an epoch is the start of the next."""
        epoch = int(epoch + index // self.records_per_epoch)
        # Raw access: a position is a Python int, which nnx's get_value / set_value would copy
        # through jax.tree.map at ~4 us each, on every batch the caller takes.
        if self.current_epoch.get_raw_value() != epoch:
            self.current_epoch.set_position(epoch)
        self.current_index.set_position(int(index % self.records_per_epoch))

    def finished(self, epoch: int) -> bool:
        """True once `epoch` is past the last epoch of a finite source."""
        return self.config.num_epochs != -1 and epoch >= self.config.num_epochs

    def record_indices(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Dataset indices at positions [start, stop) of an epoch (stop <= records_per_epoch)."""
        if not self.config.shuffle_files:
            return np.arange(start, stop, dtype=np.int64)
        if self.config.shuffle_window is not None:
            if self._window_order is None:
                self._window_order = WindowOrder(
                    self.file_record_counts(), self.config.seed, self.config.shuffle_window
                )
            return self._window_order.record_indices(epoch, start, stop)
        first_block, last_block = start // ORDER_BLOCK, (stop - 1) // ORDER_BLOCK
        if first_block != last_block:
            middle = (first_block + 1) * ORDER_BLOCK
            return np.concatenate(
                [
                    self.record_indices(epoch, start, middle),
                    self.record_indices(epoch, middle, stop),
                ]
            )
        block = self._order_cache.get(epoch, first_block)
        if block is None:
            block_start = first_block * ORDER_BLOCK
            block_stop = min(block_start + ORDER_BLOCK, self.records_per_epoch)
            block = order.record_indices(
                np.arange(block_start, block_stop),
                num_records=self.records_per_epoch,
                seed=self.config.seed,
                epoch=epoch,
                shuffle=True,
            )
            self._order_cache.put(epoch, first_block, block)
        offset = first_block * ORDER_BLOCK
        return block[start - offset : stop - offset]

    # Provenance -------------------------------------------------------------------------------

    def locate(self, record_indices: Sequence[int]) -> list[tuple[str | None, int]]:
        """(file or URL, record inside it) of each dataset index; (None, index) without files."""
        return [(None, int(index)) for index in record_indices]

    def record_refs(self, positions: Sequence[int]) -> list[RecordRef]:
        """The records at global positions (epoch * records_per_epoch + index), named from the
        order alone: nothing is read."""
        refs = []
        for position in positions:
            epoch, offset = divmod(int(position), self.records_per_epoch)
            index = int(self.record_indices(epoch, offset, offset + 1)[0])
            ((path, record),) = self.locate([index])
            refs.append(RecordRef(int(position), epoch, index, None, path, record))
        return refs

    def __iter__(self) -> Iterator[Any]:
        """Yields records from the current position to the end of the last epoch, advancing it."""
        while True:
            epoch, index = self.position
            if self.finished(epoch):
                return
            stop = min(index + 256, self.records_per_epoch)
            records = self.read_records(self.record_indices(epoch, index, stop))
            for offset, record in enumerate(records, start=1):
                self.seek(epoch, index + offset)
                yield record

    # State ------------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """The position as a small JSON-serialisable dict, O(1) in the dataset size."""
        epoch, index = self.position
        state = {
            "version": STATE_VERSION,
            "current_epoch": epoch,
            "current_index": index,
            "seed": self.config.seed,
            "shuffle": self.config.shuffle_files,
            "num_records": self.records_per_epoch,
            "fingerprint": self.fingerprint,
        }
        if self.config.shuffle_window is not None:
            # Only when set: states of the global shuffle stay as they were.
            state["shuffle_window"] = self.config.shuffle_window
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a position saved by `get_state`, after checking it belongs to this source."""
        if not isinstance(state, dict):
            raise StateMismatchError(f"a source state must be a dict, got {type(state).__name__}")
        expected = self.get_state()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise StateMismatchError(f"source state lacks the field(s) {missing}; got {state!r}")
        # num_records before fingerprint: records added to a file change both, and the count
        # is the more telling of the two.
        for field in ("version", "num_records", "fingerprint", "seed", "shuffle"):
            if state[field] != expected[field] or type(state[field]) is not type(expected[field]):
                raise StateMismatchError(
                    f"source state field {field!r} is {state[field]!r} but this source has "
                    f"{expected[field]!r}; the state was saved for another "
                    f"{'state version' if field == 'version' else 'dataset or config'}"
                )
        if state.get("shuffle_window") != self.config.shuffle_window:
            raise StateMismatchError(
                f"source state field 'shuffle_window' is {state.get('shuffle_window')!r} but this "
                f"source has {self.config.shuffle_window!r}; the records come in another order: "
                "resume with the shuffle_window the state was saved with"
            )
        epoch, index = state["current_epoch"], state["current_index"]
        for name, value in (("current_epoch", epoch), ("current_index", index)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise StateMismatchError(
                    f"source state field {name!r} must be an int >= 0, got {value!r}"
                )
        if index > self.records_per_epoch:
            raise StateMismatchError(
                f"source state field 'current_index' is {index}, past the {self.records_per_epoch} "
                "records of an epoch"
            )
        if epoch * self.records_per_epoch + index > _MAX_POSITION:
            raise StateMismatchError(
                f"source state field 'current_epoch' is {epoch}: at {self.records_per_epoch} "
                "records per epoch its position lies past what an int64 can index (2**63-1); "
                "the state is corrupt or belongs to another dataset"
            )
        last_epoch = self.config.num_epochs
        if last_epoch != -1 and (epoch, index) > (last_epoch, 0):
            raise StateMismatchError(
                f"source state field 'current_epoch' is {epoch}, past num_epochs={last_epoch}"
            )
        self.seek(epoch, index)
