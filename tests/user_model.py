"""A user's own model, as ``launch.analyze --config.source.*`` names it (``module:attribute``):
plain JAX, nothing from hessian_subspace. Used by tests/test_launch_analyze.py."""

import jax
import jax.numpy as jnp
import numpy as np

NUM_CLASSES, DIM, HIDDEN, NUM_EXAMPLES = 3, 8, 6, 96


def init_params(seed: int = 0) -> dict:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"hidden": {"w": jax.random.normal(k1, (DIM, HIDDEN)) / np.sqrt(DIM),
                       "b": jnp.zeros(HIDDEN)},
            "out": {"w": jax.random.normal(k2, (HIDDEN, NUM_CLASSES)) / np.sqrt(HIDDEN),
                    "b": jnp.zeros(NUM_CLASSES)}}


def logits(params, x):
    h = jnp.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
    return h @ params["out"]["w"] + params["out"]["b"]


def loss(params, batch):
    logp = jax.nn.log_softmax(logits(params, batch["x"]))
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def metrics(params, batch):
    return {"loss": loss(params, batch),
            "accuracy": jnp.mean(jnp.argmax(logits(params, batch["x"]), -1) == batch["y"])}


def analysis_set() -> dict:
    """Three Gaussian classes in 8 dimensions (float32 inputs, int32 labels)."""
    rng = np.random.default_rng(0)
    means = rng.normal(size=(NUM_CLASSES, DIM))
    y = np.arange(NUM_EXAMPLES) % NUM_CLASSES
    x = means[y] + 0.7 * rng.normal(size=(NUM_EXAMPLES, DIM))
    return {"x": x.astype(np.float32), "y": y.astype(np.int32)}


def trajectory(steps, learning_rate: float = 0.5) -> dict:
    """``{step: params}`` of full-batch gradient descent on :func:`analysis_set`."""
    data, params, out = analysis_set(), init_params(), {}
    grad = jax.jit(jax.grad(loss))
    for t in range(max(steps) + 1):
        if t in steps:
            out[t] = params
        params = jax.tree_util.tree_map(lambda p, g: p - learning_rate * g, params,
                                        grad(params, data))
    return out
