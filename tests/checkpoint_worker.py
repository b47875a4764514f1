"""The fresh-process side of tests/test_checkpoint.py, and the objects both sides build alike.

python tests/checkpoint_worker.py restore CKPT_DIR DATA_GLOB OUT_NPZ
python tests/checkpoint_worker.py save-large CKPT_DIR DATA_GLOB
"""

from __future__ import annotations

import itertools
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from resumax import ArrayRecordSourceConfig, ArrayRecordSourceModule, Pipeline, RandomMap
from resumax.checkpoint import CheckpointRestore, CheckpointSave

BATCH_SIZE = 8
NEXT_BATCHES = 20
# 256 MiB of float32: writing it takes long enough that a kill right after `mngr.save` lands
# while the step is still being written.
LARGE_PARAMS_SIZE = 64 * 1024 * 1024


def jitter(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    return {**example, "noise": rng.normal(size=3).astype(np.float32)}


def build_pipeline(data_glob: str) -> Pipeline:
    """A shuffled, augmented pipeline at its start; the same arguments give the same batches."""
    config = ArrayRecordSourceConfig(seed=7, shuffle_files=True)
    source = ArrayRecordSourceModule(config, paths=data_glob)
    return Pipeline(source, stages=[RandomMap(jitter)], batch_size=BATCH_SIZE, rngs=nnx.Rngs(5))


def build_trainer(model_seed: int) -> tuple[nnx.Linear, nnx.Optimizer]:
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(model_seed))
    return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)


def train_step(model: nnx.Linear, optimizer: nnx.Optimizer, batch: dict[str, Any]) -> None:
    inputs = jnp.asarray(batch["feature"] + batch["noise"]) / 100.0
    targets = jnp.asarray(batch["id"], jnp.float32)[:, None] / 100.0
    grads = nnx.grad(lambda m: jnp.mean((m(inputs) - targets) ** 2))(model)
    optimizer.update(model, grads)


def save_args(model: nnx.Module, optimizer: nnx.Optimizer, pipeline: Pipeline) -> Any:
    return ocp.args.Composite(
        params=ocp.args.StandardSave(nnx.state(model)),
        opt_state=ocp.args.StandardSave(nnx.state(optimizer)),
        data=CheckpointSave(pipeline),
    )


def leaves(*trees: Any) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(trees)]


def large_params(seed: int) -> dict[str, np.ndarray]:
    return {"w": np.random.default_rng(seed).random(LARGE_PARAMS_SIZE, dtype=np.float32)}


def restore(ckpt_dir: str, data_glob: str, out_path: str) -> None:
    """Restores the latest step into fresh, differently seeded objects; saves what it got."""
    model, optimizer = build_trainer(model_seed=1)
    pipeline = build_pipeline(data_glob)
    before = leaves(nnx.state(model))
    with ocp.CheckpointManager(ckpt_dir) as mngr:
        restored = mngr.restore(
            mngr.latest_step(),
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(nnx.state(model)),
                opt_state=ocp.args.StandardRestore(nnx.state(optimizer)),
                data=CheckpointRestore(pipeline),
            ),
        )
    nnx.update(model, restored["params"])
    nnx.update(optimizer, restored["opt_state"])
    arrays = {f"before_{i}": leaf for i, leaf in enumerate(before)}
    arrays |= {f"param_{i}": leaf for i, leaf in enumerate(leaves(nnx.state(model)))}
    arrays |= {f"opt_{i}": leaf for i, leaf in enumerate(leaves(nnx.state(optimizer)))}
    for i, batch in enumerate(itertools.islice(pipeline, NEXT_BATCHES)):
        arrays |= {f"batch_{i}_{key}": value for key, value in batch.items()}
    np.savez(out_path, **arrays)


def save_large(ckpt_dir: str, data_glob: str) -> None:
    """Commits step 1, then starts step 2 and announces it; the parent kills us mid-save."""
    pipeline = build_pipeline(data_glob)
    batches = iter(pipeline)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True)
    mngr = ocp.CheckpointManager(ckpt_dir, options=options)
    for step in (1, 2):
        for _ in range(3):
            next(batches)
        mngr.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(large_params(step)), data=CheckpointSave(pipeline)
            ),
        )
        print(f"SAVING {step} {json.dumps(pipeline.get_state())}", flush=True)
        mngr.wait_until_finished()
        print(f"SAVED {step}", flush=True)


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    {"restore": restore, "save-large": save_large}[command](*arguments)
