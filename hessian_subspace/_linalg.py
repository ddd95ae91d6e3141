"""Private linear-algebra primitives shared by the Krylov solvers (:mod:`krylov`,
:mod:`tracking`): Gram-Schmidt, Rayleigh-Ritz on padded projections, residual tests.

Pure jax.numpy; no validation of user input beyond what the solvers delegate here.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hessian_subspace import _tree

PyTree = Any

HIGHEST = jax.lax.Precision.HIGHEST
WHICH = ("LA", "SA", "LM")
DEFAULT_BREAKDOWN_FACTOR = 100.0


def constrain(x, sharding):
    """``with_sharding_constraint(x, sharding)``, or ``x`` when there is no sharding."""
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def vector_sharding(matvec, sharding):
    """The sharding of flat vectors: the one given, else the operator's own (None: none)."""
    if sharding is not None:
        if not isinstance(sharding, jax.sharding.NamedSharding) or len(sharding.spec) != 1:
            raise ValueError("`sharding` must be a NamedSharding of 1-D (flat) vectors, e.g. "
                             "hessian_subspace.sharding.vector_sharding(mesh)")
        return sharding
    return getattr(matvec, "vector_sharding", None)


def check_start_vector(v0: PyTree) -> None:
    _tree.check_floating("v0", v0)
    if not _tree.is_concrete(v0):
        return
    _tree.check_finite("v0", v0)
    if all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(v0)):
        raise ValueError("`v0` is the zero vector; Lanczos needs a nonzero start vector.")


def start_as_tree(v0: PyTree, matvec) -> PyTree:
    """A flat ``(p,)`` start vector as a pytree shaped like the operator's vectors, when the
    operator declares them (``matvec.like``) and they are a pytree; anything else unchanged
    (a mismatch is then named by :func:`check_start_like_operator`)."""
    like = getattr(matvec, "like", None)
    if like is None or not isinstance(v0, (jax.Array, np.ndarray)) or np.ndim(v0) != 1:
        return v0
    leaves, treedef = jax.tree_util.tree_flatten(like)
    shapes = [tuple(np.shape(x)) for x in leaves]
    if shapes == [tuple(np.shape(v0))]:
        return treedef.unflatten([v0])
    sizes = [math.prod(s) for s in shapes]
    if int(np.shape(v0)[0]) != sum(sizes):
        return v0
    parts = jnp.split(jnp.asarray(v0), np.cumsum(sizes)[:-1].tolist())
    return treedef.unflatten([p.reshape(s).astype(x.dtype)
                              for p, s, x in zip(parts, shapes, leaves, strict=True)])


def check_start_like_operator(v0: PyTree, matvec) -> None:
    """``v0`` has the structure and shapes of the operator's vectors when it declares them
    (``matvec.like``: the data-set operators and their wrappers), or a ValueError naming it."""
    like = getattr(matvec, "like", None)
    if like is None:
        return
    t_v, t_like = jax.tree_util.tree_structure(v0), jax.tree_util.tree_structure(like)
    shapes_v = [np.shape(x) for x in jax.tree_util.tree_leaves(v0)]
    shapes_like = [np.shape(x) for x in jax.tree_util.tree_leaves(like)]
    if t_v != t_like or shapes_v != shapes_like:
        raise ValueError(
            f"`v0` must be shaped like the operator's vectors (`matvec.like`, e.g. the "
            f"parameters): got {t_v} with leaf shapes {shapes_v[:4]}"
            f"{'...' if len(shapes_v) > 4 else ''}, expected {t_like} with "
            f"{shapes_like[:4]}{'...' if len(shapes_like) > 4 else ''}; build it with "
            f"`hs.random_start_vector(key, op.like)`.")


def check_operator_output(matvec, v0: PyTree) -> None:
    """A plain function's output has ``v0``'s structure, shapes and a floating dtype, checked on
    shapes only (``jax.eval_shape``), or a ValueError naming ``matvec``. The data-set operators
    (they declare ``like``) are built to, and are not traced again here."""
    if getattr(matvec, "like", None) is not None:
        return
    try:
        out = jax.eval_shape(matvec, v0)
    except Exception as e:  # a user's function: any error type
        raise ValueError(f"`matvec` fails on a vector shaped like `v0`: {type(e).__name__}: "
                         f"{e}") from e
    shapes = lambda t: [(np.shape(x)) for x in jax.tree_util.tree_leaves(t)]  # noqa: E731
    t_out, t_in = jax.tree_util.tree_structure(out), jax.tree_util.tree_structure(v0)
    if t_out != t_in or shapes(out) != shapes(v0):
        raise ValueError(f"`matvec` must return a vector shaped like its input: for {t_in} with "
                         f"leaf shapes {shapes(v0)[:4]} it returned {t_out} with "
                         f"{shapes(out)[:4]}.")
    for x in jax.tree_util.tree_leaves(out):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"`matvec` must return floating-point vectors, got {x.dtype}.")


def orthogonalize(w, basis, passes):
    """w minus its projection on the rows of `basis`, `passes` classical Gram-Schmidt passes."""
    for _ in range(passes):
        w = w - jnp.dot(jnp.dot(basis, w, precision=HIGHEST), basis, precision=HIGHEST)
    return w


def select(theta, valid, k, which):
    """Indices of the k wanted Ritz values among the valid ones."""
    key = {"LA": theta, "SA": -theta, "LM": jnp.abs(theta)}[which]
    key = jnp.where(valid, key, -jnp.inf)
    return jnp.argsort(-key, stable=True)[:k]


def relative_residuals(residuals, theta, norm_estimate, eps):
    """r / max(|theta|, sqrt(eps) ||H||): relative to the eigenvalue, floored for near-zero ones."""
    scale = jnp.maximum(jnp.abs(theta), jnp.sqrt(eps) * norm_estimate)
    return jnp.where(scale > 0, residuals / jnp.where(scale > 0, scale, 1.0), residuals)


def breakdown_eps(like_flat, dtype):
    """Rounding unit of the matvec: the coarser of the operator's and the recurrence's dtype."""
    return max(float(jnp.finfo(like_flat.dtype).eps), float(jnp.finfo(dtype).eps))


def default_tol(dtype) -> float:
    """Default relative-residual tolerance: ``10 * sqrt(eps)`` of the operator's dtype
    (3.5e-3 for float32, 1.5e-7 for float64)."""
    return float(10 * np.sqrt(jnp.finfo(dtype).eps))


def block_orthonormalize(w, basis, key, threshold):
    """Orthonormal rows spanning the rows of w (b, p), which are already orthogonal to `basis`.

    Householder QR; if the block is rank deficient (|R_cc| <= threshold: an invariant subspace
    was found), the missing directions are replaced by random vectors orthogonalised against
    `basis`. Returns (Q (b, p), replaced (), R (b, b)) with w = R^T Q up to the dropped parts.
    """
    q, r = jnp.linalg.qr(w.T)
    deficient = jnp.abs(jnp.diag(r)) <= threshold

    def replace(q):
        rows = jnp.where(deficient[:, None], jax.random.normal(key, w.shape, w.dtype), q.T)
        rows = jax.vmap(lambda x: orthogonalize(x, basis, 2))(rows)
        return jnp.linalg.qr(rows.T)[0]

    q = jax.lax.cond(jnp.any(deficient), replace, lambda q: q, q).T
    return q, jnp.any(deficient), jnp.dot(q, w.T, precision=HIGHEST)


def symmetric_projection(projected, block_size):
    """T from the upper block triangle: T = U + U^T - D, with D the symmetrised block diagonal."""
    n = projected.shape[0]
    blk = jnp.arange(n) // block_size
    upper = jnp.where(blk[:, None] < blk[None, :], projected, 0.0)
    diag = jnp.where(blk[:, None] == blk[None, :], projected, 0.0)
    return upper + upper.T + 0.5 * (diag + diag.T)


def ritz(t, num_valid):
    """Eigen-decomposition of a projected matrix whose rows >= num_valid are padding.

    The padded block is decoupled and its diagonal pushed above the spectrum, so it never yields
    (fake zero) Ritz values; returns (theta (n,), S (n, n), valid (n,)).
    """
    n = t.shape[0]
    valid_rows = jnp.arange(n) < num_valid
    mask = valid_rows[:, None] & valid_rows[None, :]
    t = jnp.where(mask, t, 0.0)
    bound = jnp.max(jnp.sum(jnp.abs(t), axis=1))
    t = t + jnp.diag(jnp.where(valid_rows, 0.0, 2 * bound + 1))
    theta, s = jnp.linalg.eigh(t)
    pad_weight = jnp.sum(jnp.where(valid_rows[:, None], 0.0, s**2), axis=0)
    return theta, s, pad_weight < 0.5


def resolve_tol(tol: float | None, like: PyTree) -> float:
    """The residual tolerance: ``default_tol`` of the vectors' dtype unless given; must be > 0."""
    if tol is None:
        return default_tol(jnp.result_type(*jax.tree_util.tree_leaves(like)))
    tol = float(tol)
    if not tol > 0:
        raise ValueError(f"`tol` must be > 0, got {tol}.")
    return tol
