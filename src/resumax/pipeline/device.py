"""Device placement of batches: numpy batches -> global `jax.Array`s laid out by a sharding.

Each process passes its own rows; `jax.make_array_from_process_local_data` assembles the global
array, so the same call serves one host and many. Placement never changes a value: a field whose
values JAX would narrow (64-bit with `jax_enable_x64` off) or cannot hold (strings, bytes,
objects) is a `ConfigError` naming the field.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from resumax.errors import ConfigError

_SHOWN_VALUES = 5


def check_sharding(sharding: Any) -> jax.sharding.Sharding | None:
    """Returns `sharding` if it is None or a `jax.sharding.Sharding`, else raises ConfigError."""
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        return sharding
    raise ConfigError(
        f"sharding must be a jax.sharding.Sharding (e.g. NamedSharding(mesh, P('data'))) or "
        f"None, got {sharding!r}"
    )


def put_batch(batch: Any, sharding: jax.sharding.Sharding) -> Any:
    """Every array of `batch` (a pytree of this process's rows) as a `jax.Array` on `sharding`.

    Raises:
        ConfigError: a field JAX cannot hold (str, bytes, object) or whose values it would change
            (64-bit values out of the 32-bit range with `jax_enable_x64` off), naming the field;
            or rows that do not divide over the devices.
    """
    jax.tree_util.tree_map_with_path(check_placeable, batch)
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


def check_placeable(path: Any, rows: Any) -> None:
    """Raises ConfigError if placing `rows` (the field at `path`) would fail or change a value."""
    if isinstance(rows, jax.Array):
        return
    rows = np.asarray(rows)
    field = jax.tree_util.keystr(path) or "the batch"
    if rows.dtype.kind in "USOV":
        raise ConfigError(
            f"field {field} has dtype {rows.dtype}, which a jax.Array cannot hold. Drop the "
            "field or turn it into numbers in a Map before placement, or build the Pipeline "
            "without sharding= to receive numpy batches"
        )
    placed_dtype = jax.dtypes.canonicalize_dtype(rows.dtype)
    if placed_dtype == rows.dtype:
        return
    kept = rows.astype(placed_dtype).astype(rows.dtype)
    changed = ~((kept == rows) | (np.isnan(rows) if rows.dtype.kind in "fc" else False))
    if not changed.any():
        return
    shown = rows[changed][:_SHOWN_VALUES].tolist()
    raise ConfigError(
        f"field {field} has dtype {rows.dtype}, which JAX places as {placed_dtype} while "
        f"jax_enable_x64 is off, and {int(changed.sum())} of its values would change, e.g. "
        f"{shown}. Enable 64-bit JAX (jax.config.update('jax_enable_x64', True)), cast the "
        f"field in a Map to a dtype that holds its values, or drop the field"
    )
