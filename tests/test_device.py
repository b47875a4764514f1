"""Device placement: `Pipeline(sharding=...)` yields jax.Arrays laid out by the sharding, holding
the same values as the numpy batches, with the same exact state."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import resumax
from resumax import ArrayRecordSourceConfig, ArrayRecordSourceModule, Pipeline
from resumax.errors import ConfigError


def build(paths, **options):
    config = ArrayRecordSourceConfig(seed=42, shuffle_files=True)
    return Pipeline(ArrayRecordSourceModule(config, paths), batch_size=8, rngs=0, **options)


def data_sharding():
    return NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_sharded_batches_are_jax_arrays_with_the_numpy_values(shards, prefetch):
    sharding = data_sharding()
    expected = list(itertools.islice(build(shards, prefetch=0), 5))
    pipeline = build(shards, sharding=sharding, prefetch=prefetch)
    got = list(itertools.islice(iter(pipeline), 5))
    for batch, want in zip(got, expected, strict=True):
        for key in want:
            assert isinstance(batch[key], jax.Array)
            assert batch[key].sharding == sharding
            np.testing.assert_array_equal(np.asarray(batch[key]), want[key])
    assert pipeline.get_state()["source"]["current_index"] == 40


def test_a_sharding_that_is_not_one_raises_config_error(shards):
    with pytest.raises(ConfigError, match="sharding"):
        build(shards, sharding="data")


def test_batches_split_over_two_devices(shards):
    script = textwrap.dedent(
        f"""
        import itertools
        import jax
        import numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec
        from resumax import ArrayRecordSourceConfig, ArrayRecordSourceModule, Pipeline

        assert jax.device_count() == 2, jax.devices()
        sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
        config = ArrayRecordSourceConfig(seed=42, shuffle_files=True)

        def build(**options):
            source = ArrayRecordSourceModule(config, {shards!r})
            return Pipeline(source, batch_size=8, rngs=0, **options)

        placed = build(sharding=sharding)
        pairs = zip(itertools.islice(placed, 3), build())
        for batch, want in pairs:
            pieces = batch["image"].addressable_shards
            assert sorted(piece.device.id for piece in pieces) == [0, 1]
            assert [piece.data.shape[0] for piece in pieces] == [4, 4]
            np.testing.assert_array_equal(np.asarray(batch["image"]), want["image"])
        print("ok", placed.get_state()["source"]["current_index"])
        """
    )
    environment = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "24"]


def placed_batch(tmp_path, field: str, values: list, dtype: str, **options):
    """The first placed batch of 8 records whose `field` holds `values` (repeated) as `dtype`."""
    records = [{field: np.asarray(values[i % len(values)], dtype=dtype)} for i in range(8)]
    resumax.write_shards(tmp_path / "placed", records, num_shards=1)
    config = ArrayRecordSourceConfig(seed=0, num_epochs=1)
    source = ArrayRecordSourceModule(config, str(tmp_path / "placed-*.array_record"))
    pipeline = Pipeline(source, batch_size=8, rngs=0, sharding=data_sharding(), **options)
    return next(iter(pipeline))


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize(
    ("dtype", "value"), [("int64", 3_000_000_000), ("int64", -(2**40)), ("uint64", 2**40)]
)
def test_a_64_bit_value_placement_would_narrow_names_field_and_value(
    tmp_path, dtype, value, prefetch
):
    with pytest.raises(ConfigError) as raised:
        placed_batch(tmp_path, "user_id", [7, value], dtype, prefetch=prefetch)
    message = str(raised.value)
    for part in ["'user_id'", dtype, str(value), "jax_enable_x64", "Map", "drop the field"]:
        assert part in message


def test_a_float64_value_float32_cannot_hold_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"'weight'.*float64.*0\.1"):
        placed_batch(tmp_path, "weight", [0.5, 0.1], "float64")


def test_64_bit_values_that_32_bits_hold_arrive_unchanged(tmp_path):
    batch = placed_batch(tmp_path, "user_id", [7, -(2**31), 2**31 - 1], "int64")
    values = np.asarray(batch["user_id"])
    assert values.tolist() == [7, -(2**31), 2**31 - 1] * 2 + [7, -(2**31)]
    weights = np.asarray(placed_batch(tmp_path, "w", [0.5, np.nan, np.inf], "float64")["w"])
    np.testing.assert_array_equal(weights, np.array([0.5, np.nan, np.inf] * 3)[:8])


def test_with_x64_enabled_64_bit_values_arrive_as_64_bit(tmp_path):
    with jax.enable_x64(True):
        batch = placed_batch(tmp_path, "user_id", [3_000_000_000, 2**40], "int64", prefetch=0)
        assert batch["user_id"].dtype == np.int64
        assert np.asarray(batch["user_id"]).tolist() == [3_000_000_000, 2**40] * 4


@pytest.mark.parametrize("values", [["abc", "de"], [b"\x00\x01", b"x"]])
def test_a_string_or_bytes_field_is_an_error_naming_it(tmp_path, values):
    with pytest.raises(ConfigError, match=r"field \['caption'\].*cannot hold.*sharding="):
        placed_batch(tmp_path, "caption", values, "U3" if isinstance(values[0], str) else "S2")
