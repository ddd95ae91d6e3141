r"""Lanczos tridiagonalisation and top-k eigenpairs of a symmetric operator, under ``jax.jit``.

The operator is any function ``matvec(v) -> H v`` on pytrees (e.g. :func:`dataset_hvp`) or on
flat arrays. Vectors are flattened once (``ravel_pytree`` order) and the Krylov basis is kept
as a preallocated ``(num_steps, p)`` array, so full reorthogonalisation is two matrix-vector
products per Gram-Schmidt pass. The loop is a ``lax.while_loop``: compile time does not grow
with ``num_steps``, and the whole solve is vmappable over start vectors.

Conventions (Lanczos 1950; Golub & Van Loan, *Matrix Computations*, §10.1):
after :math:`m` steps with orthonormal rows :math:`Q \in \mathbb{R}^{m\times p}`,

.. math:: H Q^\top = Q^\top T_m + f\, e_m^\top,\qquad
          T_m = \mathrm{tridiag}(\beta_{1:m-1}, \alpha_{1:m}, \beta_{1:m-1}),

and ``betas[m-1]`` :math:`=\|f\|`. A *breakdown* (:math:`\beta_i \le c\,\varepsilon\,\|H\|`)
means the Krylov space is invariant: :func:`lanczos` stops there (the unused rows are padding),
:func:`top_eigenpairs` continues from a fresh random vector orthogonal to the basis (with
:math:`\beta_i = 0`, so :math:`T` becomes block diagonal), which is what finds repeated
eigenvalues in exactly low-rank operators. Padding never yields Ritz values: it is
decoupled from :math:`T_m` and masked out.

References:
  C. Lanczos, "An iteration method for the solution of the eigenvalue problem of linear
  differential and integral operators", J. Res. Nat. Bur. Standards 45 (1950).
  G. Golub, C. Van Loan, *Matrix Computations*, 4th ed., §10.1 (full reorthogonalisation).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import flatten_util

from hessian_subspace import _tree

PyTree = Any
Matvec = Callable[[PyTree], PyTree]

_HIGHEST = jax.lax.Precision.HIGHEST
_WHICH = ("LA", "SA", "LM")
DEFAULT_BREAKDOWN_FACTOR = 100.0


class LanczosResult(NamedTuple):
    """Output of :func:`lanczos`. Rows/entries at index >= ``num_valid`` are zero padding."""

    basis: jax.Array  # (num_steps, p); rows < num_valid are orthonormal Lanczos vectors.
    alphas: jax.Array  # (num_steps,); diagonal of T.
    betas: jax.Array  # (num_steps,); betas[i] couples rows i, i+1; betas[num_valid-1] = ||f||.
    num_valid: jax.Array  # () int32; steps taken (= rows of `basis` in use = matvecs used).
    residual: jax.Array  # (p,); f with H Q^T = Q^T T + f e_m^T (zero after a breakdown stop).


class Eigenpairs(NamedTuple):
    """Output of :func:`top_eigenpairs` (and of the trackers built on it)."""

    eigenvalues: jax.Array  # (k,); ordered as `which` asks (LA: descending).
    eigenvectors: jax.Array  # (k, p); orthonormal rows, `ravel_pytree` order of the params.
    residuals: jax.Array  # (k,); ||H v - lambda v||, computed explicitly with k matvecs.
    converged: jax.Array  # (k,) bool; relative residual <= tol (see `top_eigenpairs`).
    num_matvecs: jax.Array  # () int32; matvecs used, the k residual matvecs included.


def random_start_vector(key: jax.Array, like: PyTree) -> PyTree:
    """A standard-normal pytree shaped like ``like`` (a start vector for Lanczos).

    Args:
      key: a JAX PRNG key.
      like: pytree of arrays (e.g. model parameters) or a flat array.

    Returns:
      A pytree with the structure, shapes and dtypes of ``like``.
    """
    flat, unravel = flatten_util.ravel_pytree(like)
    return unravel(jax.random.normal(key, flat.shape, flat.dtype))


def as_pytrees(vectors: jax.Array, like: PyTree) -> PyTree:
    """Rows of a ``(k, p)`` array (e.g. ``Eigenpairs.eigenvectors``) as a stacked pytree.

    Args:
      vectors: ``(k, p)`` array in ``ravel_pytree`` order of ``like``.
      like: the parameter pytree the vectors live in.

    Returns:
      A pytree like ``like`` whose leaves carry a leading axis of size k (cast to the leaves'
      dtypes), so ``tree_map(lambda x: x[i], out)`` is the i-th vector.
    """
    return _tree.unravel_rows(vectors, like)


# --------------------------------------------------------------------------------------------
# Validation (runs before any tracing).


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"`{name}` must be an int, got {value!r}.")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"`{name}` must be {bound}, got {value}.")
    return int(value)


def _check_start_vector(v0: PyTree) -> None:
    _tree.check_floating("v0", v0)
    if not _tree.is_concrete(v0):
        return
    _tree.check_finite("v0", v0)
    if all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(v0)):
        raise ValueError("`v0` is the zero vector; Lanczos needs a nonzero start vector.")


def _resolve_dtype(dtype, v0: PyTree):
    if dtype is None:
        return jnp.result_type(*jax.tree_util.tree_leaves(v0))
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"`dtype` must be a floating dtype, got {dtype}.")
    return dtype


def _x64_scope(dtype):
    """Scoped x64 for a float64 recurrence; never touches the global flag."""
    if jnp.dtype(dtype).itemsize == 8:
        return jax.enable_x64(True)
    return contextlib.nullcontext()


def _as_operator(matvec: Matvec):
    """Makes ``matvec`` a pytree: operators that are pytrees stay dynamic (no recompilation when
    their arrays change); plain functions become static, hashed by identity."""
    if not callable(matvec):
        raise ValueError(f"`matvec` must be callable, got {type(matvec).__name__}.")
    leaves, _ = jax.tree_util.tree_flatten(matvec)
    if len(leaves) == 1 and leaves[0] is matvec:
        return jax.tree_util.Partial(matvec)
    return matvec


# --------------------------------------------------------------------------------------------
# The recurrence, on flat vectors.


def _orthogonalize(w, basis, passes):
    """w minus its projection on the rows of `basis`, `passes` classical Gram-Schmidt passes."""
    for _ in range(passes):
        w = w - jnp.dot(jnp.dot(basis, w, precision=_HIGHEST), basis, precision=_HIGHEST)
    return w


def _select(theta, valid, k, which):
    """Indices of the k wanted Ritz values among the valid ones."""
    key = {"LA": theta, "SA": -theta, "LM": jnp.abs(theta)}[which]
    key = jnp.where(valid, key, -jnp.inf)
    return jnp.argsort(-key, stable=True)[:k]


def _relative_residuals(residuals, theta, norm_estimate, eps):
    """r / max(|theta|, sqrt(eps) ||H||): relative to the eigenvalue, floored for near-zero ones."""
    scale = jnp.maximum(jnp.abs(theta), jnp.sqrt(eps) * norm_estimate)
    return jnp.where(scale > 0, residuals / jnp.where(scale > 0, scale, 1.0), residuals)


class _State(NamedTuple):
    i: jax.Array
    basis: jax.Array
    alphas: jax.Array
    betas: jax.Array
    q: jax.Array
    q_prev: jax.Array
    beta_prev: jax.Array
    norm_est: jax.Array
    done: jax.Array
    nonfinite: jax.Array
    residual: jax.Array


def _recurrence(mv, v0, *, num_steps, reorth, eps, breakdown_factor):
    """The three-term recurrence with `reorth` full Gram-Schmidt passes; stops at breakdown."""
    p = v0.shape[0]
    dtype = v0.dtype
    q0 = v0 / jnp.linalg.norm(v0)
    zero = jnp.zeros((), dtype)
    init = _State(
        i=jnp.zeros((), jnp.int32),
        basis=jnp.zeros((num_steps, p), dtype),
        alphas=jnp.zeros((num_steps,), dtype),
        betas=jnp.zeros((num_steps,), dtype),
        q=q0,
        q_prev=jnp.zeros_like(q0),
        beta_prev=zero,
        norm_est=zero,
        done=jnp.zeros((), bool),
        nonfinite=~jnp.all(jnp.isfinite(q0)),
        residual=jnp.zeros_like(q0),
    )

    def cond(s: _State):
        return (s.i < num_steps) & ~s.done & ~s.nonfinite

    def body(s: _State):
        i = s.i
        basis = s.basis.at[i].set(s.q)
        w = mv(s.q)
        nonfinite = ~jnp.all(jnp.isfinite(w))
        w = jnp.where(nonfinite, 0.0, w)
        alpha = jnp.dot(s.q, w, precision=_HIGHEST)
        w = w - alpha * s.q - s.beta_prev * s.q_prev
        w = _orthogonalize(w, basis, reorth)
        beta = jnp.linalg.norm(w)
        norm_est = jnp.maximum(s.norm_est, jnp.abs(alpha) + beta + s.beta_prev)
        broke = beta <= breakdown_factor * eps * norm_est
        return _State(
            i=i + 1, basis=basis, alphas=s.alphas.at[i].set(alpha), betas=s.betas.at[i].set(beta),
            q=jnp.where(broke, 0.0, w / jnp.where(broke, 1.0, beta)), q_prev=s.q,
            beta_prev=beta, norm_est=norm_est, done=broke,
            nonfinite=s.nonfinite | nonfinite, residual=w,
        )

    return jax.lax.while_loop(cond, body, init)


def _breakdown_eps(like_flat, dtype):
    """Rounding unit of the matvec: the coarser of the operator's and the recurrence's dtype."""
    return max(float(jnp.finfo(like_flat.dtype).eps), float(jnp.finfo(dtype).eps))


@functools.partial(jax.jit, static_argnames=("num_steps", "reorth", "dtype", "breakdown_factor"))
def _lanczos_jit(matvec, v0, *, num_steps, reorth, dtype, breakdown_factor):
    mv, like_flat = _tree.flat_matvec(matvec, v0, dtype)
    eps = _breakdown_eps(like_flat, dtype)
    s = _recurrence(mv, like_flat.astype(dtype), num_steps=num_steps, reorth=reorth, eps=eps,
                    breakdown_factor=breakdown_factor)
    valid = jnp.arange(num_steps) < s.i
    nan = jnp.asarray(jnp.nan, dtype)
    poison = lambda x: jnp.where(s.nonfinite, nan, x)  # noqa: E731
    return LanczosResult(
        basis=poison(s.basis), alphas=poison(jnp.where(valid, s.alphas, 0.0)),
        betas=poison(jnp.where(valid, s.betas, 0.0)), num_valid=s.i,
        residual=poison(jnp.where(s.done, 0.0, s.residual)),
    )


def lanczos(matvec: Matvec, v0: PyTree, num_steps: int, *, reorthogonalize: int = 2,
            dtype=None, breakdown_factor: float = DEFAULT_BREAKDOWN_FACTOR) -> LanczosResult:
    r"""Lanczos tridiagonalisation of a symmetric operator from the start vector ``v0``.

    One compiled ``lax.while_loop``; ``jax.vmap``-able over ``v0``. Each step costs one
    ``matvec`` plus ``2 * reorthogonalize`` products with the basis. On breakdown
    (:math:`\beta_i \le c\,\varepsilon\,\|H\|_{est}`: the Krylov space is invariant) the loop
    stops; ``num_valid`` says how many rows are real, the rest is zero padding.

    Args:
      matvec: ``v -> H v`` for symmetric H, on pytrees like ``v0`` (or flat arrays). A pytree
        operator such as :func:`dataset_hvp`'s is traced with its arrays as inputs, so new
        parameter values reuse the compiled program.
      v0: start vector, a pytree or a flat array (normalised inside). Nonzero and finite.
      num_steps: Krylov dimension m, ``1 <= m <= p``. Static: it sets array shapes.
      reorthogonalize: Gram-Schmidt passes against the whole basis at every step (full
        reorthogonalisation; "twice is enough" by default). 0 gives the plain three-term
        recurrence, which loses orthogonality and produces ghost eigenvalues.
      dtype: dtype of the recurrence and the basis (default: that of ``v0``). ``float64`` runs
        under a scoped ``jax.enable_x64`` while ``matvec`` still receives vectors in ``v0``'s
        dtype, so a float32 HVP feeds a float64 Lanczos.
      breakdown_factor: c in the breakdown test, with ε the rounding unit of the coarser of the
        operator's and the recurrence's dtypes.

    Returns:
      A :class:`LanczosResult`. If ``matvec`` returns a non-finite value the loop stops and
      every array field is NaN (no silent NaN hidden in Ritz values).

    Example:
      >>> import jax.numpy as jnp
      >>> import hessian_subspace as hs
      >>> a = jnp.diag(jnp.arange(1.0, 6.0))
      >>> res = hs.lanczos(lambda v: a @ v, jnp.ones(5), 5)
      >>> theta, valid = hs.ritz_values(res)
      >>> theta.round(4)
      Array([1., 2., 3., 4., 5.], dtype=float32)
    """
    matvec = _as_operator(matvec)
    _check_start_vector(v0)
    dim = _tree.tree_size(v0)
    num_steps = _check_int("num_steps", num_steps, 1, dim)
    reorthogonalize = _check_int("reorthogonalize", reorthogonalize, 0, 4)
    dtype = _resolve_dtype(dtype, v0)
    with _x64_scope(dtype):
        return _lanczos_jit(matvec, v0, num_steps=num_steps, reorth=reorthogonalize,
                            dtype=jnp.dtype(dtype), breakdown_factor=float(breakdown_factor))


def ritz_values(result: LanczosResult) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues of T from a :class:`LanczosResult`, padding masked.

    Returns:
      ``(theta, valid)``: ``(num_steps,)`` ascending Ritz values (entries with ``valid`` False
      come from padding and carry no information) and the ``(num_steps,)`` bool mask.
    """
    theta, _, valid = _ritz(tridiagonal_matrix(result), result.num_valid)
    return theta, valid


def tridiagonal_matrix(result: LanczosResult) -> jax.Array:
    """The ``(num_steps, num_steps)`` matrix T of a :class:`LanczosResult` (padding: zeros)."""
    return _tridiag(result.alphas, result.betas, result.num_valid)


def _tridiag(alphas, betas, num_valid):
    n = alphas.shape[-1]
    off = jnp.where(jnp.arange(n - 1) < num_valid - 1, betas[:-1], 0.0)
    return jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)


# --------------------------------------------------------------------------------------------
# Top-k eigenpairs: block Krylov with full reorthogonalisation and Rayleigh-Ritz.


def default_num_steps(k: int, dim: int, block_size: int = 1) -> int:
    """Default Krylov dimension (matvecs) for ``k`` eigenpairs:
    ``min(dim, max(6k, k + 40))``, rounded down to a multiple of ``block_size``."""
    steps = min(dim, max(6 * k, k + 40))
    return max(block_size, steps - steps % block_size)


def default_tol(dtype) -> float:
    """Default relative-residual tolerance: ``10 * sqrt(eps)`` of the operator's dtype
    (3.5e-3 for float32, 1.5e-7 for float64)."""
    return float(10 * np.sqrt(jnp.finfo(dtype).eps))


class _BlockState(NamedTuple):
    j: jax.Array  # () int32; blocks in the basis.
    basis: jax.Array  # (num_blocks * b, p).
    projected: jax.Array  # (n, n); column block j holds basis @ H Q_j^T (upper block triangle).
    block: jax.Array  # (b, p); the next block Q_j.
    coupling: jax.Array  # (b, b); R with (residual block) = R^T Q_j, for Ritz estimates.
    replaced: jax.Array  # () bool; the last block was rank deficient and refilled at random.
    norm_est: jax.Array  # (); max ||H q|| seen, a lower bound on ||H||.
    done: jax.Array
    nonfinite: jax.Array


def _block_orthonormalize(w, basis, key, threshold):
    """Orthonormal rows spanning the rows of w (b, p), which are already orthogonal to `basis`.

    Householder QR; if the block is rank deficient (|R_cc| <= threshold: an invariant subspace
    was found), the missing directions are replaced by random vectors orthogonalised against
    `basis`. Returns (Q (b, p), replaced (), R (b, b)) with w = R^T Q up to the dropped parts.
    """
    q, r = jnp.linalg.qr(w.T)
    deficient = jnp.abs(jnp.diag(r)) <= threshold

    def replace(q):
        rows = jnp.where(deficient[:, None], jax.random.normal(key, w.shape, w.dtype), q.T)
        rows = jax.vmap(lambda x: _orthogonalize(x, basis, 2))(rows)
        return jnp.linalg.qr(rows.T)[0]

    q = jax.lax.cond(jnp.any(deficient), replace, lambda q: q, q).T
    return q, jnp.any(deficient), jnp.dot(q, w.T, precision=_HIGHEST)


def _symmetric_projection(projected, block_size):
    """T from the upper block triangle: T = U + U^T - D, with D the symmetrised block diagonal."""
    n = projected.shape[0]
    blk = jnp.arange(n) // block_size
    upper = jnp.where(blk[:, None] < blk[None, :], projected, 0.0)
    diag = jnp.where(blk[:, None] == blk[None, :], projected, 0.0)
    return upper + upper.T + 0.5 * (diag + diag.T)


def _ritz(t, num_valid):
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


@functools.partial(
    jax.jit,
    static_argnames=("k", "num_blocks", "block_size", "which", "tol", "reorth", "dtype",
                     "check_every", "breakdown_factor"),
)
def _top_jit(matvec, v0, key, *, k, num_blocks, block_size, which, tol, reorth, dtype,
             check_every, breakdown_factor):
    mv, like_flat = _tree.flat_matvec(matvec, v0, dtype)
    block_mv = jax.vmap(mv)
    eps = _breakdown_eps(like_flat, dtype)
    b, p = block_size, like_flat.shape[0]
    n = num_blocks * b
    blk = jnp.arange(n) // b

    start = jnp.concatenate(
        [like_flat.astype(dtype)[None], jax.random.normal(key, (b - 1, p), dtype)], axis=0)
    start = start / jnp.linalg.norm(start, axis=1, keepdims=True)
    first = jnp.linalg.qr(start.T)[0].T

    def ritz_estimates(s):
        t = _symmetric_projection(s.projected, b)
        theta, vecs, valid = _ritz(t, s.j * b)
        sel = _select(theta, valid, k, which)
        last_rows = jax.lax.dynamic_slice_in_dim(vecs[:, sel], (s.j - 1) * b, b, axis=0)
        est = jnp.linalg.norm(jnp.dot(s.coupling, last_rows, precision=_HIGHEST), axis=0)
        norm = jnp.max(jnp.where(valid, jnp.abs(theta), 0.0))
        return _relative_residuals(est, theta[sel], norm, eps)

    def cond(s):
        return (s.j < num_blocks) & ~s.done & ~s.nonfinite

    def body(s):
        j = s.j
        basis = jax.lax.dynamic_update_slice_in_dim(s.basis, s.block, j * b, axis=0)
        w = block_mv(s.block)  # (b, p): H Q_j, one batched matvec.
        nonfinite = ~jnp.all(jnp.isfinite(w))
        w = jnp.where(nonfinite, 0.0, w)
        norm_est = jnp.maximum(s.norm_est, jnp.max(jnp.linalg.norm(w, axis=1)))
        cross = jnp.dot(basis, w.T, precision=_HIGHEST)  # (n, b) = basis H Q_j^T.
        if reorth == 0:  # Plain block Lanczos: couple to the last two blocks only.
            cross = jnp.where(((blk == j) | (blk == j - 1))[:, None], cross, 0.0)
        projected = jax.lax.dynamic_update_slice_in_dim(s.projected, cross, j * b, axis=1)
        w = w - jnp.dot(cross.T, basis, precision=_HIGHEST)
        if reorth > 1:
            w = jax.vmap(lambda x: _orthogonalize(x, basis, reorth - 1))(w)
        threshold = breakdown_factor * eps * norm_est
        block, replaced, coupling = _block_orthonormalize(
            w, basis, jax.random.fold_in(key, j + 2), threshold)
        new = _BlockState(j=j + 1, basis=basis, projected=projected, block=block,
                          coupling=coupling, replaced=replaced, norm_est=norm_est,
                          done=j + 1 >= num_blocks, nonfinite=s.nonfinite | nonfinite)
        # Never stop right after a refill: an invariant block says nothing about eigenvalues
        # that the basis has not reached yet.
        due = ((j + 1) * b >= k) & ((j + 1) % check_every == 0) & ~replaced
        converged = jax.lax.cond(due, lambda s: jnp.all(ritz_estimates(s) <= tol),
                                 lambda s: jnp.zeros((), bool), new)
        return new._replace(done=new.done | converged)

    init = _BlockState(
        j=jnp.zeros((), jnp.int32), basis=jnp.zeros((n, p), dtype),
        projected=jnp.zeros((n, n), dtype), block=first, coupling=jnp.zeros((b, b), dtype),
        replaced=jnp.zeros((), bool),
        norm_est=jnp.zeros((), dtype), done=jnp.zeros((), bool),
        nonfinite=~jnp.all(jnp.isfinite(first)),
    )
    s = jax.lax.while_loop(cond, body, init)

    theta, vecs, valid = _ritz(_symmetric_projection(s.projected, b), s.j * b)
    sel = _select(theta, valid, k, which)
    eigenvalues = theta[sel]
    eigenvectors = jnp.dot(vecs[:, sel].T, s.basis, precision=_HIGHEST)
    h_vectors = block_mv(eigenvectors) if k == b else jax.vmap(mv)(eigenvectors)
    residuals = jnp.linalg.norm(h_vectors - eigenvalues[:, None] * eigenvectors, axis=1)
    norm = jnp.max(jnp.where(valid, jnp.abs(theta), 0.0))
    relative = _relative_residuals(residuals, eigenvalues, norm, eps)
    # Ghosts (copies of one eigenpair that a basis without reorthogonalisation produces) have
    # small residuals but are not orthogonal to their twin: they fail this test.
    gram = jnp.dot(eigenvectors, eigenvectors.T, precision=_HIGHEST)
    orthogonal = jnp.max(jnp.abs(gram - jnp.eye(k, dtype=dtype)), axis=1) <= tol
    converged = (relative <= tol) & orthogonal & ~s.nonfinite
    nan = jnp.asarray(jnp.nan, dtype)
    return Eigenpairs(
        eigenvalues=jnp.where(s.nonfinite, nan, eigenvalues),
        eigenvectors=jnp.where(s.nonfinite, nan, eigenvectors),
        residuals=jnp.where(s.nonfinite, nan, residuals),
        converged=converged,
        num_matvecs=s.j * b + k,
    )


def _resolve_tol(tol: float | None, like: PyTree) -> float:
    """The residual tolerance: ``default_tol`` of the vectors' dtype unless given; must be > 0."""
    if tol is None:
        return default_tol(jnp.result_type(*jax.tree_util.tree_leaves(like)))
    tol = float(tol)
    if not tol > 0:
        raise ValueError(f"`tol` must be > 0, got {tol}.")
    return tol


def top_eigenpairs(matvec: Matvec, v0: PyTree, k: int, *, num_steps: int | None = None,
                   which: str = "LA", tol: float | None = None, block_size: int = 1,
                   reorthogonalize: int = 2, dtype=None, key: jax.Array | None = None,
                   check_every: int | None = None,
                   breakdown_factor: float = DEFAULT_BREAKDOWN_FACTOR) -> Eigenpairs:
    r"""The k extreme eigenpairs of a symmetric operator: (block) Lanczos with full
    reorthogonalisation and Rayleigh-Ritz.

    Builds an orthonormal Krylov basis :math:`Q` from ``block_size`` start vectors (``v0`` and,
    for blocks, random ones from ``key``), records the projection :math:`T = Q H Q^\top`
    explicitly, and stops once the cheap Ritz residual estimates of the wanted pairs fall below
    ``tol / 2`` or ``num_steps`` matvecs are spent. If a block loses rank (an invariant
    subspace was found) the missing directions are replaced by random vectors orthogonal to the
    basis, so exactly low-rank operators (zero, identity, two-valued spectra) get all k pairs.
    A block of size :math:`b` finds eigenvalues of multiplicity up to :math:`b` at once; with
    :math:`b = 1` a cluster of equal eigenvalues is only resolved slowly, one copy per about
    twenty steps, as rounding errors seed it. Each block's matvecs run as one ``vmap``.

    Every returned pair is then checked **explicitly** with one batched matvec:
    ``residuals[j] = ||H v_j - λ_j v_j||``, and ``converged[j]`` is true when

    .. math:: \|H v_j - \lambda_j v_j\| \le \mathrm{tol}\cdot
              \max\bigl(|\lambda_j|,\ \sqrt{\varepsilon}\,\|H\|_{est}\bigr)
              \quad\text{and}\quad \max_{i\ne j}|v_i\cdot v_j| \le \mathrm{tol},

    a residual relative to the eigenvalue (floored for eigenvalues near zero; ε: rounding unit
    of the operator's dtype, :math:`\|H\|_{est}`: largest |Ritz value|) and orthogonality to
    the other returned vectors (which catches ghost copies).

    Args:
      matvec: ``v -> H v`` for symmetric H, on pytrees like ``v0`` or flat arrays.
      v0: start vector (pytree like the params, or flat); see :func:`random_start_vector`.
      k: number of eigenpairs, ``1 <= k < p``.
      num_steps: maximum Krylov dimension (= matvecs before the k residual checks),
        ``max(k, block_size) <= num_steps <= p``, rounded down to a multiple of
        ``block_size``; default :func:`default_num_steps`. The basis holds
        ``num_steps * p`` numbers.
      which: "LA" largest algebraic (the paper's top-k), "SA" smallest algebraic,
        "LM" largest magnitude.
      tol: relative residual tolerance (default :func:`default_tol` of the operator's dtype).
      block_size: start vectors per block, ``1 <= block_size <= num_steps``.
      reorthogonalize: Gram-Schmidt passes against the whole basis per step (default 2). 0 is
        plain (block) Lanczos, kept as a negative control: it yields ghost copies.
      dtype: dtype of the recurrence (e.g. ``jnp.float64`` over a float32 HVP, run under a
        scoped ``jax.enable_x64``).
      key: PRNG key for the extra start vectors and for replacements (default: fixed).
      check_every: blocks between convergence checks (each is an eigh of the
        ``num_steps``-square T); default ``max(1, num_blocks // 32)``.
      breakdown_factor: c in the rank test :math:`\|w\| \le c\,\varepsilon\,\|H\|_{est}`.

    Returns:
      :class:`Eigenpairs` with ``eigenvalues`` (k,), ``eigenvectors`` (k, p) in
      ``ravel_pytree`` order (:func:`as_pytrees` gives pytrees), ``residuals``, ``converged``
      and ``num_matvecs``. A non-finite matvec output gives NaN eigenpairs and
      ``converged=False``; called outside ``jit`` this raises ``FloatingPointError`` instead.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import hessian_subspace as hs
      >>> a = jnp.diag(jnp.arange(10.0))
      >>> v0 = hs.random_start_vector(jax.random.key(0), jnp.zeros(10))
      >>> res = hs.top_eigenpairs(lambda v: a @ v, v0, 3, num_steps=10)
      >>> res.eigenvalues.round(4), bool(res.converged.all())
      (Array([9., 8., 7.], dtype=float32), True)

    References:
      Lanczos (1950); Golub & Underwood, "The block Lanczos method for computing eigenvalues"
      (1977); Gur-Ari, Roberts, Dyer (2018), App. A.
    """
    matvec = _as_operator(matvec)
    _check_start_vector(v0)
    dim = _tree.tree_size(v0)
    if dim < 2:
        raise ValueError(f"the operator must have dimension >= 2, got {dim}.")
    k = _check_int("k", k, 1, dim - 1)
    block_size = _check_int("block_size", block_size, 1, dim)
    if num_steps is None:
        num_steps = default_num_steps(k, dim, block_size)
    num_steps = _check_int("num_steps", num_steps, max(k, block_size), dim)
    num_blocks = num_steps // block_size
    if num_blocks * block_size < k:
        raise ValueError(f"`num_steps` rounded down to a multiple of block_size={block_size} "
                         f"is {num_blocks * block_size} < k={k}.")
    if which not in _WHICH:
        raise ValueError(f"`which` must be one of {_WHICH}, got {which!r}.")
    reorthogonalize = _check_int("reorthogonalize", reorthogonalize, 0, 4)
    if check_every is None:
        check_every = max(1, num_blocks // 32)
    check_every = _check_int("check_every", check_every, 1)
    dtype = _resolve_dtype(dtype, v0)
    tol = _resolve_tol(tol, v0)
    with _x64_scope(dtype):
        key = jax.random.key(1) if key is None else key
        out = _top_jit(matvec, v0, key, k=k, num_blocks=num_blocks, block_size=block_size,
                       which=which, tol=tol, reorth=reorthogonalize, dtype=jnp.dtype(dtype),
                       check_every=check_every, breakdown_factor=float(breakdown_factor))
    if _tree.is_concrete(out) and not np.all(np.isfinite(np.asarray(out.eigenvalues))):
        raise FloatingPointError(
            "`matvec` returned a non-finite value during Lanczos; check the parameters and the "
            "loss (the eigenpairs would be NaN)."
        )
    return out


# --------------------------------------------------------------------------------------------
# Tracking the top subspace across training: block Krylov seeded with the previous basis.


class _TrackState(NamedTuple):
    j: jax.Array  # () int32; blocks in the basis.
    basis: jax.Array  # (n, p) orthonormal rows, block j at rows [j b, (j+1) b).
    products: jax.Array  # (n, p): H applied to each basis row (the matvec outputs, kept).
    projected: jax.Array  # (n, n) upper block triangle of basis H basis^T.
    block: jax.Array  # (b, p) next block.
    norm_est: jax.Array
    converged: jax.Array
    nonfinite: jax.Array


@functools.partial(jax.jit, static_argnames=("k", "max_blocks", "which", "tol", "dtype",
                                             "breakdown_factor"))
def _track_jit(matvec, start, like, key, *, k, max_blocks, which, tol, dtype, breakdown_factor):
    mv, like_flat = _tree.flat_matvec(matvec, like, dtype)
    block_mv = jax.vmap(mv)
    eps = _breakdown_eps(like_flat, dtype)
    b, p = start.shape
    n = max_blocks * b

    def ritz(projected, products, basis, num_valid):
        theta, vecs, valid = _ritz(_symmetric_projection(projected, b), num_valid)
        sel = _select(theta, valid, k, which)
        coeffs = vecs[:, sel].T  # (k, n)
        vectors = jnp.dot(coeffs, basis, precision=_HIGHEST)
        # Explicit residuals from the stored matvec outputs: H v = sum_i s_i (H q_i).
        h_vectors = jnp.dot(coeffs, products, precision=_HIGHEST)
        residuals = jnp.linalg.norm(h_vectors - theta[sel][:, None] * vectors, axis=1)
        norm = jnp.max(jnp.where(valid, jnp.abs(theta), 0.0))
        return theta[sel], vectors, residuals, _relative_residuals(residuals, theta[sel], norm,
                                                                   eps)

    def cond(s):
        return (s.j < max_blocks) & ~s.converged & ~s.nonfinite

    def body(s):
        j = s.j
        basis = jax.lax.dynamic_update_slice_in_dim(s.basis, s.block, j * b, axis=0)
        w = block_mv(s.block)  # b matvecs in one batch
        nonfinite = ~jnp.all(jnp.isfinite(w))
        w = jnp.where(nonfinite, 0.0, w)
        products = jax.lax.dynamic_update_slice_in_dim(s.products, w, j * b, axis=0)
        norm_est = jnp.maximum(s.norm_est, jnp.max(jnp.linalg.norm(w, axis=1)))
        cross = jnp.dot(basis, w.T, precision=_HIGHEST)
        projected = jax.lax.dynamic_update_slice_in_dim(s.projected, cross, j * b, axis=1)
        w = w - jnp.dot(cross.T, basis, precision=_HIGHEST)
        w = jax.vmap(lambda x: _orthogonalize(x, basis, 1))(w)
        block, _, _ = _block_orthonormalize(w, basis, jax.random.fold_in(key, j),
                                            breakdown_factor * eps * norm_est)
        _, _, _, relative = ritz(projected, products, basis, (j + 1) * b)
        return _TrackState(j=j + 1, basis=basis, products=products, projected=projected,
                           block=block, norm_est=norm_est,
                           converged=jnp.all(relative <= tol),
                           nonfinite=s.nonfinite | nonfinite)

    init = _TrackState(
        j=jnp.zeros((), jnp.int32), basis=jnp.zeros((n, p), dtype),
        products=jnp.zeros((n, p), dtype), projected=jnp.zeros((n, n), dtype),
        block=jnp.linalg.qr(start.astype(dtype).T)[0].T, norm_est=jnp.zeros((), dtype),
        converged=jnp.zeros((), bool), nonfinite=~jnp.all(jnp.isfinite(start)))
    s = jax.lax.while_loop(cond, body, init)
    values, vectors, residuals, relative = ritz(s.projected, s.products, s.basis, s.j * b)
    gram = jnp.dot(vectors, vectors.T, precision=_HIGHEST)
    orthogonal = jnp.max(jnp.abs(gram - jnp.eye(k, dtype=dtype)), axis=1) <= tol
    nan = jnp.asarray(jnp.nan, dtype)
    return Eigenpairs(
        eigenvalues=jnp.where(s.nonfinite, nan, values),
        eigenvectors=jnp.where(s.nonfinite, nan, vectors),
        residuals=jnp.where(s.nonfinite, nan, residuals),
        converged=(relative <= tol) & orthogonal & ~s.nonfinite,
        num_matvecs=s.j * b,
    )


def track_eigenpairs(matvec: Matvec, start: jax.Array, k: int, *, like: PyTree,
                     max_blocks: int = 6, which: str = "LA", tol: float | None = None,
                     dtype=None, key: jax.Array | None = None,
                     breakdown_factor: float = DEFAULT_BREAKDOWN_FACTOR) -> Eigenpairs:
    r"""The top-k eigenpairs of H(t) from a basis close to its top subspace (e.g. H(t − Δt)'s).

    Block Krylov seeded with ``start``: the first block is ``start`` itself (b = its number of
    rows, at least k; a few extra "guard" rows, e.g. the previous eigenvectors k+1, k+2, help
    the k-th pair), each further block is H applied to the previous one, orthogonalised against
    everything so far, and each block's b matvecs run as one batch. After every block,
    Rayleigh-Ritz on the whole basis. The matvec outputs are kept beside the basis, so the
    residuals ``||H v - λ v||`` are computed **explicitly** from actual matvec outputs
    (H v = Σ s_i H q_i) after every block at no extra matvec, and the solve stops as soon as
    every wanted pair meets ``tol`` (the test of :func:`top_eigenpairs`).

    When it pays: the polynomial degree grows by one per *block*, so tracking wins when the
    start is already close (the subspace moved little): measured on a slowly rotating operator
    it needs about half the matvecs of cold Lanczos, but on an FC-net Hessian 10 SGD steps apart
    (relative residual of the old basis ~0.25) it did not reach 1e-3 in 72 matvecs where cold
    Lanczos needed 38 (BUILD_NOTES.md, issue 6). An augmented single-vector continuation was
    tried and was worse. Use ``top_eigenpairs`` with a warm start vector otherwise.

    Args:
      matvec: ``v -> H v`` on pytrees like ``like``.
      start: ``(b, p)`` rows in ``ravel_pytree`` order (orthonormalised inside), ``b >= k``.
      k: number of eigenpairs.
      like: template pytree of the vectors (e.g. the parameters).
      max_blocks: at most ``max_blocks * b`` matvecs; memory ``2 * max_blocks * b * p``.
      which: "LA", "SA" or "LM".
      tol: relative residual tolerance (default :func:`default_tol` of the parameters' dtype).
      dtype: dtype of the basis and the Rayleigh-Ritz step.
      key: PRNG key for refilling rank-deficient blocks.
      breakdown_factor: see :func:`lanczos`.

    Returns:
      :class:`Eigenpairs`; ``num_matvecs`` counts every matvec (there is no separate
      verification: the residuals come from the stored products).

    Example:
      >>> import jax.numpy as jnp
      >>> a = jnp.diag(jnp.arange(1.0, 21.0))
      >>> near = jnp.eye(20)[17:] + 0.01  # close to the top-3 eigenvectors
      >>> res = track_eigenpairs(lambda v: a @ v, near, 3, like=jnp.zeros(20), tol=1e-4)
      >>> res.eigenvalues.round(3), int(res.num_matvecs) <= 12
      (Array([20., 19., 18.], dtype=float32), True)
    """
    matvec = _as_operator(matvec)
    _tree.check_floating("like", like)
    dim = _tree.tree_size(like)
    start = jnp.asarray(start)
    if start.ndim != 2 or start.shape[1] != dim:
        raise ValueError(f"`start` must be (b, {dim}) rows, got shape {start.shape}.")
    if _tree.is_concrete(start):
        _tree.check_finite("start", start)
    k = _check_int("k", k, 1, dim - 1)
    if start.shape[0] < k:
        raise ValueError(f"`start` needs at least k={k} rows, got {start.shape[0]}.")
    max_blocks = _check_int("max_blocks", max_blocks, 1, max(1, dim // start.shape[0]))
    if which not in _WHICH:
        raise ValueError(f"`which` must be one of {_WHICH}, got {which!r}.")
    dtype = _resolve_dtype(dtype, like)
    tol = _resolve_tol(tol, like)
    with _x64_scope(dtype):
        key = jax.random.key(2) if key is None else key
        out = _track_jit(matvec, start, like, key, k=k, max_blocks=max_blocks, which=which,
                         tol=tol, dtype=jnp.dtype(dtype),
                         breakdown_factor=float(breakdown_factor))
    if _tree.is_concrete(out) and not np.all(np.isfinite(np.asarray(out.eigenvalues))):
        raise FloatingPointError("`matvec` returned a non-finite value while tracking.")
    return out
