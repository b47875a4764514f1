"""The subprocess side of tests/test_workers.py: a pipeline with worker processes, then SIGTERM.

python tests/pipeline_workers_script.py DATA_GLOB (default|handler|exit)

Prints the worker pids on one line once the first batch arrived, then iterates until stopped.
"default" leaves SIGTERM's default action (the process dies at once); "handler" installs one
that exits through SystemExit, as a training loop's preemption handler would; "exit" takes a
few more batches and returns with the iterator still open (a normal interpreter exit).
"""

from __future__ import annotations

import signal
import sys

import numpy as np

from resumax import ArrayRecordSourceConfig, ArrayRecordSourceModule, Pipeline, RandomMap

# Keeps an iterator alive until the interpreter exits.
OPEN_ITERATORS = []


def enlarge(example: dict, rng: np.random.Generator) -> dict:
    """A 16 KiB float32 field per record, so that results travel through shared memory."""
    return {**example, "big": rng.normal(size=(32, 32, 4)).astype(np.float32)}


def exit_on_sigterm(signum: int, frame: object) -> None:
    sys.exit(0)


def main(data_glob: str, mode: str) -> None:
    if mode == "handler":
        signal.signal(signal.SIGTERM, exit_on_sigterm)
    config = ArrayRecordSourceConfig(seed=42, shuffle_files=True)
    source = ArrayRecordSourceModule(config, data_glob)
    pipeline = Pipeline(source, [RandomMap(enlarge)], batch_size=8, num_workers=2, prefetch=2)
    batches = iter(pipeline)
    next(batches)
    print(" ".join(str(pid) for pid in batches.worker_pids), flush=True)
    for count, _ in enumerate(batches):
        if mode == "exit" and count == 20:
            OPEN_ITERATORS.append(batches)
            return


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
