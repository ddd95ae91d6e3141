"""What the random estimators (:mod:`hessian_subspace.spectrum`, :mod:`hessian_subspace.xtrace`)
share: the vectors' template, the probes, deflation by known eigenpairs (checked, applied and
its exact part), and the refusal of a non-finite estimate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import flatten_util

from hessian_subspace import _tree, krylov

_HIGHEST = jax.lax.Precision.HIGHEST


def deflation(deflate, like) -> tuple[jax.Array, jax.Array] | None:
    """``deflate`` as (values (k,), vectors (k, p)) in the vectors' dtype, or a ValueError
    naming it (before any tracing)."""
    if deflate is None:
        return None
    if isinstance(deflate, krylov.Eigenpairs):
        values, vectors = deflate.eigenvalues, deflate.eigenvectors
    elif isinstance(deflate, (tuple, list)) and len(deflate) == 2:
        values, vectors = deflate
    else:
        raise ValueError("`deflate` must be an Eigenpairs (top_eigenpairs' output) or a pair "
                         f"(eigenvalues (k,), eigenvectors (k, p)), got {type(deflate).__name__}")
    like_flat, _ = flatten_util.ravel_pytree(like)
    p = like_flat.shape[0]
    values, vectors = jnp.asarray(values), jnp.asarray(vectors)
    if values.ndim != 1 or vectors.ndim != 2 or vectors.shape != (values.shape[0], p):
        raise ValueError(f"`deflate` must hold eigenvalues (k,) and eigenvectors (k, {p}) in "
                         f"ravel_pytree order, got {values.shape} and {vectors.shape}")
    if not 1 <= values.shape[0] < p:
        raise ValueError(f"`deflate` must hold 1 <= k < {p} pairs, got {values.shape[0]}")
    if _tree.is_concrete(values) and _tree.is_concrete(vectors) and not (
            np.all(np.isfinite(np.asarray(values))) and np.all(np.isfinite(np.asarray(vectors)))):
        raise ValueError("`deflate` holds non-finite eigenpairs (a failed eigensolve?)")
    return values.astype(like_flat.dtype), vectors.astype(like_flat.dtype)


def template(matvec, like):
    if like is None:
        like = getattr(matvec, "like", None)
    if like is None:
        raise ValueError(
            "`like` is required: a pytree or flat array shaped like the vectors `matvec` acts on "
            "(operators from `dataset_hvp` provide it themselves)."
        )
    _tree.check_floating("like", like)
    return like


def probe(key, like_flat, kind):
    if kind == "rademacher":
        return jax.random.rademacher(key, like_flat.shape, like_flat.dtype)
    return jax.random.normal(key, like_flat.shape, like_flat.dtype)


def deflated_product(mv, deflation, z):
    """(H - Vᵀ Λ V) z (H z without deflation)."""
    hz = mv(z)
    if deflation is None:
        return hz
    values, vectors = deflation
    coeffs = jnp.dot(vectors, z, precision=_HIGHEST)
    return hz - jnp.dot(values * coeffs, vectors, precision=_HIGHEST)


def exact_part(deflation, like_flat):
    """Trace and diagonal of Vᵀ Λ V (zero without deflation)."""
    if deflation is None:
        return jnp.zeros((), like_flat.dtype), jnp.zeros_like(like_flat)
    values, vectors = deflation
    diag = jnp.sum(values[:, None] * vectors**2, axis=0)
    return jnp.sum(diag), diag


def finite(estimate):
    """The estimate, or a FloatingPointError when a product was non-finite (outside jit; a
    traced call returns the NaN)."""
    if _tree.is_concrete(estimate) and not all(
            np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(estimate)):
        raise FloatingPointError("`matvec` returned a non-finite value for a random probe; "
                                 "check the parameters and the loss (the estimate is NaN)")
    return estimate
