r"""Supervised tasks for flax linen models: the mean loss of their outputs, training-mode and
inference-mode losses, and the functions the metric pipeline analyses.

A batch is ``{"x": inputs, "y": targets}``: integer class labels of shape ``(n,)`` for
``"classification"`` (softmax cross-entropy), float targets of shape ``(n, m)`` for
``"regression"`` (mean squared error over all ``n * m`` entries). Models are linen modules whose
``__call__(x, train=False)`` returns ``(n, m)`` outputs; their non-"params" collections (BatchNorm
statistics) are the **model state**.

The pipeline's contract is ``loss(params, batch, state) -> mean loss``
(:mod:`hessian_subspace.analysis`); :func:`inference_loss` gives it for a module, with the model
in inference mode (dropout off, BatchNorm on the running statistics in ``state``), so that the
Hessian is a fixed, deterministic operator. :func:`train_loss_fn` is the training loss (dropout
on, BatchNorm on batch statistics, updated). Nothing here is specific to the paper's models.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
Batch = dict
StateLossFn = Callable[[PyTree, Batch, PyTree], jax.Array]
TrainLossFn = Callable[[PyTree, PyTree, Batch, Any], tuple[jax.Array, tuple[PyTree, jax.Array]]]

TASKS = ("classification", "regression")


def check_task(task: str) -> None:
    """Raises `ValueError` unless ``task`` is one of :data:`TASKS`."""
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS}, got {task!r}.")


def mean_loss(outputs: jax.Array, y: jax.Array, task: str) -> jax.Array:
    r"""The task's mean loss of ``outputs`` against targets ``y``.

    .. math:: L = \frac{1}{n}\sum_{a=1}^{n} \ell(f_a, y_a),

    :math:`\ell` the softmax cross-entropy against integer labels (classification), or
    ``mean((outputs - y) ** 2)`` over all ``(n, m)`` entries (regression; for one output the mean
    over examples).
    """
    if task == "classification":
        if not jnp.issubdtype(jnp.result_type(y), jnp.integer):
            raise TypeError(f"classification labels `y` must be integer class indices, got "
                            f"dtype {jnp.result_type(y)}; for float targets use "
                            "task='regression'.")
        if jnp.shape(y) != jnp.shape(outputs)[:-1]:
            raise ValueError(f"classification labels `y` of shape {jnp.shape(y)} for outputs "
                             f"of shape {jnp.shape(outputs)}; expected {jnp.shape(outputs)[:-1]}"
                             " (one class index per example).")
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(outputs, y))
    if jnp.shape(y) != jnp.shape(outputs):  # (n,) against (n, 1) would broadcast to (n, n).
        raise ValueError(
            f"regression targets of shape {jnp.shape(y)} for outputs of shape "
            f"{jnp.shape(outputs)}; they must match.")
    return jnp.mean((outputs - y) ** 2)


def batch_metrics(outputs: jax.Array, batch: Batch, task: str) -> dict[str, jax.Array]:
    """Mean loss (and accuracy) of ``outputs`` against ``batch["y"]``.

    Returns:
      ``{"loss": scalar, "accuracy": scalar}`` for classification; ``{"loss": scalar}`` only
      for regression (no accuracy key, rather than a NaN that would poison averages).
    """
    check_task(task)
    metrics = {"loss": mean_loss(outputs, batch["y"], task)}
    if task == "classification":
        metrics["accuracy"] = jnp.mean(jnp.argmax(outputs, -1) == batch["y"])
    return metrics


def check_data(name: str, data: Any, task: str, num_outputs: int | None = None) -> None:
    """Raises a ``TypeError``/``ValueError`` naming ``name`` unless ``data`` is a data set of
    ``task``: a dict with ``"x"`` and ``"y"`` of one leading example axis; for classification
    ``y`` integer class indices (``(n,)``, or ``(n, positions)`` for a sequence model) in
    ``[0, num_outputs)`` (checked on the values,
    which must be concrete), for regression float targets. Raw ``uint8`` inputs are refused:
    scale images to floats first (the loaders of :mod:`hessian_subspace.paper.data` give
    ``[0, 1]``); other integer inputs (token ids) pass.
    """
    check_task(task)
    if not isinstance(data, dict) or "x" not in data or "y" not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"`{name}` must be a dict with inputs 'x' and targets 'y', got {keys}")
    x, y = data["x"], data["y"]
    if not np.ndim(x) or not np.ndim(y) or np.shape(x)[0] != np.shape(y)[0]:
        raise ValueError(f"`{name}`: 'x' {np.shape(x)} and 'y' {np.shape(y)} need one leading "
                         "example axis of the same size")
    if np.asarray(x[:1]).dtype == np.uint8:
        raise TypeError(f"`{name}['x']` holds uint8 values (raw image bytes?); scale them to "
                        "floats first, e.g. x.astype(np.float32) / 255 (the paper's loaders "
                        "give [0, 1] floats)")
    y_dtype = np.asarray(y[:1]).dtype
    if task == "regression":
        if not np.issubdtype(y_dtype, np.floating):
            raise TypeError(f"`{name}['y']`: regression targets must be floats, got {y_dtype}")
        return
    if not np.issubdtype(y_dtype, np.integer):
        raise TypeError(f"`{name}['y']`: classification labels must be integer class indices, "
                        f"got dtype {y_dtype}")
    if num_outputs is not None and _tree_is_concrete(y) and np.size(y):
        lo, hi = int(np.min(y)), int(np.max(y))
        if lo < 0 or hi >= num_outputs:
            raise ValueError(f"`{name}['y']`: labels must be class indices in [0, "
                             f"{num_outputs}) (the model has {num_outputs} outputs), found "
                             f"values in [{lo}, {hi}]")


def _tree_is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def init_variables(model: nn.Module, key: jax.Array, example_x: jax.Array
                   ) -> tuple[PyTree, dict[str, PyTree]]:
    """Initial parameters and model state of ``model``, initialised in inference mode.

    Args:
      model: a flax module with ``__call__(x, train=False)``.
      key: PRNG key for the parameter initialisers.
      example_x: inputs of shape ``(n, ...)`` (``n = 1`` suffices).

    Returns:
      ``(params, model_state)``; ``model_state`` holds the non-"params" collections, e.g.
      ``{"batch_stats": ...}`` (running means 0, variances 1), and is ``{}`` if there are none.
    """
    variables = dict(model.init(key, example_x, train=False))
    params = variables.pop("params")
    return params, variables


# --------------------------------------------------------------------------------------------
# Inference mode: the functions the metric pipeline analyses, ``f(params, batch, state)``.


def inference_loss(model: nn.Module, task: str) -> StateLossFn:
    r"""``loss(params, batch, state) -> mean loss`` of ``model`` in inference mode.

    Dropout is off and BatchNorm normalises with the running statistics in ``state`` (the
    module's non-"params" collections, ``{}`` if none), which stay fixed: the loss is a
    deterministic function of ``params`` on a fixed data set, and examples do not interact,
    so the mean over a data set is the weighted mean of the batch means (what
    :func:`hessian_subspace.dataset_hvp` computes). One function per ``(model, task)`` (cached),
    so compiled code is shared by every checkpoint (returned as a ``jax.tree_util.Partial``,
    which jitted functions accept as an argument); give it to
    :class:`hessian_subspace.analysis.Analyzer`, or bind a state with
    :func:`hessian_subspace.curvature.bind_state` for the numerical core.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from hessian_subspace.paper import models
      >>> from hessian_subspace.training import tasks
      >>> model = models.build_model("fc", num_outputs=10, hidden=(100, 100))
      >>> params, state = tasks.init_variables(model, jax.random.key(0), jnp.ones((1, 784)))
      >>> loss = tasks.inference_loss(model, "classification")
      >>> batch = {"x": jnp.zeros((4, 784)), "y": jnp.arange(4)}
      >>> print(f"{loss(params, batch, state):.4f}")  # log(10): zero inputs give equal logits
      2.3026
    """
    check_task(task)
    return jax.tree_util.Partial(_inference_loss(model, task))


@functools.lru_cache(maxsize=None)
def _inference_loss(model: nn.Module, task: str) -> StateLossFn:
    def loss(params: PyTree, batch: Batch, state: PyTree) -> jax.Array:
        outputs = model.apply({"params": params, **state}, batch["x"], train=False)
        return mean_loss(outputs, batch["y"], task)

    return loss


def inference_metrics(model: nn.Module, task: str):
    """``metrics(params, batch, state) -> {"loss", "accuracy"?}`` in inference mode, like
    :func:`inference_loss` (accuracy for classification only)."""
    check_task(task)
    return jax.tree_util.Partial(_inference_metrics(model, task))


@functools.lru_cache(maxsize=None)
def _inference_metrics(model: nn.Module, task: str):
    def metrics(params: PyTree, batch: Batch, state: PyTree) -> dict[str, jax.Array]:
        outputs = model.apply({"params": params, **state}, batch["x"], train=False)
        return batch_metrics(outputs, batch, task)

    return metrics


def inference_outputs(model: nn.Module):
    """``outputs(params, batch, state) -> (n, m)``: the model in inference mode, the output
    function of the Gauss-Newton matrix (:func:`hessian_subspace.ggn_vp`)."""
    return jax.tree_util.Partial(_inference_outputs(model))


@functools.lru_cache(maxsize=None)
def _inference_outputs(model: nn.Module):
    def outputs(params: PyTree, batch: Batch, state: PyTree) -> jax.Array:
        return model.apply({"params": params, **state}, batch["x"], train=False)

    return outputs


def output_loss(task: str):
    r"""``loss(outputs, batch) -> scalar``: :func:`mean_loss` of model outputs, the loss of the
    Gauss-Newton matrix, so that ``output_loss(task)(inference_outputs(model)(p, b, s), b)``
    equals ``inference_loss(model, task)(p, b, s)``. Its output-space Hessian per example is
    :math:`\mathrm{diag}(p) - pp^\top` or :math:`2I/m`, divided by n by the mean. A
    ``jax.tree_util.Partial`` (like the functions above), so it can be passed to jitted code."""
    check_task(task)
    return jax.tree_util.Partial(_output_loss(task))


@functools.lru_cache(maxsize=None)
def _output_loss(task: str):
    def loss(outputs: jax.Array, batch: Batch) -> jax.Array:
        return mean_loss(outputs, batch["y"], task)

    return loss


def cross_entropy_loss(model: nn.Module):
    """``loss(params, batch)``: mean softmax cross-entropy of a linen classifier without model
    state, in inference mode (:func:`inference_loss` with an empty state bound)."""
    from hessian_subspace import curvature

    return curvature.bind_state(inference_loss(model, "classification"), {})


# --------------------------------------------------------------------------------------------
# Training mode.


def train_loss_fn(model: nn.Module, task: str) -> TrainLossFn:
    """The training loss: ``loss(params, model_state, batch, dropout_key)``.

    Same mean loss as :func:`inference_loss`, but with ``train=True``: dropout is on (driven
    by ``dropout_key``) and BatchNorm normalises with the batch statistics and updates the
    running averages, which are returned. Differentiate with
    ``jax.value_and_grad(loss, has_aux=True)``; jit-compatible.

    Returns:
      ``loss(params, model_state, batch, dropout_key) -> (loss, (new_model_state, outputs))``
      where ``dropout_key`` is a PRNG key for the "dropout" rng stream (ignored by models
      without dropout; ``None`` is allowed for them), ``new_model_state`` has the structure of
      ``model_state`` and ``outputs`` has shape ``(n, num_outputs)``.
    """
    check_task(task)

    def loss(params: PyTree, model_state: dict[str, PyTree], batch: Batch, dropout_key: Any
             ) -> tuple[jax.Array, tuple[dict[str, PyTree], jax.Array]]:
        variables = {"params": params, **model_state}
        rngs = {} if dropout_key is None else {"dropout": dropout_key}
        if model_state:
            outputs, new_state = model.apply(variables, batch["x"], train=True, rngs=rngs,
                                             mutable=list(model_state))
            new_state = dict(new_state)
        else:
            outputs = model.apply(variables, batch["x"], train=True, rngs=rngs)
            new_state = {}
        return mean_loss(outputs, batch["y"], task), (new_state, outputs)

    return loss
