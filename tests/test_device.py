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
