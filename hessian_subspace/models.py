"""Flax models and the loss contract ``loss(params, batch) -> scalar`` the numerics rely on.

A batch is ``{"x": inputs, "y": labels}``. The Hessian the toolkit analyses is that of the
**mean cross-entropy** over the analysis set (mean squared error for regression), with the
model in inference mode.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

PyTree = Any

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "softplus": nn.softplus,
    "tanh": jnp.tanh,
}


class MLP(nn.Module):
    """Fully connected net: flatten, hidden Dense layers, linear output.

    ``hidden=()`` is softmax regression. Layers are named ``dense_0 ... dense_L`` so
    parameter names (``dense_0/kernel``) survive into results.
    """

    hidden: Sequence[int] = (100, 100)
    num_outputs: int = 10
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        x = jnp.reshape(x, (x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = act(nn.Dense(width, name=f"dense_{i}")(x))
        return nn.Dense(self.num_outputs, name=f"dense_{len(self.hidden)}")(x)


class SmallConvNet(nn.Module):
    """A small conv net for tests and benchmarks: two 3x3 convs, max-pooling, a dense head."""

    channels: Sequence[int] = (8, 16)
    num_outputs: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, c in enumerate(self.channels):
            x = nn.relu(nn.Conv(c, (3, 3), name=f"conv_{i}")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = jnp.reshape(x, (x.shape[0], -1))
        return nn.Dense(self.num_outputs, name="dense_out")(x)


def cross_entropy_loss(model: nn.Module) -> Callable[[PyTree, dict], jax.Array]:
    """``loss(params, batch)``: mean softmax cross-entropy of ``model`` over ``batch``."""

    def loss(params, batch):
        logits = model.apply({"params": params}, batch["x"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]))

    return loss


def accuracy(model: nn.Module, params: PyTree, batch: dict) -> jax.Array:
    """Fraction of ``batch`` classified correctly."""
    logits = model.apply({"params": params}, batch["x"])
    return jnp.mean(jnp.argmax(logits, -1) == batch["y"])


def init_params(model: nn.Module, key: jax.Array, example_x: jax.Array) -> PyTree:
    """Initial parameters of ``model`` for inputs shaped like ``example_x``."""
    return model.init(key, example_x)["params"]
