r"""The paper's per-checkpoint measurements, as pure functions of (params, model state, analysis
data, earlier results).

Each function here is usable alone from Python; :mod:`hessian_subspace.pipeline` composes them
over a stream of checkpoints. Every jitted function takes the parameters, the data and the
loss (a ``jax.tree_util.Partial`` whose bound arrays are the frozen model state) as *inputs*, so
analysing many checkpoints of one run compiles each program once.

Notation (Gur-Ari et al. 2018): g = ∇L and H = ∇²L of the mean loss over the analysis set;
V_top = top-k eigenvectors (k = number of classes), V_next = eigenvectors k+1 … 2k.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import flatten_util

from hessian_subspace import curvature, krylov, metrics, models

PyTree = Any
Partial = jax.tree_util.Partial


# --------------------------------------------------------------------------------------------
# The analysis loss and metrics of a model: Partials whose bound argument is the model state.


def analysis_loss(model, task: str, model_state: PyTree) -> Partial:
    """:func:`models.analysis_loss_fn`: the mean loss in inference mode, model state bound."""
    return models.analysis_loss_fn(model, model_state, task)


def analysis_metrics(model, task: str, model_state: PyTree) -> Partial:
    """:func:`models.analysis_metrics_fn`: mean loss (and accuracy) in inference mode."""
    return models.analysis_metrics_fn(model, model_state, task)


def analysis_output_fn(model, model_state: PyTree) -> Partial:
    """``outputs(params, batch) -> (n, num_outputs)``: the model in inference mode (dropout off,
    BatchNorm on its frozen statistics), the output function of the Gauss-Newton matrix.

    A ``jax.tree_util.Partial`` binding ``model_state`` to one cached function per model, like
    :func:`models.analysis_loss_fn`, so a new checkpoint reuses compiled code.
    """
    return Partial(_analysis_output_impl(model), model_state)


@functools.lru_cache(maxsize=None)
def _analysis_output_impl(model):
    def outputs(model_state: PyTree, params: PyTree, batch: dict) -> jax.Array:
        return model.apply({"params": params, **model_state}, batch["x"], train=False)

    return outputs


def output_loss(task: str) -> Partial:
    r"""``loss(outputs, batch) -> scalar``: the mean loss of model outputs, the loss of the
    Gauss-Newton matrix: softmax cross-entropy against integer labels (classification), or
    ``mean((outputs - y) ** 2)`` over all ``(n, m)`` entries (regression), exactly the
    normalisation of :func:`models.batch_metrics` and :func:`models.analysis_loss_fn`, so that
    ``output_loss(task)(analysis_output_fn(model, state)(params, b), b)`` is the analysis loss.
    Its output-space Hessian per example is :math:`\mathrm{diag}(p) - pp^\top` or
    :math:`2I/m`, divided by n by the mean.
    """
    if task not in models.TASKS:
        raise ValueError(f"`task` must be one of {models.TASKS}, got {task!r}.")
    return Partial(_output_loss_impl(task))


@functools.lru_cache(maxsize=None)
def _output_loss_impl(task: str):
    def loss(outputs: jax.Array, batch: dict) -> jax.Array:
        return models.batch_metrics(outputs, batch, task)["loss"]

    return loss


CURVATURES = ("hessian", "ggn")


def curvature_operator(curvature_name: str, model, task: str, model_state: PyTree,
                       params: PyTree, data: dict, *, batch_size: int,
                       precision: str | None = None, block=None):
    """The operator the paper's quantities are measured with: the Hessian (``"hessian"``,
    :func:`curvature.dataset_hvp`) or the Gauss-Newton matrix (``"ggn"``,
    :func:`curvature.dataset_ggn`) of the analysis loss over ``data``, restricted to the
    parameter block ``block`` (prefixes, see :func:`curvature.restrict`) unless it is None."""
    if curvature_name == "hessian":
        op = curvature.dataset_hvp(analysis_loss(model, task, model_state), params, data,
                                   batch_size=batch_size, precision=precision)
    elif curvature_name == "ggn":
        op = curvature.dataset_ggn(analysis_output_fn(model, model_state), output_loss(task),
                                   params, data, batch_size=batch_size, precision=precision)
    else:
        raise ValueError(f"`curvature` must be one of {CURVATURES}, got {curvature_name!r}.")
    return op if block is None else curvature.restrict(op, block)


# --------------------------------------------------------------------------------------------
# Full-data quantities.


@functools.partial(jax.jit, static_argnames=("batch_size",))
def data_metrics(metrics_fn: Partial, params: PyTree, data: dict, *, batch_size: int) -> dict:
    """Mean loss (and accuracy) over a whole data set, in inference mode."""
    return curvature.dataset_mean(lambda b: metrics_fn(params, b), data, batch_size=batch_size)


class Gradient(NamedTuple):
    loss: jax.Array  # (); mean loss over the analysis set.
    grad: PyTree  # g, like params.
    norm: jax.Array  # (); ||g||.


def gradient(loss_fn: Partial, params: PyTree, data: dict, *, batch_size: int) -> Gradient:
    """Full-data loss and gradient g (the paper measures g on the entire training set)."""
    loss, grad = curvature.dataset_value_and_grad(loss_fn, params, data, batch_size=batch_size)
    return Gradient(loss=loss, grad=grad, norm=jnp.linalg.norm(flatten_util.ravel_pytree(grad)[0]))


@jax.jit
def minibatch_gradients(loss_fn: Partial, params: PyTree, batches: dict) -> jax.Array:
    """Flat gradients ``(m, p)`` of ``m`` fixed mini-batches stacked along a leading axis."""
    def one(batch):
        return flatten_util.ravel_pytree(jax.grad(loss_fn)(params, batch))[0]

    return jax.lax.map(one, batches)


# --------------------------------------------------------------------------------------------
# Quantities of the top subspace.


def warm_start_vector(key: jax.Array, previous_basis: jax.Array | None, like: PyTree,
                      noise: float = 0.1) -> PyTree:
    """A Lanczos start vector: a random combination of the previous checkpoint's top
    eigenvectors plus a little noise (or a random vector when there is none)."""
    cold = krylov.random_start_vector(key, like)
    if previous_basis is None:
        return cold
    flat, unravel = flatten_util.ravel_pytree(like)
    basis = jnp.asarray(previous_basis, flat.dtype)
    coeffs = jax.random.normal(jax.random.fold_in(key, 1), (basis.shape[0],), flat.dtype)
    warm = coeffs @ basis
    cold_flat = flatten_util.ravel_pytree(cold)[0]
    warm = warm / jnp.linalg.norm(warm) + noise * cold_flat / jnp.linalg.norm(cold_flat)
    return unravel(warm)


@jax.jit
def subspace_fractions(g: jax.Array, eigenvectors: jax.Array, k: int | jax.Array) -> dict:
    """f_top over V[:k], f_next over V[k:2k] and all c_i² (eq. 2, 12) for a flat gradient."""
    c2 = metrics.eigenvector_overlaps(g, eigenvectors)
    idx = jnp.arange(eigenvectors.shape[0])
    return dict(f_top=jnp.sum(jnp.where(idx < k, c2, 0.0)),
                f_next=jnp.sum(jnp.where(idx >= k, c2, 0.0)), c2=c2)


def minibatch_f_top(minibatch_grads: jax.Array, eigenvectors: jax.Array, k: int) -> np.ndarray:
    """f_top of each mini-batch gradient (rows of ``minibatch_grads``) in V[:k]."""
    return np.asarray(jax.vmap(lambda g: metrics.gradient_fraction(g, eigenvectors[:k]))(
        minibatch_grads))


def layer_mass(vector: np.ndarray, slices: Sequence[tuple[str, int, int]]) -> dict[str, float]:
    """Squared norm of a unit vector per parameter leaf (paper Fig. 6-7: the top eigenvector's
    components by layer)."""
    vector = np.asarray(vector, np.float64)
    return {name: float(np.sum(vector[a:b] ** 2)) for name, a, b in slices}


def subspace_overlaps(basis: np.ndarray, reference: np.ndarray, k: int,
                      dims: Sequence[int]) -> dict:
    """eq. 5 between the top-d subspaces of two checkpoints for each d in ``dims``, and between
    their "next k" subspaces (eigenvectors k+1 … 2k)."""
    basis, reference = np.asarray(basis, np.float64), np.asarray(reference, np.float64)
    # One product for every d: Tr(P_a P_b) = ||A B^T||_F^2 on leading blocks (orthonormal rows).
    cross = (basis @ reference.T) ** 2
    out = {f"top{d}": float(cross[:d, :d].sum() / d)
           for d in dims if d <= min(basis.shape[0], reference.shape[0])}
    if basis.shape[0] >= 2 * k and reference.shape[0] >= 2 * k:
        out["next"] = float(cross[k:2 * k, k:2 * k].sum() / k)
    return out


# --------------------------------------------------------------------------------------------
# Error bars (metrics.subspace_error_bounds; assumption: Lanczos missed none of the top pairs).

# Bases are stored in float32 (rounding unit u): each stored row moves by at most u in norm
# relative, which moves eq. 5 by at most about 4u; this allowance covers it.
BASIS_ROUNDING = 5 * 2.0**-24


@jax.jit
def error_bounds(residuals: jax.Array, eigenvalues: jax.Array) -> metrics.SubspaceErrorBound:
    """:func:`metrics.subspace_error_bounds` of m Ritz pairs: entry d-1 bounds the top-d
    subspace (d = 1 .. m-1). Compiled once per m."""
    return metrics.subspace_error_bounds(residuals, eigenvalues)


def fraction_bounds(bounds: metrics.SubspaceErrorBound, k: int) -> dict:
    """Error bars on f_top (top k) and f_next (pairs k+1 .. 2k, ``P_2k - P_k``) from
    :func:`error_bounds` of m pairs; None where m is too small (k + 1 and 2k + 1 pairs)."""
    spectral = np.asarray(bounds.spectral, np.float64)
    m = spectral.shape[0] + 1
    return dict(f_top_bound=float(spectral[k - 1]) if m > k else None,
                f_next_bound=float(spectral[2 * k - 1] + spectral[k - 1]) if m > 2 * k else None)


def subspace_overlap_bounds(bounds: metrics.SubspaceErrorBound,
                            reference: metrics.SubspaceErrorBound, k: int,
                            dims: Sequence[int]) -> dict:
    """Error bars for :func:`subspace_overlaps`: ``top{d}_bound`` (:func:`metrics.
    subspace_overlap_bound`) for each d with d + 1 Ritz pairs at both steps, and ``next_bound``
    (``P_next = P_2k - P_k``, so the sine sums of both blocks add up) with 2k + 1 pairs; plus
    :data:`BASIS_ROUNDING` for the float32 storage of the bases."""
    a = np.asarray(bounds.sine_sum, np.float64)
    b = np.asarray(reference.sine_sum, np.float64)
    m = min(a.shape[0], b.shape[0]) + 1
    out = {f"top{d}_bound": float((a[d - 1] + b[d - 1]) / d + BASIS_ROUNDING)
           for d in dims if d < m}
    if m > 2 * k:
        out["next_bound"] = float((a[k - 1] + a[2 * k - 1] + b[k - 1] + b[2 * k - 1]) / k
                                  + BASIS_ROUNDING)
    return out


def dense_spectrum(operator) -> np.ndarray:
    """All eigenvalues of a curvature operator (the full-data Hessian, its GGN or a block):
    p products (``lax.map``) then a float64 ``eigh``.

    Small models only (p² memory, p³ time); the paper's Fig. 4 uses a 32-32 FC net.
    Returns ascending eigenvalues, float64.
    """
    h = np.asarray(jax.jit(curvature.dense_matrix)(operator, operator.like), np.float64)
    return np.linalg.eigvalsh(0.5 * (h + h.T))
