"""The example classifiers of the training loop: a Flax NNX MLP and a small CNN, built from config.

Dropout takes its key as an argument (the loop derives it from the step), so the models hold no
RNG state that would have to be checkpointed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from resumax.train.config import ModelConfig


class MLP(nnx.Module):
    """Flattened image -> (Linear, ReLU, Dropout) per hidden size -> Linear to class logits."""

    def __init__(self, in_features: int, config: ModelConfig, *, rngs: nnx.Rngs):
        sizes = [in_features, *config.hidden_sizes]
        self.hidden = nnx.List(
            [nnx.Linear(i, o, rngs=rngs) for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
        )
        self.dropout = nnx.Dropout(config.dropout)
        self.head = nnx.Linear(sizes[-1], config.num_classes, rngs=rngs)

    def __call__(self, images: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        x = images.reshape(images.shape[0], -1)
        for layer in self.hidden:
            x = self.dropout(
                nnx.relu(layer(x)), deterministic=dropout_key is None, rngs=dropout_key
            )
        return self.head(x)


class CNN(nnx.Module):
    """Image -> (3x3 Conv, ReLU, 2x2 average pool) per channel count -> Dropout -> Linear."""

    def __init__(self, image_shape: tuple[int, ...], config: ModelConfig, *, rngs: nnx.Rngs):
        height, width = image_shape[:2]
        in_channels = image_shape[2] if len(image_shape) == 3 else 1
        channels = [in_channels, *config.channels]
        self.convs = nnx.List(
            [
                nnx.Conv(i, o, kernel_size=(3, 3), rngs=rngs)
                for i, o in zip(channels[:-1], channels[1:], strict=True)
            ]
        )
        for _ in config.channels:
            height, width = max(height // 2, 1), max(width // 2, 1)
        self.dropout = nnx.Dropout(config.dropout)
        self.head = nnx.Linear(height * width * channels[-1], config.num_classes, rngs=rngs)

    def __call__(self, images: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        x = images[..., None] if images.ndim == 3 else images
        for conv in self.convs:
            x = nnx.relu(conv(x))
            window = (min(2, x.shape[1]), min(2, x.shape[2]))
            x = nnx.avg_pool(x, window_shape=window, strides=window)
        x = x.reshape(x.shape[0], -1)
        x = self.dropout(x, deterministic=dropout_key is None, rngs=dropout_key)
        return self.head(x)


def build_model(config: ModelConfig, image_shape: tuple[int, ...], seed: int) -> nnx.Module:
    """The configured model for images of `image_shape`, initialised from `seed` alone."""
    rngs = nnx.Rngs(params=seed)
    if config.name == "cnn":
        return CNN(tuple(image_shape), config, rngs=rngs)
    return MLP(math.prod(image_shape), config, rngs=rngs)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy against integer labels."""
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
