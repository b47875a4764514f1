"""Typed training configs: YAML files and `key=value` overrides merged onto structured dataclasses.

OmegaConf checks key names and types against the dataclasses; `validate` checks ranges. Every
problem becomes a `ConfigError` that names the dotted key at fault.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from collections.abc import Sequence
from typing import Any

import optax
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from resumax.errors import ConfigError
from resumax.records.storage import is_url
from resumax.sources.files.remote import parse_bytes

PREPARE_CHOICES = ("digits", "stdlib_text")
MODEL_CHOICES = ("mlp", "cnn", "transformer")
SCHEDULE_CHOICES = ("constant", "cosine", "warmup_cosine")
_MAX_SEED = 2**32 - 1


@dataclasses.dataclass
class DataConfig:
    """Where the records are and how they are ordered and batched.

    `train_paths` / `test_paths` are globs; `prepare: digits` writes scikit-learn's digits there
    on first use. The order is a function of `seed` alone. The language model (model.name:
    transformer) reads instead a mixture of `${data.dir}/<name>-*.array_record` corpora with
    `weights` {name: weight} (`prepare: stdlib_text` writes "prose" and "code"), packed into rows
    of `sequence_length` tokens per `window` records; `batch_size` then counts rows.
    `num_workers` worker processes read and decode the training records (identical batches for
    any value; see `resumax profile --config` for the one that pays off). `prefetch` batches are
    computed ahead of the step loop; it should exceed the steps the loop runs in one switch
    interval of the interpreter lock (5 ms), so the thread refilling them is never late.
    Paths may be URLs (`s3://`, `gs://`, any fsspec protocol): `storage_options` go to fsspec as
    they are, and the shards are read through a local cache (`cache_dir`, `cache_limit` such as
    "20GB", `fetch_threads`, `fetch_timeout` seconds; unset: the library's defaults).
    `shuffle_window` reads the files in a shuffled order, records shuffled within windows of
    that many records, which a cache smaller than the set needs.
    """

    dir: str = "runs/data/digits"
    train_paths: str = "${data.dir}/train-*.array_record"
    test_paths: str = "${data.dir}/test-*.array_record"
    prepare: str | None = None
    seed: int = 0
    num_epochs: int = -1
    shuffle_files: bool = True
    batch_size: int = 32
    num_workers: int = 0
    prefetch: int = 32
    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    sequence_length: int = 128
    window: int = 512
    shuffle_window: int | None = None
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    cache_dir: str | None = None
    cache_limit: str | None = None
    fetch_threads: int | None = None
    fetch_timeout: float | None = None

    def source_options(self) -> dict[str, Any]:
        """The keywords every ArrayRecordSourceModule of the run takes: where URL paths' shards
        are cached and how they are fetched (ignored for local paths)."""
        return {
            "storage_options": dict(self.storage_options),
            "cache_dir": self.cache_dir,
            "cache_limit": self.cache_limit,
            "fetch_threads": self.fetch_threads,
            "fetch_timeout": self.fetch_timeout,
        }


@dataclasses.dataclass
class ModelConfig:
    """A small classifier: `mlp` (hidden_sizes) or `cnn` (channels, 3x3 convs + 2x2 pooling), or
    a byte-level decoder-only `transformer` (num_layers, num_heads, embed_dim)."""

    name: str = "mlp"
    hidden_sizes: list[int] = dataclasses.field(default_factory=lambda: [128, 64])
    channels: list[int] = dataclasses.field(default_factory=lambda: [16, 32])
    dropout: float = 0.0
    num_classes: int = 10
    num_layers: int = 2
    num_heads: int = 4
    embed_dim: int = 128


@dataclasses.dataclass
class OptimizerConfig:
    """An Optax optimizer by name (e.g. adam, adamw, sgd), its learning-rate schedule and decay."""

    name: str = "adam"
    learning_rate: float = 1e-3
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0


@dataclasses.dataclass
class SpikeRecoveryConfig:
    """`train.spike_recovery`: a step whose loss is non-finite or above `factor` x the median
    of the previous `window` steps' losses restores the latest checkpoint and skips the batches
    from it through the spike, plus `skip_batches` more; after `max_recoveries` the run stops."""

    factor: float = 4.0
    window: int = 50
    skip_batches: int = 100
    max_recoveries: int = 3


@dataclasses.dataclass
class TrainConfig:
    """Length of the run, how often to log, evaluate and checkpoint, and where outputs go."""

    num_steps: int = 1000
    log_every: int = 10
    # Also write each metrics.jsonl line to TensorBoard event files in <run_dir>/tensorboard/.
    tensorboard: bool = False
    eval_every: int = 200
    checkpoint_every: int = 100
    # null: a NaN stops the run (exit 2); see SpikeRecoveryConfig.
    spike_recovery: SpikeRecoveryConfig | None = None
    run_dir: str = "runs/digits"
    checkpoint_dir: str = "${train.run_dir}/checkpoints"
    max_to_keep: int = 3
    seed: int = 0
    distributed: bool = False
    # With distributed: where process 0 listens (host:port), how many processes, which one this
    # is; unset values come from $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID.
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass
class Config:
    """The whole training config: one section per concern."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


_SECTIONS = tuple(field.name for field in dataclasses.fields(Config))


def _omegaconf_error(error: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(error, "full_key", None) or "<config>"
    reason = str(getattr(error, "msg", error)).splitlines()[0]
    return ConfigError(f"{key}: {reason} (in {origin})")


def _load_yaml(path: str | os.PathLike) -> object:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {os.fspath(path)!r} does not exist")
    try:
        return OmegaConf.load(path)
    except Exception as error:
        # OmegaConf refuses a YAML document that is a scalar before we can look at it.
        scalar = re.search(r"Invalid loaded object type: (\w+)", str(error))
        if scalar:
            raise _not_sections(f"config file {os.fspath(path)!r}", scalar[1]) from error
        raise ConfigError(f"config file {os.fspath(path)!r} is not valid YAML: {error}") from error


def _parse_overrides(overrides: Sequence[str]) -> object:
    for override in overrides:
        if "=" not in override or override.startswith("="):
            raise ConfigError(f"override {override!r} must look like key=value, e.g. train.seed=1")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as error:
        raise _omegaconf_error(error, "command-line overrides") from error


def _check_sections(layer: object, origin: str) -> None:
    """A layer must be a mapping of sections, each a mapping of keys (or empty): OmegaConf's own
    errors for other shapes name neither the file nor the key."""
    if not isinstance(layer, DictConfig):
        kind = "list" if isinstance(layer, ListConfig) else type(layer).__name__
        raise _not_sections(origin, kind)
    for name, value in OmegaConf.to_container(layer, resolve=False).items():
        if value is None or isinstance(value, dict) or name not in _SECTIONS:
            continue
        kind = "list" if isinstance(value, list) else type(value).__name__
        raise ConfigError(
            f"{name}: expected a mapping of {name}.* keys (e.g. '{_example_key(name)}'), "
            f"got the YAML {kind} {value!r} (in {origin})"
        )


def _not_sections(origin: str, kind: str) -> ConfigError:
    return ConfigError(
        f"{origin}: its top level is a YAML {kind}; expected a mapping of the sections "
        f"{list(_SECTIONS)}, e.g. 'train: {{num_steps: 100}}'"
    )


def _example_key(section: str) -> str:
    first = dataclasses.fields(getattr(Config(), section))[0]
    return f"{section}: {{{first.name}: ...}}"


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file at `path` <- `key=value` overrides, checked and validated.

    Returns a plain `Config` (interpolations such as `${data.dir}` resolved). Raises ConfigError
    naming the key for unknown keys, wrong types and out-of-range values.
    """
    merged = OmegaConf.structured(Config)
    layers = []
    if path is not None:
        layers.append((_load_yaml(path), f"config file {os.fspath(path)!r}"))
    layers.append((_parse_overrides(overrides), "command-line overrides"))
    for layer, origin in layers:
        _check_sections(layer, origin)
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as error:
            raise _omegaconf_error(error, origin) from error
    try:
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise _omegaconf_error(error, "the merged config") from error
    validate(config)
    return config


def to_yaml(config: Config) -> str:
    """The config as YAML, e.g. to record next to a run's outputs."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def changed_keys(before: Config, after: Config) -> list[str]:
    """Dotted keys whose values differ between two configs, e.g. ["train.num_steps"]."""
    return [
        f"{section.name}.{field.name}"
        for section in dataclasses.fields(Config)
        for field in dataclasses.fields(getattr(before, section.name))
        if getattr(getattr(before, section.name), field.name)
        != getattr(getattr(after, section.name), field.name)
    ]


def _require(condition: bool, key: str, expectation: str, value: object) -> None:
    if not condition:
        raise ConfigError(f"{key} must be {expectation}, got {value!r}")


def _validate_data(data: DataConfig) -> None:
    _require(
        data.prepare in (None, *PREPARE_CHOICES),
        "data.prepare",
        f"null or one of {PREPARE_CHOICES}",
        data.prepare,
    )
    _require(0 <= data.seed <= _MAX_SEED, "data.seed", "between 0 and 2**32-1", data.seed)
    _require(
        data.num_epochs == -1 or data.num_epochs > 0,
        "data.num_epochs",
        "-1 (infinite) or > 0",
        data.num_epochs,
    )
    _require(data.batch_size > 0, "data.batch_size", "> 0", data.batch_size)
    _require(data.num_workers >= 0, "data.num_workers", ">= 0", data.num_workers)
    _require(data.prefetch >= 0, "data.prefetch", ">= 0", data.prefetch)
    for key in ("dir", "train_paths", "test_paths"):
        _require(bool(getattr(data, key)), f"data.{key}", "a non-empty path", getattr(data, key))
    for name, weight in data.weights.items():
        _require(weight > 0, f"data.weights.{name}", "> 0", weight)
    if data.prepare is not None and is_url(data.dir):
        raise ConfigError(
            f"data.prepare={data.prepare} writes local files, but data.dir is {data.dir!r}: set "
            "data.prepare=null to read the set there (prepare it locally, then upload it, e.g. "
            "with resumax.write_shards('s3://...', examples, num_shards))"
        )
    if data.shuffle_window is not None:
        _require(data.shuffle_window > 0, "data.shuffle_window", "null or > 0", data.shuffle_window)
        _require(
            data.shuffle_files,
            "data.shuffle_files",
            "true with data.shuffle_window set (the window shuffles records)",
            data.shuffle_files,
        )
    if data.cache_limit is not None:
        parse_bytes(data.cache_limit, "data.cache_limit")
    if data.fetch_threads is not None:
        _require(data.fetch_threads >= 1, "data.fetch_threads", "null or >= 1", data.fetch_threads)
    if data.fetch_timeout is not None:
        _require(data.fetch_timeout > 0, "data.fetch_timeout", "null or > 0", data.fetch_timeout)
    _require(data.sequence_length >= 2, "data.sequence_length", ">= 2", data.sequence_length)
    _require(data.window > 0, "data.window", "> 0", data.window)


def _validate_language_model(config: Config) -> None:
    """The transformer reads a weighted mixture of token corpora; the classifiers do not."""
    model, data = config.model, config.data
    if model.name != "transformer":
        return
    _require(bool(data.weights), "data.weights", "a non-empty {corpus: weight} map", data.weights)
    _require(data.num_epochs == -1, "data.num_epochs", "-1 for a mixture", data.num_epochs)
    for key in ("num_layers", "num_heads", "embed_dim"):
        _require(getattr(model, key) > 0, f"model.{key}", "> 0", getattr(model, key))
    _require(
        model.embed_dim % model.num_heads == 0,
        "model.embed_dim",
        f"a multiple of model.num_heads ({model.num_heads})",
        model.embed_dim,
    )


def _validate_model(model: ModelConfig) -> None:
    _require(model.name in MODEL_CHOICES, "model.name", f"one of {MODEL_CHOICES}", model.name)
    sizes_ok = all(size > 0 for size in model.hidden_sizes)
    _require(sizes_ok, "model.hidden_sizes", "a list of ints > 0", model.hidden_sizes)
    channels_ok = bool(model.channels) and all(c > 0 for c in model.channels)
    _require(channels_ok, "model.channels", "a non-empty list of ints > 0", model.channels)
    _require(0.0 <= model.dropout < 1.0, "model.dropout", "in [0, 1)", model.dropout)
    _require(model.num_classes > 1, "model.num_classes", "> 1", model.num_classes)


def _validate_optimizer(optimizer: OptimizerConfig, num_steps: int) -> None:
    factory = getattr(optax, optimizer.name, None)
    takes_learning_rate = callable(factory) and (
        "learning_rate" in inspect.signature(factory).parameters
    )
    _require(
        takes_learning_rate,
        "optimizer.name",
        "an optax optimizer taking a learning_rate (adam, adamw, sgd, ...)",
        optimizer.name,
    )
    _require(optimizer.learning_rate > 0, "optimizer.learning_rate", "> 0", optimizer.learning_rate)
    _require(
        optimizer.schedule in SCHEDULE_CHOICES,
        "optimizer.schedule",
        f"one of {SCHEDULE_CHOICES}",
        optimizer.schedule,
    )
    _require(optimizer.warmup_steps >= 0, "optimizer.warmup_steps", ">= 0", optimizer.warmup_steps)
    _require(
        optimizer.schedule != "warmup_cosine" or optimizer.warmup_steps < num_steps,
        "optimizer.warmup_steps",
        f"< train.num_steps ({num_steps}) with schedule warmup_cosine",
        optimizer.warmup_steps,
    )
    _require(optimizer.weight_decay >= 0, "optimizer.weight_decay", ">= 0", optimizer.weight_decay)


def _validate_train(train: TrainConfig) -> None:
    for key in ("num_steps", "log_every", "eval_every", "checkpoint_every", "max_to_keep"):
        _require(getattr(train, key) > 0, f"train.{key}", "> 0", getattr(train, key))
    _require(0 <= train.seed <= _MAX_SEED, "train.seed", "between 0 and 2**32-1", train.seed)
    for key in ("run_dir", "checkpoint_dir"):
        _require(bool(getattr(train, key)), f"train.{key}", "a non-empty path", getattr(train, key))
    spike = train.spike_recovery
    if spike is not None:
        _require(spike.factor > 1, "train.spike_recovery.factor", "> 1", spike.factor)
        for key in ("window", "max_recoveries"):
            value = getattr(spike, key)
            _require(value > 0, f"train.spike_recovery.{key}", "> 0", value)
        key = "train.spike_recovery.skip_batches"
        _require(spike.skip_batches >= 0, key, ">= 0", spike.skip_batches)
    if train.num_processes is not None:
        _require(train.num_processes > 0, "train.num_processes", "> 0", train.num_processes)
    if train.process_id is not None:
        limit = train.num_processes if train.num_processes is not None else float("inf")
        _require(
            0 <= train.process_id < limit,
            "train.process_id",
            f"in [0, train.num_processes={train.num_processes})",
            train.process_id,
        )


def validate(config: Config) -> None:
    """Checks value ranges and choices; raises ConfigError naming the first bad key."""
    _validate_train(config.train)
    _validate_data(config.data)
    _validate_model(config.model)
    _validate_language_model(config)
    _validate_optimizer(config.optimizer, config.train.num_steps)
