"""Checks that keep a training run from going silently wrong: writable output directories and
labels inside the model's classes before step 1, and a finite loss before anything is saved.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import jax
import numpy as np

from resumax.errors import ConfigError, ResumaxError, StageError
from resumax.sources.base import RecordSource
from resumax.stages import BatchMap
from resumax.train import distributed
from resumax.train.config import Config

# Records whose labels are read before step 1; the label-check stage covers the rest as they come.
LABEL_SCAN_LIMIT = 20_000


class NonFiniteLossError(ResumaxError):
    """The training loss became NaN or infinite; the state of that step is not saved."""


def check_writable(key: str, directory: str, shown: str | None = None) -> None:
    """Creates `directory` (and parents) if needed and writes a file in it, or raises ConfigError
    naming `key` and `shown` (the configured path, if `directory` is derived from it): finding
    out at the first save would leave Orbax's threads waiting forever."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory, prefix=".resumax-write-check-"):
            pass
    except OSError as error:
        raise ConfigError(
            f"{key}: cannot create or write {shown or directory!r}: {_cause(directory, error)}; "
            f"set {key} to a directory this user can write"
        ) from error


def _cause(directory: str, error: OSError) -> str:
    """Why `directory` cannot be used, naming the path component at fault."""
    ancestor = os.path.abspath(directory)
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        return f"{ancestor!r} is a file, not a directory"
    return error.strerror or type(error).__name__


def check_output_dirs(config: Config) -> None:
    """`train.run_dir` and `train.checkpoint_dir` must be writable; so must `data.dir`'s parent
    when `data.prepare` will write the data set there (an existing data set is only read)."""
    check_writable("train.run_dir", config.train.run_dir)
    check_writable("train.checkpoint_dir", config.train.checkpoint_dir)
    data_dir = os.path.abspath(config.data.dir)
    if config.data.prepare is not None and not os.path.isdir(data_dir):
        # Preparation writes a temporary sibling and renames it to data.dir.
        check_writable("data.dir", os.path.dirname(data_dir), shown=config.data.dir)


def _label_error(label: int, num_classes: int, where: str) -> ConfigError:
    return ConfigError(
        f"model.num_classes is {num_classes} but {where} has label {label}; labels must be in "
        f"[0, {num_classes}): set model.num_classes to at least {label + 1} or check the data"
    )


def check_labels(source: RecordSource, num_classes: int, paths_key: str) -> None:
    """Reads the labels of the first LABEL_SCAN_LIMIT records of `source` (all of a small data
    set, e.g. the digits' 1,437) and raises ConfigError if one is outside [0, num_classes)."""
    for index in range(min(len(source), LABEL_SCAN_LIMIT)):
        label = int(np.asarray(source[index]["label"]))
        if not 0 <= label < num_classes:
            raise _label_error(label, num_classes, f"record {index} of {paths_key}")


def label_range_check(num_classes: int) -> BatchMap:
    """A batch stage that raises ConfigError on a label outside [0, num_classes): it runs in the
    pipeline's thread, one min/max per batch, so it costs the training loop nothing."""

    def check(batch: dict[str, Any]) -> dict[str, Any]:
        labels = batch["label"]
        if labels.size and not (labels.min() >= 0 and labels.max() < num_classes):
            bad = labels[(labels < 0) | (labels >= num_classes)]
            raise _label_error(int(bad[0]), num_classes, "a training batch")
        return batch

    return BatchMap(check, name="label range check")


def unwrap_config_error(error: StageError) -> ResumaxError:
    """The ConfigError a check stage raised, rather than the StageError the pipeline wrapped it
    in; any other stage error as it is."""
    return error.__cause__ if isinstance(error.__cause__, ConfigError) else error


class FiniteLossGuard:
    """Keeps the loss of each step until the next check, to find the first non-finite one.

    `observe` only appends the (still computing) loss array, so a step gets no host sync and
    no extra dispatch; `check` (called where the loop syncs anyway: a logged step, before every
    save) reads them and raises NonFiniteLossError, so a NaN state is never checkpointed.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[int, jax.Array]] = []

    def observe(self, step: int, loss: jax.Array) -> None:
        """Records the loss of `step` (1-based: the step just applied)."""
        self._pending.append((step, loss))

    def check(self, latest_saved: int | None) -> None:
        """Raises NonFiniteLossError if any loss observed since the last check is NaN or inf."""
        pending, self._pending = self._pending, []
        for step, loss in pending:
            value = float(distributed.host_array(loss))
            if math.isfinite(value):
                continue
            kept = (
                f"the latest checkpoint stays step {latest_saved}"
                if latest_saved is not None
                else "nothing was saved"
            )
            raise NonFiniteLossError(
                f"the training loss is {value} at step {step}: stopped without saving that state "
                f"({kept}). Check that the labels fit model.num_classes and the inputs are "
                f"finite (`resumax batches --config CONFIG --step {step} --show` prints the "
                "records of that step), or lower optimizer.learning_rate. To go past bad data, "
                "run again with --rewind-to STEP --skip-batches K, or set train.spike_recovery"
            )
