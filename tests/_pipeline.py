"""Shared problems of the analysis layer's tests: a tiny linen classifier on a Gaussian
mixture, the paper's chain on it, and float64 references computed without the pipeline."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import flatten_util

import hessian_subspace as hs
from hessian_subspace import analysis
from hessian_subspace.analysis import config as config_lib
from hessian_subspace.paper import data, models
from hessian_subspace.training import tasks

CE = "classification"


def tiny_problem(seed=0):
    ds = data.gaussian_mixture(num_classes=3, dim=6, num_examples=90, sigma=0.5, seed=seed)
    model = models.build_model("fc", num_outputs=3, hidden=(5,), activation="softplus")
    params, state = tasks.init_variables(model, jax.random.key(seed), ds["x"][:1])
    return model, {"x": ds["x"], "y": ds["y"]}, params, state


def config_of(**flat):
    """The analysis config with flat (alias) settings applied, checked."""
    return config_lib.validate(config_lib.apply_aliases(config_lib.default_config(), **flat))


def paper_analyzer(model, ds, results_dir, settings=None, k=3, **kwargs):
    """The paper's chain on a linen model, as ``paper.experiment.analyzer_for`` builds it
    (``settings``: an analysis config; ``kwargs``: more of the analyzer's arguments)."""
    settings = settings or config_lib.default_config()
    options = config_lib.analyzer_options(settings, output_fn=tasks.inference_outputs(model),
                                          output_loss=tasks.output_loss(CE))
    return analysis.Analyzer(
        config_lib.build_chain(settings, k=k, metrics_fn=tasks.inference_metrics(model, CE)),
        tasks.inference_loss(model, CE), data=ds,
        results=analysis.Results(results_dir, record_fields=dict(k=k), progress=False),
        **dict(options, **kwargs))


def _float64_problem(model, ds, params):
    """Parameters and data in float64 (call inside ``jax.enable_x64``), the loss, and the
    flat parameters with their unravel."""
    p64 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params)
    batch = {"x": jnp.asarray(ds["x"], jnp.float64), "y": jnp.asarray(ds["y"])}
    flat, unravel = flatten_util.ravel_pytree(p64)
    return p64, batch, tasks.cross_entropy_loss(model), flat, unravel


def dense_reference(model, ds, params):
    """g, H and its eigen-decomposition in float64, independently of the pipeline."""
    with jax.enable_x64(True):
        p64, batch, loss, flat, unravel = _float64_problem(model, ds, params)
        g = np.asarray(jax.grad(lambda x: loss(unravel(x), batch))(flat))
        h = np.asarray(jax.hessian(lambda x: loss(unravel(x), batch))(flat))
        value = float(loss(p64, batch))
    w, v = np.linalg.eigh(h)
    order = np.argsort(-w)
    return value, g, h, w[order], v[:, order].T


def moved_params(params, scale=0.3):
    return jax.tree_util.tree_map(
        lambda x: x + scale * jnp.sin(jnp.arange(x.size).reshape(x.shape)), params)


def dense_curvatures(model, ds, params):
    """Dense float64 g, H and GGN of the tiny problem (the GGN from jacfwd, as in test_ggn)."""
    from test_ggn import _dense_ggn
    with jax.enable_x64(True):
        p64, batch, loss, flat, unravel = _float64_problem(model, ds, params)
        g = np.asarray(jax.jit(jax.grad(lambda x, b: loss(unravel(x), b)))(flat, batch))
        h = np.asarray(jax.jit(hs.dense_hessian)(loss, p64, batch))
        ggn = _dense_ggn(hs.curvature.bind_state(tasks.inference_outputs(model), {}), p64, batch,
                         CE)
    return g, h, ggn


def eig_desc(m):
    w, v = np.linalg.eigh(m)
    return w[::-1], v[:, ::-1].T


def acceptance_problem():
    ds = data.gaussian_mixture(num_classes=3, dim=8, num_examples=200, sigma=0.5, seed=1)
    analysis_set = {"x": jnp.asarray(ds["x"]), "y": jnp.asarray(ds["y"])}
    keys = jax.random.split(jax.random.key(0), 2)
    params = {"w1": 0.5 * jax.random.normal(keys[0], (8, 6)), "b1": jnp.zeros(6),
              "w2": 0.5 * jax.random.normal(keys[1], (6, 3)), "b2": jnp.zeros(3)}
    return analysis_set, params


def user_loss(weight_decay):
    def loss_fn(params, batch):  # the user's own model and loss, params a dict
        h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
        logits = h @ params["w2"] + params["b2"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        return ce + weight_decay * jnp.sum(params["w1"] ** 2)
    return loss_fn
