"""The subprocess side of tests/test_reliability_pipeline.py: a stage stuck in a long call.

python tests/stuck_stage_script.py DATA_GLOB NUM_WORKERS PREFETCH MODE

Record 20 makes the stage sleep for an hour (a hung network read). The script takes the batches
before it, so that the stage is stuck in the prefetch thread or a worker, then:
  "release": times close(), set_state, a new iter() and garbage collection of an iterator, each
     with the stage stuck again, printing one JSON line of seconds; then prints "exiting" and
     returns with a stuck iterator open (the interpreter must still exit promptly);
  "wait": prints "waiting" and the worker pids, and blocks in next() until a signal ends it.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

from resumax import ArrayRecordSourceConfig, ArrayRecordSourceModule, Pipeline

BATCH_SIZE = 4
STUCK_RECORD = 20
# The file the stage creates as it gets stuck (in whichever process or thread runs it).
MARKER = "RESUMAX_TEST_STUCK_MARKER"
# Keeps an iterator alive until the interpreter exits.
OPEN_ITERATORS = []


def hang_on_record_20(example: dict) -> dict:
    if int(example["id"]) == STUCK_RECORD:
        open(os.environ[MARKER], "w").close()
        time.sleep(3600)
    return example


def stuck_iterator(pipeline: Pipeline):
    """An iterator whose next batch waits for the stuck stage: started by now when a worker or
    the prefetch thread reads ahead (it runs in next() otherwise)."""
    marker = os.environ[MARKER]
    if os.path.exists(marker):
        os.remove(marker)
    pipeline.source.seek(0, 0)
    batches = iter(pipeline)
    for _ in range(STUCK_RECORD // BATCH_SIZE):
        next(batches)
    deadline = time.monotonic() + 60
    while (pipeline.num_workers or pipeline.prefetch) and not os.path.exists(marker):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the stage never reached record {STUCK_RECORD} ({marker})")
        time.sleep(0.002)
    return batches


def timed(action) -> float:
    started = time.monotonic()
    action()
    return round(time.monotonic() - started, 3)


def main(data_glob: str, num_workers: int, prefetch: int, mode: str) -> None:
    os.environ[MARKER] = os.path.join(os.path.dirname(data_glob), "stuck-stage-marker")
    source = ArrayRecordSourceModule(ArrayRecordSourceConfig(seed=0), data_glob)
    pipeline = Pipeline(
        source,
        [hang_on_record_20],
        batch_size=BATCH_SIZE,
        num_workers=num_workers,
        prefetch=prefetch,
    )
    if mode == "wait":
        batches = stuck_iterator(pipeline)
        print("waiting", *batches.worker_pids, flush=True)
        next(batches)
        return
    state = pipeline.get_state()
    seconds = {"close": timed(stuck_iterator(pipeline).close)}
    held = stuck_iterator(pipeline)
    seconds["set_state"] = timed(lambda: pipeline.set_state(state))
    held = stuck_iterator(pipeline)
    seconds["iter"] = timed(lambda: OPEN_ITERATORS.append(iter(pipeline)))
    OPEN_ITERATORS.pop().close()
    del held
    unreferenced = [stuck_iterator(pipeline)]
    seconds["gc"] = timed(lambda: (unreferenced.clear(), gc.collect()))
    print(json.dumps(seconds), flush=True)
    OPEN_ITERATORS.append(stuck_iterator(pipeline))
    print("exiting", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
