"""The digits classifier task of the training loop: image records -> class logits, with
accuracy and a pass over the test split as evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from resumax.errors import DataSourceError
from resumax.pipeline import Pipeline
from resumax.sources import ArrayRecordSourceConfig, ArrayRecordSourceModule
from resumax.stages import BatchMap
from resumax.train import distributed
from resumax.train.checks import check_labels, label_range_check
from resumax.train.config import Config, DataConfig
from resumax.train.datasets import prepare_digits
from resumax.train.models import build_model, cross_entropy

# Folded into the train seed to derive dropout keys, so they never coincide with the init keys.
_DROPOUT_STREAM = 0x64726F70


def features(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """Batch -> model inputs: float32 images and int32 labels (JAX's default integer width).

    A batch stage: one conversion per batch rather than one call per record keeps the input
    pipeline ahead of the training step (see `data_wait_fraction` in metrics.jsonl).
    """
    return {
        "image": np.asarray(batch["image"], dtype=np.float32),
        "label": np.asarray(batch["label"], dtype=np.int32),
    }


def build_source(
    data: DataConfig, paths: str, *, evaluation: bool = False
) -> ArrayRecordSourceModule:
    """Training records (seeded order, `data.num_epochs`) or one ordered pass for evaluation."""
    source_config = (
        ArrayRecordSourceConfig(seed=data.seed, num_epochs=1, shuffle_files=False)
        if evaluation
        else ArrayRecordSourceConfig(
            seed=data.seed,
            num_epochs=data.num_epochs,
            shuffle_files=data.shuffle_files,
            shuffle_window=data.shuffle_window,
        )
    )
    try:
        return ArrayRecordSourceModule(source_config, paths, **data.source_options())
    except DataSourceError as error:
        if data.prepare is not None:
            raise
        raise DataSourceError(
            f"{error}; point data.train_paths / data.test_paths at ArrayRecord files, or set "
            "data.prepare=digits to write the embedded digits data set there"
        ) from error


def make_steps(graphdef: nnx.GraphDef, seed: int, dropout: bool) -> tuple[Callable, Callable]:
    """Jitted pure functions over the split (model, optimizer) state.

    train_step(state, images, labels, step) -> (state, loss, {"accuracy"}); the dropout key is
    `fold_in(key(seed) + stream, step)`, so a resumed run draws the same masks.
    eval_step(state, images, labels, mask) -> (sum of losses, number correct) over unmasked rows.
    """
    dropout_base = jax.random.fold_in(jax.random.key(seed), _DROPOUT_STREAM)

    @jax.jit
    def train_step(state, images, labels, step):
        model, optimizer = nnx.merge(graphdef, state)
        key = jax.random.fold_in(dropout_base, step) if dropout else None

        def loss_fn(model):
            logits = model(images, key)
            return cross_entropy(logits, labels).mean(), logits

        (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        accuracy = (logits.argmax(-1) == labels).mean()
        return nnx.state((model, optimizer)), loss, {"accuracy": accuracy}

    @jax.jit
    def eval_step(state, images, labels, mask):
        model, _ = nnx.merge(graphdef, state)
        logits = model(images)
        correct = (logits.argmax(-1) == labels) * mask
        return (cross_entropy(logits, labels) * mask).sum(), correct.sum()

    return train_step, eval_step


def evaluate(
    eval_step: Callable,
    state: Any,
    pipeline: Pipeline,
    start: dict,
    batch_size: int,
    place: Callable[[Any], Any],
) -> dict[str, float]:
    """Mean loss and accuracy over one pass of `pipeline`, rewound to its `start` state first.

    A short last batch is zero-padded to `batch_size` and masked, so one compiled eval_step
    serves every batch. `place` puts the (images, labels, mask) of a batch where the state is.
    """
    pipeline.set_state(start)
    loss_sum, correct, count = 0.0, 0.0, 0
    for batch in pipeline:
        rows = len(batch["label"])
        images, labels = (
            np.concatenate([v, np.zeros((batch_size - rows, *v.shape[1:]), v.dtype)])
            for v in (batch["image"], batch["label"])
        )
        mask = (np.arange(batch_size) < rows).astype(np.float32)
        batch_loss, batch_correct = eval_step(state, *place((images, labels, mask)))
        loss_sum += float(distributed.host_array(batch_loss))
        correct += float(distributed.host_array(batch_correct))
        count += rows
    return {"eval_loss": loss_sum / count, "eval_accuracy": correct / count}


class ClassifierTask:
    """What the loop needs for the digits classifiers: data, pipelines, model, steps, metrics.

    A task (this, or `LanguageModelTask` for model.name: transformer) builds the training
    pipeline and the model, jits the steps, maps a batch to the train_step arguments after the
    state, and names its throughput; the loop around them is the same for every task.
    """

    evaluates = True

    def __init__(self, config: Config):
        self.config = config

    def prepare_data(self) -> None:
        data = self.config.data
        if data.prepare == "digits" and prepare_digits(data.dir):
            print(f"prepared the digits data set in {data.dir}", flush=True)

    def build_pipeline(
        self,
        sharding: jax.sharding.Sharding | None,
        *,
        process_count: int | None = None,
        check_data: bool = True,
    ) -> Pipeline:
        """Training batches (`data.batch_size` records per process), and the test split's.

        Raises ConfigError if a label of the first records is outside [0, model.num_classes);
        a check stage raises it for later training batches as they come. `check_data=False`
        reads no label first, and `process_count` makes this process stand for process 0 of
        that many (both for `resumax state` / `batches`).
        """
        data, num_classes = self.config.data, self.config.model.num_classes
        self.source = build_source(data, data.train_paths)
        eval_source = build_source(data, data.test_paths, evaluation=True)
        if check_data:
            check_labels(self.source, num_classes, "data.train_paths")
            check_labels(eval_source, num_classes, "data.test_paths")
        # Every process evaluates the whole test split, so eval batches are replicated.
        self.eval_pipeline = Pipeline(
            source=eval_source,
            stages=[BatchMap(features)],
            batch_size=data.batch_size,
            rngs=data.seed,
            shard_by_process=False,
        )
        self.eval_start = self.eval_pipeline.get_state()
        return Pipeline(
            source=self.source,
            stages=[BatchMap(features), label_range_check(num_classes)],
            batch_size=data.batch_size,
            rngs=data.seed,
            sharding=sharding,
            num_workers=data.num_workers,
            prefetch=data.prefetch,
            **distributed.process_override(process_count),
        )

    def build_model(self) -> nnx.Module:
        image_shape = self.source[0]["image"].shape
        return build_model(self.config.model, image_shape, self.config.train.seed)

    def make_steps(self, graphdef: nnx.GraphDef) -> tuple[Callable, Callable]:
        return make_steps(graphdef, self.config.train.seed, self.config.model.dropout > 0)

    def inputs(self, batch: dict[str, Any]) -> tuple[Any, ...]:
        return batch["image"], batch["label"]

    def evaluate(self, eval_step: Callable, state: Any, place: Callable) -> dict[str, float]:
        batch_size = self.config.data.batch_size
        return evaluate(eval_step, state, self.eval_pipeline, self.eval_start, batch_size, place)

    def throughput(self, steps: int, seconds: float) -> dict[str, float]:
        records = steps * self.config.data.batch_size * jax.process_count()
        return {"records_per_s": records / seconds}
