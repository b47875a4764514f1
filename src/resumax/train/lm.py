"""The language-model task of the training loop: a byte-level decoder-only Transformer (Flax NNX)
on packed rows of a weighted mixture of token corpora, with a per-token loss masked on padding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from resumax.errors import DataSourceError
from resumax.pipeline import Pipeline
from resumax.sources import ArrayRecordSourceConfig, ArrayRecordSourceModule, MixtureSource
from resumax.stages import PackSequences
from resumax.train import distributed
from resumax.train.config import Config, ModelConfig
from resumax.train.text_data import prepare_stdlib_text

VOCAB_SIZE = 256  # bytes
FIELD = "tokens"


# The model -------------------------------------------------------------------------------------


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """(batch, 1, query, key) True where a token may attend: same packed record, not later."""
    length = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    same_record = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same_record & causal)[:, None]


class Block(nnx.Module):
    """Pre-norm residual block: masked multi-head self-attention, then a 4x GELU MLP."""

    def __init__(self, embed_dim: int, num_heads: int, *, rngs: nnx.Rngs):
        self.attention_norm = nnx.LayerNorm(embed_dim, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=num_heads, in_features=embed_dim, decode=False, rngs=rngs
        )
        self.mlp_norm = nnx.LayerNorm(embed_dim, rngs=rngs)
        self.up = nnx.Linear(embed_dim, 4 * embed_dim, rngs=rngs)
        self.down = nnx.Linear(4 * embed_dim, embed_dim, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attention(self.attention_norm(x), mask=mask)
        return x + self.down(nnx.gelu(self.up(self.mlp_norm(x))))


class Transformer(nnx.Module):
    """Bytes -> next-byte logits. Learned position embeddings are indexed by each token's
    position within its packed record, and attention stays inside the record (segment ids)."""

    def __init__(self, config: ModelConfig, sequence_length: int, *, rngs: nnx.Rngs):
        dim = config.embed_dim
        self.token_embed = nnx.Embed(VOCAB_SIZE, dim, rngs=rngs)
        self.position_embed = nnx.Embed(sequence_length, dim, rngs=rngs)
        self.blocks = nnx.List(
            [Block(dim, config.num_heads, rngs=rngs) for _ in range(config.num_layers)]
        )
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, VOCAB_SIZE, rngs=rngs)

    def __call__(
        self, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array
    ) -> jax.Array:
        x = self.token_embed(tokens) + self.position_embed(positions)
        mask = attention_mask(segment_ids)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


def next_token_loss(
    logits: jax.Array, tokens: jax.Array, segment_ids: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(mean loss per predicted token, number of predicted tokens).

    Position t predicts token t + 1 of the same record: padding and the last token of each
    packed record predict nothing.
    """
    targets = tokens[:, 1:]
    valid = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
    log_probs = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    count = valid.sum()
    return (nll * valid).sum() / jnp.maximum(count, 1), count


# The task --------------------------------------------------------------------------------------


class LanguageModelTask:
    """What the training loop needs for the language model: data, pipeline, model, step.

    There is no evaluation pass (`evaluates` is False); metrics lines carry the training loss,
    the packing efficiency of the step's batch and tokens_per_s (row tokens, padding included).
    """

    evaluates = False

    def __init__(self, config: Config):
        self.config = config

    def prepare_data(self) -> None:
        data = self.config.data
        if data.prepare == "stdlib_text" and prepare_stdlib_text(data.dir):
            print(f"prepared the stdlib_text corpora in {data.dir}", flush=True)

    def _corpus(self, name: str) -> ArrayRecordSourceModule:
        data = self.config.data
        paths = f"{data.dir}/{name}-*.array_record"
        config = ArrayRecordSourceConfig(
            seed=data.seed, shuffle_files=data.shuffle_files, shuffle_window=data.shuffle_window
        )
        try:
            return ArrayRecordSourceModule(config, paths, **data.source_options())
        except DataSourceError as error:
            raise DataSourceError(
                f"{error}; data.weights names the corpus {name!r}, read from "
                f"data.dir/{name}-*.array_record (data.prepare=stdlib_text writes prose and code)"
            ) from error

    def build_source(self) -> MixtureSource:
        """The corpora of data.weights, mixed by weight (seeded by data.seed), forever."""
        data = self.config.data
        corpora = {name: self._corpus(name) for name in data.weights}
        config = ArrayRecordSourceConfig(seed=data.seed, shuffle_files=data.shuffle_files)
        return MixtureSource(config, corpora, dict(data.weights))

    def build_pipeline(
        self,
        sharding: jax.sharding.Sharding | None,
        *,
        process_count: int | None = None,
        check_data: bool = True,
    ) -> Pipeline:
        """Packed rows of `data.sequence_length` tokens, `data.batch_size` rows per process.

        `process_count` makes this process stand for process 0 of that many (for `resumax
        state` / `batches`); there is no data check to skip (`check_data`)."""
        data = self.config.data
        packing = PackSequences(data.sequence_length, [FIELD], window=data.window, long="split")
        return Pipeline(
            self.build_source(),
            [packing],
            batch_size=data.batch_size,
            rngs=data.seed,
            sharding=sharding,
            num_workers=data.num_workers,
            prefetch=data.prefetch,
            **distributed.process_override(process_count),
        )

    def build_model(self) -> nnx.Module:
        """The configured Transformer, initialised from train.seed alone."""
        rngs = nnx.Rngs(params=self.config.train.seed)
        return Transformer(self.config.model, self.config.data.sequence_length, rngs=rngs)

    def make_steps(self, graphdef: nnx.GraphDef) -> tuple[Callable, None]:
        """train_step(state, tokens, segment_ids, positions, step) -> (state, loss, metrics)."""

        @jax.jit
        def train_step(state, tokens, segment_ids, positions, step):
            model, optimizer = nnx.merge(graphdef, state)

            def loss_fn(model):
                logits = model(tokens, segment_ids, positions)
                return next_token_loss(logits, tokens, segment_ids)[0]

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            optimizer.update(model, grads)
            efficiency = (segment_ids > 0).mean()
            return nnx.state((model, optimizer)), loss, {"packing_efficiency": efficiency}

        return train_step, None

    def inputs(self, batch: dict[str, Any]) -> tuple[Any, ...]:
        return batch[FIELD], batch[f"{FIELD}_segment_ids"], batch[f"{FIELD}_positions"]

    def throughput(self, steps: int, seconds: float) -> dict[str, float]:
        rows = self.config.data.batch_size * jax.process_count()
        return {"tokens_per_s": steps * rows * self.config.data.sequence_length / seconds}
