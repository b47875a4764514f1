"""What shapes a conversion's output: the input format, the fields kept, how nulls are filled,
how many bad records may be skipped, the TFRecord feature spec, image decoding, and the shards.

These options, and nothing about the engine that runs the conversion, go into the set's index.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from resumax.errors import ConfigError

FORMATS = ("jsonl", "parquet", "csv", "tfrecord", "imagefolder", "hf", "npz")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """The options of one conversion (all picklable, for Beam workers).

    Attributes:
      format: one of FORMATS.
      fields: the fields to keep, in this order; None keeps every field in input order.
      fill_null: a JSON text whose value replaces nulls (e.g. "0" or '""'); None makes a null
        a bad record naming its column.
      skip_bad: how many bad records (malformed lines, rows or records) may be skipped.
      features: the `resumax.TFExample` spec of TFRecord inputs, {name: (dtype, shape)}; None
        reads every feature as variable-length.
      decode_images: store images as uint8 arrays instead of their encoded bytes.
      num_shards: the number of shards; None with `shard_size`, else 1.
      shard_size: the target encoded bytes per shard, when `num_shards` is None.
    """

    format: str
    fields: tuple[str, ...] | None = None
    fill_null: str | None = None
    skip_bad: int = 0
    features: dict[str, tuple[str, tuple[int, ...] | None]] | None = None
    decode_images: bool = False
    num_shards: int | None = None
    shard_size: int | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"unknown input format {self.format!r}; use one of {FORMATS}")
        if self.fields is not None and (not self.fields or not all(self.fields)):
            raise ConfigError(f"--fields must name at least one field, got {self.fields!r}")
        if not isinstance(self.skip_bad, int) or self.skip_bad < 0:
            raise ConfigError(f"skip_bad must be an int >= 0, got {self.skip_bad!r}")
        if self.num_shards is not None and self.shard_size is not None:
            raise ConfigError("give the number of shards or a shard size, not both")
        for name in ("num_shards", "shard_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if self.fill_null is not None:
            self.fill_value()  # checked once here

    def fill_value(self) -> Any:
        """The value that replaces nulls (the parsed `fill_null`)."""
        try:
            value = json.loads(self.fill_null)
        except (TypeError, ValueError) as error:
            raise ConfigError(
                f"--fill-null takes a JSON value such as 0, 0.0 or '\"\"', got "
                f"{self.fill_null!r}: {error}"
            ) from error
        if value is None:
            raise ConfigError("--fill-null null would leave the nulls: give 0, 0.0, '\"\"', ...")
        return value

    def shards_for(self, encoded_bytes: int) -> int:
        """The number of shards: `num_shards`, else the encoded bytes over `shard_size`."""
        if self.num_shards is not None:
            return self.num_shards
        if self.shard_size is not None:
            return max(1, math.ceil(encoded_bytes / self.shard_size))
        return 1

    def needs_full_pass(self) -> bool:
        """Whether planning must read and encode every record first: to know the encoded size
        (`shard_size`) or which records are bad (`skip_bad`) before any shard is cut."""
        return self.shard_size is not None or self.skip_bad > 0

    def describe(self) -> dict[str, Any]:
        """The options as they go into the index metadata (no engine, workers or time)."""
        features = None
        if self.features is not None:
            features = {
                name: [dtype, None if shape is None else list(shape)]
                for name, (dtype, shape) in self.features.items()
            }
        return {
            "fields": None if self.fields is None else list(self.fields),
            "fill_null": None if self.fill_null is None else self.fill_value(),
            "skip_bad": self.skip_bad,
            "features": features,
            "decode_images": self.decode_images,
            "shard_size": self.shard_size,
        }


def parse_size(text: str) -> int:
    """Bytes of a size such as `256MB`, `1.5GB`, `64MiB` or `1000000`; ConfigError otherwise.
    KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024."""
    match = _SIZE.match(text)
    if match is None:
        raise ConfigError(f"--shard-size takes a size such as 256MB or 1GiB, got {text!r}")
    number, unit = match.groups()
    unit = unit.upper()
    base = 1024 if "I" in unit else 1000
    prefix = unit[:1] if unit[:1] in "KMGT" else ""
    scale = base ** "_KMGT".index(prefix) if prefix else 1
    size = int(float(number) * scale)
    if size < 1:
        raise ConfigError(f"--shard-size must be at least 1 byte, got {text!r}")
    return size


def parse_features(text: str) -> dict[str, tuple[str, tuple[int, ...] | None]]:
    """A TFExample spec from JSON, e.g. '{"image": ["bytes", []], "label": ["int64", []]}'
    (a list shape is fixed-length, null variable-length)."""
    from resumax.records.tfexample import TFExample

    try:
        value = json.loads(text)
    except ValueError as error:
        raise ConfigError(
            f'--features takes a JSON object {{"name": ["int64", [3]], ...}}, got {text!r}: {error}'
        ) from error
    if not isinstance(value, dict):
        raise ConfigError(
            f'--features takes a JSON object {{"name": [dtype, shape]}}, got {text!r}'
        )
    spec = TFExample(value).features
    assert spec is not None
    return spec
