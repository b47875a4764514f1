# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # ArrayRecord source quick reference (resumax)
#
# The Datarax "ArrayRecord Source Quick Reference", done with real files. Each section writes or
# reads real ArrayRecord files and checks what it claims; a check that fails stops the run.
#
# This file is both a script and a notebook: `01_arrayrecord_quickref.py` (jupytext percent
# format) and `01_arrayrecord_quickref.ipynb` are paired with jupytext and hold the same cells.
#
# - Run the script: `.venv/bin/python examples/integration/arrayrecord/01_arrayrecord_quickref.py`
# - Or open the notebook with the `.venv` kernel.
#
# It is self-contained: it writes its data to a temporary directory, reads no other file of the
# repository, and removes the directory at the end.

# %%
import itertools
import json
import tempfile
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

import resumax
from resumax.checkpoint import CheckpointRestore, CheckpointSave
from resumax.pipeline import Pipeline
from resumax.sources import ArrayRecordSourceConfig, ArrayRecordSourceModule
from resumax.stages import RandomMap

CHECKS_HELD = []


def check(claim: str, holds: bool) -> None:
    """Prints the claim with [ok]; stops the run if it does not hold."""
    print(f"  [{'ok' if holds else 'FAILED'}] {claim}")
    if not holds:
        raise AssertionError(f"quick reference check failed: {claim}")
    CHECKS_HELD.append(claim)


def ids_of(batches) -> list[int]:
    """The record ids (the value every record's `data` holds) of a list of batches."""
    return [int(x) for batch in batches for x in batch["data"][:, 0]]


print("=" * 60)
print("ArrayRecord Source Quick Reference (resumax)")
print("=" * 60)

# %% [markdown]
# ## 1. A small dataset on disk
#
# Datarax's page points at existing `*.riegeli` files. Here we write our own: 1,000 records,
# each a dict of numpy arrays (`data`: 8 floats that all hold the record's id, `label`: an
# int64), as 4 ArrayRecord shards. `resumax.write_shards` writes the set atomically and puts an
# index (`train.index.json`) beside it, so a source later reads counts from it instead of
# opening every file. Any ArrayRecord reader (Grain, `array_record`) can read these files.

# %%
workdir = tempfile.TemporaryDirectory(prefix="resumax-quickref-")
data_dir = Path(workdir.name)
examples = [
    {"data": np.full((8,), i, dtype=np.float32), "label": np.int64(i % 10)} for i in range(1000)
]
paths = resumax.write_shards(data_dir / "train", examples, num_shards=4)
pattern = str(data_dir / "train-*.array_record")
print(f"1. Wrote {len(examples)} records to {len(paths)} ArrayRecord shards in {data_dir}")
for path in paths:
    print(f"  {Path(path).name}")

# %% [markdown]
# ## 2. ArrayRecordSourceConfig
#
# The same three fields as Datarax, with the same defaults: `seed=42`, `num_epochs=-1`
# (infinite), `shuffle_files=False`. Where we differ:
#
# - `shuffle_files=True` shuffles records across all files (a global, record-level shuffle), with
#   a new order each epoch; it does not only shuffle the order of the files.
# - A fourth field, `shuffle_window` (default `None`), trades shuffle quality for fewer file
#   reads over many small shards.
# - Bad values (`num_epochs=0`, a negative seed) raise `resumax.errors.ConfigError` at once.

# %%
config = ArrayRecordSourceConfig(seed=42, num_epochs=-1, shuffle_files=True)
print(f"2. Configuration: {config}")

# %% [markdown]
# ## 3. Creating an ArrayRecord source
#
# The same call as in Datarax: `ArrayRecordSourceModule(config, paths, rngs=...)`, where `paths`
# is one file, a glob pattern or a list of files and globs. `rngs` is accepted for compatibility;
# the order depends on `config.seed` alone. A glob that matches nothing, a missing file or a
# partial shard set raises `DataSourceError` naming the path.

# %%
print("3. Source creation")
single = ArrayRecordSourceModule(ArrayRecordSourceConfig(), paths[0], rngs=nnx.Rngs(0))
by_glob = ArrayRecordSourceModule(config, pattern, rngs=nnx.Rngs(0))
by_list = ArrayRecordSourceModule(config, paths, rngs=nnx.Rngs(0))
check("a single file holds 250 records", len(single) == 250)
check("a glob expands to all 4 shards (1000 records)", len(by_glob) == 1000)
check("a list of files reads the same records", by_list.fingerprint == by_glob.fingerprint)

# %% [markdown]
# ## 4. Pipeline integration
#
# `Pipeline(source=..., stages=[...], batch_size=32, rngs=nnx.Rngs(0))`, as in Datarax. A stage
# is a plain callable (a per-record map), a `Map`, `RandomMap`, `Filter` or `BatchMap`, a Grain
# transform, or an `nnx.Module` that runs on whole batches. `RandomMap(fn)` calls
# `fn(example, rng)` with a numpy Generator keyed by (seed, epoch, record), so its draws are the
# same for any batch size, worker count or resume point. Batches are dicts of stacked numpy
# arrays (or `jax.Array`s with `sharding=`).

# %%
print("4. Pipeline integration")
add_noise = RandomMap(lambda example, rng: {**example, "noise": rng.normal(size=8)})
pipeline = Pipeline(source=by_glob, stages=[add_noise], batch_size=32, rngs=nnx.Rngs(0))
batch = next(iter(pipeline))
print(f"  Batch shape: {batch['data'].shape}, fields {sorted(batch)}")
check("batches are stacked numpy arrays", batch["data"].shape == (32, 8))

# %% [markdown]
# ## 5. Checkpointing: get_state() / set_state()
#
# As in Datarax, `get_state()` returns a dict and `set_state(state)` resumes from it. Ours is a
# few integers and a fingerprint, whatever the dataset size: there is no `shuffled_indices`
# (the order is recomputed from the seed) and no `prefetch_cache` (batches computed ahead are
# recomputed on resume). The state describes the batches the caller has received. It is
# plain JSON. `set_state` raises `StateMismatchError` naming the field if the state belongs to
# other data, another seed or another shuffle setting.

# %%
print("5. Checkpointing: get_state() / set_state()")
list(itertools.islice(pipeline, 40))
state = pipeline.get_state()
print(f"  state = {json.dumps(state)}")
uninterrupted = list(itertools.islice(pipeline, 20))
fresh = Pipeline(
    source=ArrayRecordSourceModule(config, pattern, rngs=nnx.Rngs(0)),
    stages=[add_noise],
    batch_size=32,
    rngs=nnx.Rngs(0),
)
fresh.set_state(json.loads(json.dumps(state)))
resumed = list(itertools.islice(fresh, 20))
check(
    "a fresh pipeline restored from the state yields the same next 20 batches",
    all(
        np.array_equal(a[key], b[key])
        for a, b in zip(uninterrupted, resumed, strict=True)
        for key in a
    ),
)
check(f"the state is O(1): {len(json.dumps(state))} bytes", len(json.dumps(state)) < 1024)

# %% [markdown]
# ## 6. Checkpointing with Orbax
#
# Not in Datarax's page. The data position is one item of an Orbax checkpoint step, beside the
# model: `resumax.checkpoint.CheckpointSave(pipeline)` and `CheckpointRestore(pipeline)` (import
# `resumax.checkpoint` to register them). Params and data position are committed together or not
# at all. Each process writes `process_{i}-of-{n}.json` in the step's `data` directory.

# %%
print("6. Checkpointing with Orbax")
model = nnx.Linear(8, 1, rngs=nnx.Rngs(0))
checkpoints = ocp.CheckpointManager(data_dir / "checkpoints")
step = pipeline.get_state()["batches_emitted"]
checkpoints.save(
    step,
    args=ocp.args.Composite(
        params=ocp.args.StandardSave(nnx.state(model)), data=CheckpointSave(pipeline)
    ),
)
checkpoints.wait_until_finished()
saved_files = sorted(p.name for p in (data_dir / "checkpoints" / str(step) / "data").iterdir())
print(f"  saved step {step}; its data item holds {saved_files}")
after_save = list(itertools.islice(pipeline, 5))

restored_model = nnx.Linear(8, 1, rngs=nnx.Rngs(1))  # other weights until restored
restored_pipeline = Pipeline(
    source=ArrayRecordSourceModule(config, pattern, rngs=nnx.Rngs(0)),
    stages=[add_noise],
    batch_size=32,
    rngs=nnx.Rngs(0),
)
restored = checkpoints.restore(
    checkpoints.latest_step(),
    args=ocp.args.Composite(
        params=ocp.args.StandardRestore(nnx.state(restored_model)),
        data=CheckpointRestore(restored_pipeline),  # sets the pipeline's position in place
    ),
)
nnx.update(restored_model, restored["params"])
checkpoints.close()
check(
    "the pipeline restored from the Orbax step yields the same next 5 batches",
    all(
        np.array_equal(a[key], b[key])
        for a, b in zip(after_save, itertools.islice(restored_pipeline, 5), strict=True)
        for key in a
    ),
)
check(
    "the params came back from the same step",
    all(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(nnx.state(model)),
            jax.tree.leaves(nnx.state(restored_model)),
            strict=True,
        )
    ),
)

# %% [markdown]
# ## 7. Epoch control
#
# As in Datarax: `num_epochs=N` stops after N epochs, `num_epochs=-1` runs until you stop (for
# step-based training). Batches cross epoch boundaries. In finite mode the last partial batch is
# kept unless `Pipeline(..., drop_remainder=True)`.

# %%
print("7. Epoch control")
finite = ArrayRecordSourceModule(ArrayRecordSourceConfig(num_epochs=2), pattern)
batches = list(Pipeline(source=finite, batch_size=64, rngs=nnx.Rngs(0)))
check("finite: 2 epochs of 1000 records, then stop", len(ids_of(batches)) == 2000)
check("finite: the last partial batch is kept", len(batches[-1]["data"]) == 2000 % 64)
infinite = Pipeline(source=by_list, batch_size=64, rngs=nnx.Rngs(0))
steps = list(itertools.islice(infinite, 100))
check("infinite: 100 steps of 64 run past 6 epochs", len(ids_of(steps)) == 6400)

# %% [markdown]
# ## 8. Shuffling behaviour
#
# As Datarax documents: epoch `e` is shuffled with seed `seed + e` (42, 43, 44, ...). Datarax
# stores the shuffled indices; resumax computes the order on demand from (seed, epoch,
# position) with a keyed bijection, so nothing of the dataset's size is kept in memory or in
# the state. Iterating a source directly yields its records for `num_epochs` epochs.

# %%
print("8. Shuffling: epoch e is shuffled with seed + e")
reshuffled = ArrayRecordSourceModule(
    ArrayRecordSourceConfig(seed=42, num_epochs=3, shuffle_files=True), pattern
)
order = [int(record["data"][0]) for record in reshuffled]
epochs = [order[i * 1000 : (i + 1) * 1000] for i in range(3)]
for epoch, records in enumerate(epochs):
    print(f"  epoch {epoch} (seed {42 + epoch}) starts with {records[:6]}")
check(
    "every epoch is a permutation of all records",
    all(sorted(records) == list(range(1000)) for records in epochs),
)
check("each epoch has a new order", epochs[0] != epochs[1] != epochs[2])

# %% [markdown]
# ## Results
#
# Every check above held. The temporary directory with the data and the checkpoint is removed.

# %%
for each in (pipeline, fresh, restored_pipeline, infinite, single, finite, reshuffled):
    each.close()  # a pipeline closes its source too
workdir.cleanup()
print("=" * 60)
print(f"Quick reference completed! {len(CHECKS_HELD)} checks held.")
print("=" * 60)
