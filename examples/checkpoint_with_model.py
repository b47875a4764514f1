"""Params, optimizer state and data position saved in one Orbax step and restored in a new process.

    python examples/checkpoint_with_model.py [WORKDIR]

Trains a Flax NNX model for 30 steps, saves step 30 with one `ocp.args.Composite` and trains 20
more steps without interruption. A second Python process then builds everything afresh (another
model seed, a pipeline at its start), restores step 30 and trains the same 20 steps. Both print
a hash of their final params: they are equal.
"""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import resumax
from resumax.checkpoint import CheckpointRestore, CheckpointSave

SAVE_STEP, MORE_STEPS = 30, 20


def write_dataset(directory: Path) -> str:
    """512 noisy samples of a linear function, in two ArrayRecord shards; returns their glob."""
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(512, 4)).astype(np.float32)
    targets = inputs @ np.array([1.0, -2.0, 0.5, 3.0], np.float32) + rng.normal(size=512) * 0.1
    examples = [{"x": x, "y": np.float32(y)} for x, y in zip(inputs, targets, strict=True)]
    resumax.write_shards(directory / "train", examples, num_shards=2)
    return str(directory / "train-*.array_record")


def jitter(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """An augmentation whose randomness is replayed exactly after a resume."""
    return {**example, "x": example["x"] + rng.normal(scale=0.01, size=4).astype(np.float32)}


def build(data_glob: str, model_seed: int) -> tuple[nnx.Module, nnx.Optimizer, resumax.Pipeline]:
    config = resumax.ArrayRecordSourceConfig(seed=42, shuffle_files=True)
    source = resumax.ArrayRecordSourceModule(config, paths=data_glob)
    pipeline = resumax.Pipeline(source, stages=[resumax.RandomMap(jitter)], batch_size=32, rngs=0)
    model = nnx.Linear(4, 1, rngs=nnx.Rngs(model_seed))
    return model, nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param), pipeline


@nnx.jit
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> None:
    grads = nnx.grad(lambda m: jnp.mean((m(x)[:, 0] - y) ** 2))(model)
    optimizer.update(model, grads)


def train(model: nnx.Module, optimizer: nnx.Optimizer, batches: Any, steps: int) -> None:
    for batch in itertools.islice(batches, steps):
        train_step(model, optimizer, jnp.asarray(batch["x"]), jnp.asarray(batch["y"]))


def params_hash(model: nnx.Module) -> str:
    leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    return hashlib.sha256(b"".join(np.asarray(leaf).tobytes() for leaf in leaves)).hexdigest()[:16]


def first_run(workdir: Path) -> None:
    data_glob = write_dataset(workdir)
    model, optimizer, pipeline = build(data_glob, model_seed=0)
    batches = iter(pipeline)
    train(model, optimizer, batches, SAVE_STEP)
    with ocp.CheckpointManager(workdir / "checkpoints") as mngr:
        mngr.save(
            SAVE_STEP,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(nnx.state(model)),
                opt_state=ocp.args.StandardSave(nnx.state(optimizer)),
                data=CheckpointSave(pipeline),
            ),
        )
        # save() returned at once: training goes on while the step is written in the background,
        # and the step holds the position at save() time. Leaving the block waits for the commit.
        train(model, optimizer, batches, MORE_STEPS)
    uninterrupted = params_hash(model)
    print(f"uninterrupted run, step {SAVE_STEP + MORE_STEPS}: params {uninterrupted}")
    resumed = subprocess.run(
        [sys.executable, __file__, "--resume", str(workdir), data_glob],
        stdout=subprocess.PIPE,
        text=True,
    )
    print(resumed.stdout, end="")
    if resumed.returncode != 0 or uninterrupted not in resumed.stdout:
        sys.exit("the resumed run differs from the uninterrupted one")
    print("identical: the resumed run saw the same batches and reached the same params")


def resumed_run(workdir: Path, data_glob: str) -> None:
    model, optimizer, pipeline = build(data_glob, model_seed=1)  # deliberately different
    with ocp.CheckpointManager(workdir / "checkpoints") as mngr:
        step = mngr.latest_step()
        restored = mngr.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(nnx.state(model)),
                opt_state=ocp.args.StandardRestore(nnx.state(optimizer)),
                data=CheckpointRestore(pipeline),
            ),
        )
        position = mngr.item_metadata(step)["data"]
    nnx.update(model, restored["params"])
    nnx.update(optimizer, restored["opt_state"])
    print(
        f"new process restored step {step}: epoch {position.current_epoch}, "
        f"record {position.current_index} of {position.num_records}, "
        f"{position.batches_emitted} batches so far"
    )
    train(model, optimizer, iter(pipeline), MORE_STEPS)
    print(f"resumed run,       step {step + MORE_STEPS}: params {params_hash(model)}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--resume"]:
        resumed_run(Path(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) > 1:
        first_run(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            first_run(Path(tmp))
