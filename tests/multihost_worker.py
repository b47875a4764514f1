"""One JAX process of tests/test_multihost.py: reads, saves or restores a sharded pipeline.

python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT DATA_GLOB BATCH_SIZE STEPS OUT_JSON
    [--save CKPT_DIR] [--restore CKPT_DIR]

With NUM_PROCESSES > 1 it joins a JAX distributed runtime on 127.0.0.1:PORT (gloo collectives).
It takes STEPS batches (after restoring CKPT_DIR's latest step with --restore), writes the record
ids it received per step to OUT_JSON, then saves the position at its last step with --save.
"""

from __future__ import annotations

import argparse
import itertools
import json
from typing import Any

import jax
import numpy as np

from resumax import ArrayRecordSourceConfig, ArrayRecordSourceModule, Pipeline, RandomMap


def jitter(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    return {**example, "noise": rng.normal(size=2).astype(np.float32)}


def build_pipeline(data_glob: str, batch_size: int, **options: Any) -> Pipeline:
    """The pipeline every run builds alike: shuffled, augmented, sharded across processes."""
    config = ArrayRecordSourceConfig(seed=11, shuffle_files=True)
    source = ArrayRecordSourceModule(config, data_glob)
    return Pipeline(source, [RandomMap(jitter)], batch_size=batch_size, rngs=3, **options)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    for name, kind in [
        ("process_id", int),
        ("num_processes", int),
        ("port", int),
        ("data_glob", str),
        ("batch_size", int),
        ("steps", int),
        ("out_json", str),
    ]:
        parser.add_argument(name, type=kind)
    parser.add_argument("--save")
    parser.add_argument("--restore")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    import orbax.checkpoint as ocp

    from resumax.checkpoint import CheckpointRestore, CheckpointSave

    pipeline = build_pipeline(args.data_glob, args.batch_size)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True)
    if args.restore:
        with ocp.CheckpointManager(args.restore, options=options) as manager:
            step = manager.latest_step()
            manager.restore(step, args=ocp.args.Composite(data=CheckpointRestore(pipeline)))
    steps = [batch["id"].tolist() for batch in itertools.islice(pipeline, args.steps)]
    with open(args.out_json, "w") as file:
        json.dump({"steps": steps, "state": pipeline.get_state()}, file)
    if args.save:
        with ocp.CheckpointManager(args.save, options=options) as manager:
            manager.save(args.steps, args=ocp.args.Composite(data=CheckpointSave(pipeline)))
            manager.wait_until_finished()


if __name__ == "__main__":
    main()
