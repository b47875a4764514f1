"""Device placement of batches: numpy batches -> global `jax.Array`s laid out by a sharding.

Each process passes its own rows; `jax.make_array_from_process_local_data` assembles the global
array, so the same call serves one host and many.
"""

from __future__ import annotations

from typing import Any

import jax

from resumax.errors import ConfigError


def check_sharding(sharding: Any) -> jax.sharding.Sharding | None:
    """Returns `sharding` if it is None or a `jax.sharding.Sharding`, else raises ConfigError."""
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        return sharding
    raise ConfigError(
        f"sharding must be a jax.sharding.Sharding (e.g. NamedSharding(mesh, P('data'))) or "
        f"None, got {sharding!r}"
    )


def put_batch(batch: Any, sharding: jax.sharding.Sharding) -> Any:
    """Every array of `batch` (a pytree of this process's rows) as a `jax.Array` on `sharding`."""
    try:
        return jax.tree.map(
            lambda rows: jax.make_array_from_process_local_data(sharding, rows), batch
        )
    except ValueError as error:
        shapes = jax.tree.map(lambda rows: getattr(rows, "shape", ()), batch)
        raise ConfigError(
            f"cannot place a batch with shapes {shapes} on {sharding}: {error}. The batch "
            "dimension must divide evenly over the devices; a last partial batch of a finite "
            "run may not (use drop_remainder=True)"
        ) from error
