r"""Tracking the top eigenspace across training: block Krylov seeded with the previous basis.

:func:`track_eigenpairs` finds the top-k eigenpairs of H(t) from a basis close to its top
subspace (e.g. H(t − Δt)'s), keeping the matvec outputs beside the basis so that residuals are
explicit and free. It pays only when the subspace has barely moved (BUILD_NOTES.md, issue 6);
:func:`hessian_subspace.top_eigenpairs` with a warm start vector is the default elsewhere.

References:
  Golub & Underwood, "The block Lanczos method for computing eigenvalues" (1977).
  Saad, *Numerical Methods for Large Eigenvalue Problems*, 2nd ed. (2011), §6.3 (block Krylov).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hessian_subspace import _linalg, _tree
from hessian_subspace.krylov import Eigenpairs

PyTree = Any
Matvec = Callable[[PyTree], PyTree]


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
    eps = _linalg.breakdown_eps(like_flat, dtype)
    b, p = start.shape
    n = max_blocks * b

    def ritz(projected, products, basis, num_valid):
        theta, vecs, valid = _linalg.ritz(_linalg.symmetric_projection(projected, b), num_valid)
        sel = _linalg.select(theta, valid, k, which)
        coeffs = vecs[:, sel].T  # (k, n)
        vectors = jnp.dot(coeffs, basis, precision=_linalg.HIGHEST)
        # Explicit residuals from the stored matvec outputs: H v = sum_i s_i (H q_i).
        h_vectors = jnp.dot(coeffs, products, precision=_linalg.HIGHEST)
        residuals = jnp.linalg.norm(h_vectors - theta[sel][:, None] * vectors, axis=1)
        norm = jnp.max(jnp.where(valid, jnp.abs(theta), 0.0))
        relative = _linalg.relative_residuals(residuals, theta[sel], norm, eps)
        return theta[sel], vectors, residuals, relative

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
        cross = jnp.dot(basis, w.T, precision=_linalg.HIGHEST)
        projected = jax.lax.dynamic_update_slice_in_dim(s.projected, cross, j * b, axis=1)
        w = w - jnp.dot(cross.T, basis, precision=_linalg.HIGHEST)
        w = jax.vmap(lambda x: _linalg.orthogonalize(x, basis, 1))(w)
        block, _, _ = _linalg.block_orthonormalize(w, basis, jax.random.fold_in(key, j),
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
    gram = jnp.dot(vectors, vectors.T, precision=_linalg.HIGHEST)
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
                     breakdown_factor: float = _linalg.DEFAULT_BREAKDOWN_FACTOR
                     ) -> Eigenpairs:
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
      start: ``(b, p)`` rows in ``ravel_pytree`` order, or a pytree like ``like`` whose leaves
        have a leading axis b (e.g. :func:`hessian_subspace.as_pytrees` of earlier
        eigenvectors); orthonormalised inside, ``b >= k``.
      k: number of eigenpairs.
      like: template pytree of the vectors (e.g. the parameters).
      max_blocks: at most ``max_blocks * b`` matvecs; memory ``2 * max_blocks * b * p``.
      which: "LA", "SA" or "LM".
      tol: relative residual tolerance (default :func:`hessian_subspace.krylov.default_tol` of
        the parameters' dtype).
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
    matvec = _tree.as_operator(matvec)
    _tree.check_floating("like", like)
    _linalg.check_operator_output(matvec, like)
    if key is not None:
        _tree.check_key("key", key)
    dim = _tree.tree_size(like)
    if isinstance(start, (list, tuple)) and all(np.ndim(r) == 1 for r in start) and \
            len({np.shape(r) for r in start}) == 1:
        start = jnp.stack([jnp.asarray(r) for r in start])  # a list of rows
    if isinstance(start, (jax.Array, np.ndarray)) and np.ndim(start) != 2:
        raise ValueError(f"`start` must be (b, {dim}) rows or a pytree of them, got shape "
                         f"{np.shape(start)}.")
    start = _tree.as_flat_rows(start)
    if start.ndim != 2 or start.shape[1] != dim:
        raise ValueError(f"`start` must be (b, {dim}) rows, got shape {start.shape}.")
    if _tree.is_concrete(start):
        _tree.check_finite("start", start)
    k = _tree.check_int("k", k, 1, dim - 1)
    if start.shape[0] < k:
        raise ValueError(f"`start` needs at least k={k} rows, got {start.shape[0]}.")
    max_blocks = _tree.check_int("max_blocks", max_blocks, 1, max(1, dim // start.shape[0]))
    if which not in _linalg.WHICH:
        raise ValueError(f"`which` must be one of {_linalg.WHICH}, got {which!r}.")
    dtype = _tree.resolve_dtype(dtype, like)
    tol = _linalg.resolve_tol(tol, like)
    with _tree.x64_scope(dtype):
        key = jax.random.key(2) if key is None else key
        out = _track_jit(matvec, start, like, key, k=k, max_blocks=max_blocks, which=which,
                         tol=tol, dtype=jnp.dtype(dtype),
                         breakdown_factor=float(breakdown_factor))
    if _tree.is_concrete(out) and not np.all(np.isfinite(np.asarray(out.eigenvalues))):
        raise FloatingPointError("`matvec` returned a non-finite value while tracking.")
    return out
