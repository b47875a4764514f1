"""Multi-process helpers of the training loop: joining JAX's distributed runtime, laying out
arrays over all processes' devices, and reading replicated values back on the host.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from resumax.errors import ConfigError

# Read when the config leaves them unset; JAX itself reads JAX_COORDINATOR_ADDRESS.
_ENVIRONMENT = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


def initialize(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """Joins JAX's distributed runtime once; unset values come from the environment.

    CPU collectives use gloo, so several CPU processes can train one data-parallel model.
    """
    if jax.distributed.is_initialized():
        return
    settings = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    for key, variable in _ENVIRONMENT.items():
        if settings[key] is None and os.environ.get(variable):
            value = os.environ[variable]
            try:
                settings[key] = value if key == "coordinator_address" else int(value)
            except ValueError as error:
                raise ConfigError(f"${variable} must be an int, got {value!r}") from error
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**settings)


def data_parallel_mesh() -> Mesh:
    """All devices of all processes on one 'data' axis."""
    return Mesh(np.array(jax.devices()), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over the 'data' axis: each process supplies its own rows."""
    return NamedSharding(mesh, PartitionSpec("data"))


def pipeline_sharding(mesh: Mesh) -> NamedSharding | None:
    """Where the training pipeline puts its batches: `batch_sharding(mesh)`, or None (numpy
    batches, which the jitted step copies to its one device in C++) when the mesh has one
    device: a sharded device put costs the input pipeline about as much as the reads."""
    return batch_sharding(mesh) if mesh.size > 1 else None


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array of `tree` (identical in every process) as a global, fully replicated array."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda leaf: jax.make_array_from_process_local_data(replicated, np.asarray(leaf)), tree
    )


def host_array(leaf: Any) -> np.ndarray:
    """A replicated (or local) array's value in this process, without cross-process copies."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return np.asarray(leaf.addressable_data(0))
    return np.asarray(leaf)


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def process_override(process_count: int | None) -> dict[str, int]:
    """Pipeline keywords that make this process stand for process 0 of `process_count` (for
    `resumax state` / `batches`, which read a run's data in one process); none when None."""
    return {} if process_count is None else {"process_index": 0, "process_count": process_count}
