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

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import flatten_util

from hessian_subspace import _linalg, _tree, _xla, linearization
from hessian_subspace import sharding as sharding_lib

PyTree = Any
Matvec = Callable[[PyTree], PyTree]

_HIGHEST = _linalg.HIGHEST
DEFAULT_BREAKDOWN_FACTOR = _linalg.DEFAULT_BREAKDOWN_FACTOR
default_tol = _linalg.default_tol


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
    residuals: jax.Array  # (k,); ||H v - lambda v||: from the Arnoldi relation, or k matvecs.
    converged: jax.Array  # (k,) bool; relative residual <= tol (see `top_eigenpairs`).
    num_matvecs: jax.Array  # () int32; matvecs used, the residual check's included.


class RitzValues(NamedTuple):
    """Output of :func:`ritz_values`."""

    values: jax.Array  # (num_steps,) ascending eigenvalues of T; padding where not `valid`.
    valid: jax.Array  # (num_steps,) bool; False for entries that come from padding.


class Quadrature(NamedTuple):
    """A Gauss quadrature rule of a spectral measure (:func:`gauss_quadrature`; stacked over
    probes by :func:`hessian_subspace.slq_quadrature`)."""

    nodes: jax.Array  # (..., num_steps); Ritz values.
    weights: jax.Array  # (..., num_steps); squared first components; 0 on padding, sum 1.


def random_start_vector(key: jax.Array, like: PyTree) -> PyTree:
    """A standard-normal pytree shaped like ``like`` (a start vector for Lanczos).

    Args:
      key: a JAX PRNG key.
      like: pytree of arrays (e.g. model parameters) or a flat array.

    Returns:
      A pytree with the structure, shapes and dtypes of ``like``.
    """
    _tree.check_key("key", key)
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


def _recurrence(mv, v0, *, num_steps, reorth, eps, breakdown_factor, sharding=None):
    """The three-term recurrence with `reorth` full Gram-Schmidt passes; stops at breakdown."""
    p = v0.shape[0]
    dtype = v0.dtype
    rows = sharding_lib.basis_sharding(sharding)
    q0 = _linalg.constrain(v0 / jnp.linalg.norm(v0), sharding)
    zero = jnp.zeros((), dtype)
    init = _State(
        i=jnp.zeros((), jnp.int32),
        basis=_linalg.constrain(jnp.zeros((num_steps, p), dtype), rows),
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
        basis = _linalg.constrain(s.basis.at[i].set(s.q), rows)
        w = mv(s.q)
        nonfinite = ~jnp.all(jnp.isfinite(w))
        w = jnp.where(nonfinite, 0.0, w)
        alpha = jnp.dot(s.q, w, precision=_HIGHEST)
        w = w - alpha * s.q - s.beta_prev * s.q_prev
        w = _linalg.orthogonalize(w, basis, reorth)
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


@functools.partial(jax.jit, static_argnames=("num_steps", "reorth", "dtype", "breakdown_factor",
                                             "sharding"))
def _lanczos_jit(matvec, v0, *, num_steps, reorth, dtype, breakdown_factor, sharding=None):
    mv, like_flat = _tree.flat_matvec(matvec, v0, dtype)
    eps = _linalg.breakdown_eps(like_flat, dtype)
    s = _recurrence(mv, like_flat.astype(dtype), num_steps=num_steps, reorth=reorth, eps=eps,
                    breakdown_factor=breakdown_factor, sharding=sharding)
    valid = jnp.arange(num_steps) < s.i
    nan = jnp.asarray(jnp.nan, dtype)
    poison = lambda x: jnp.where(s.nonfinite, nan, x)  # noqa: E731
    return LanczosResult(
        basis=poison(s.basis), alphas=poison(jnp.where(valid, s.alphas, 0.0)),
        betas=poison(jnp.where(valid, s.betas, 0.0)), num_valid=s.i,
        residual=poison(jnp.where(s.done, 0.0, s.residual)),
    )


def lanczos(matvec: Matvec, v0: PyTree, num_steps: int, *, reorthogonalize: int = 2,
            dtype=None, breakdown_factor: float = DEFAULT_BREAKDOWN_FACTOR,
            sharding=None) -> LanczosResult:
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
      sharding: a ``NamedSharding`` of flat ``(p,)`` vectors: the basis is kept split the same
        way along p (about ``num_steps * p / devices`` numbers per device). Default: the
        operator's ``vector_sharding`` (set when its data or parameters are on a mesh), else
        none.

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
    matvec = _tree.as_operator(matvec)
    v0 = _linalg.start_as_tree(v0, matvec)
    _linalg.check_start_vector(v0)
    _linalg.check_start_like_operator(v0, matvec)
    _linalg.check_operator_output(matvec, v0)
    _tree.warn_float64_dropped("v0", v0)
    dim = _tree.tree_size(v0)
    num_steps = _tree.check_int("num_steps", num_steps, 1, dim)
    reorthogonalize = _tree.check_int("reorthogonalize", reorthogonalize, 0, 4)
    dtype = _tree.resolve_dtype(dtype, v0)
    sharding = _linalg.vector_sharding(matvec, sharding)
    with _tree.x64_scope(dtype):
        return _lanczos_jit(matvec, v0, num_steps=num_steps, reorth=reorthogonalize,
                            dtype=jnp.dtype(dtype), breakdown_factor=float(breakdown_factor),
                            sharding=sharding)


def ritz_values(result: LanczosResult) -> RitzValues:
    """Eigenvalues of T from a :class:`LanczosResult`, padding masked.

    Returns:
      :class:`RitzValues` ``(values, valid)``: ``(num_steps,)`` ascending Ritz values (entries
      with ``valid`` False come from padding and carry no information) and the bool mask.
    """
    theta, _, valid = _linalg.ritz(tridiagonal_matrix(result), result.num_valid)
    return RitzValues(values=theta, valid=valid)


def tridiagonal_matrix(result: LanczosResult) -> jax.Array:
    """The ``(num_steps, num_steps)`` matrix T of a :class:`LanczosResult` (padding: zeros)."""
    return _tridiag(result.alphas, result.betas, result.num_valid)


def gauss_quadrature(result: LanczosResult) -> Quadrature:
    r"""The Gauss quadrature rule of the start vector's spectral measure, from a Lanczos run.

    With :math:`T = S\,\mathrm{diag}(	heta)\,S^	op`, the nodes are the Ritz values
    :math:`	heta_j` and the weights :math:`	au_j = S_{1j}^2`, so that
    :math:`q_1^	op f(H)\,q_1 pprox \sum_j 	au_j f(	heta_j)` (exact for polynomials of
    degree < 2m; Golub & Meurant 1994). Stochastic Lanczos quadrature averages this over random
    start vectors (:func:`hessian_subspace.spectrum.slq_quadrature`).

    Args:
      result: a :class:`LanczosResult`; a NaN-poisoned one gives NaN nodes.

    Returns:
      :class:`Quadrature` ``(nodes, weights)``, ``(num_steps,)`` each; padding (rows >=
      ``num_valid``) has weight 0 and the weights sum to 1.

    Example:
      >>> import jax.numpy as jnp
      >>> import hessian_subspace as hs
      >>> a = jnp.diag(jnp.array([1.0, 1.0, 3.0, 3.0]))
      >>> result = hs.lanczos(lambda v: a @ v, jnp.ones(4), 4)
      >>> nodes, weights = hs.krylov.gauss_quadrature(result)
      >>> round(float(jnp.sum(jnp.where(nodes > 2, weights, 0.0))), 4)  # half the mass sits at 3
      0.5
    """
    theta, vectors, valid = _linalg.ritz(tridiagonal_matrix(result), result.num_valid)
    return Quadrature(nodes=theta, weights=jnp.where(valid, vectors[0] ** 2, 0.0))


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
    total: jax.Array  # () int32; blocks applied (matvecs / b), restarts included.
    restarts: jax.Array  # () int32; thick restarts so far.


_TOP_STATIC = ("k", "num_blocks", "block_size", "which", "tol", "reorth", "dtype", "check_every",
               "breakdown_factor", "capacity", "keep", "sharding", "verify")
VERIFY = ("relation", "explicit")


class _Program(NamedTuple):
    init: _BlockState
    cond: Callable[[_BlockState], jax.Array]
    body: Callable[[_BlockState], _BlockState]
    finish: Callable[[_BlockState], Eigenpairs]


def _top_program(matvec, v0, key, *, k, num_blocks, block_size, which, tol, reorth, dtype,
                 check_every, breakdown_factor, capacity=None, keep=None, sharding=None,
                 verify="relation") -> _Program:
    """The block Lanczos solve as its pieces: the first state, the loop condition and body,
    and the Rayleigh-Ritz + residual check (``verify``) at the end. Run by one ``while_loop``
    (:func:`_top_jit`) or step by step from Python (:func:`_top_host`)."""
    mv, like_flat = _tree.flat_matvec(matvec, v0, dtype)
    rows_sharding = sharding_lib.basis_sharding(sharding)
    block_mv = jax.vmap(mv)
    eps = _linalg.breakdown_eps(like_flat, dtype)
    b, p = block_size, like_flat.shape[0]
    # The basis holds `capacity` blocks; with fewer than `num_blocks` it is thick-restarted
    # (Wu & Simon 2000) when full, keeping the `keep` wanted Ritz vectors.
    capacity = num_blocks if capacity is None else capacity
    n = capacity * b
    blk = jnp.arange(n) // b

    start = jnp.concatenate(
        [like_flat.astype(dtype)[None], jax.random.normal(key, (b - 1, p), dtype)], axis=0)
    start = start / jnp.linalg.norm(start, axis=1, keepdims=True)
    first = jnp.linalg.qr(start.T)[0].T

    def ritz_estimates(s):
        t = _linalg.symmetric_projection(s.projected, b)
        theta, vecs, valid = _linalg.ritz(t, s.j * b)
        sel = _linalg.select(theta, valid, k, which)
        last_rows = jax.lax.dynamic_slice_in_dim(vecs[:, sel], (s.j - 1) * b, b, axis=0)
        est = jnp.linalg.norm(jnp.dot(s.coupling, last_rows, precision=_HIGHEST), axis=0)
        norm = jnp.max(jnp.where(valid, jnp.abs(theta), 0.0))
        return _linalg.relative_residuals(est, theta[sel], norm, eps)

    def cond(s):
        return (s.total < num_blocks) & ~s.done & ~s.nonfinite

    def restart(s):
        """Keep the `keep` wanted Ritz vectors of the full basis: H Y = Y diag(θ) + r sᵀ with r
        the pending block, so T becomes diag(θ) and the pending block continues from row keep
        (its couplings R s_last, the arrow, recorded below the diagonal for the relation)."""
        theta, vecs, valid = _linalg.ritz(_linalg.symmetric_projection(s.projected, b), n)
        sel = _linalg.select(theta, valid, keep, which)
        kept = jnp.dot(vecs[:, sel].T, s.basis, precision=_HIGHEST)  # (keep, p)
        basis = _linalg.constrain(
            jnp.zeros_like(s.basis).at[:keep].set(kept), rows_sharding)
        arrow = jnp.dot(s.coupling, vecs[n - b:, sel], precision=_HIGHEST)  # (b, keep)
        projected = (jnp.zeros_like(s.projected).at[:keep, :keep].set(jnp.diag(theta[sel]))
                     .at[keep:keep + b, :keep].set(arrow))
        return s._replace(j=jnp.asarray(keep // b, jnp.int32), basis=basis, projected=projected,
                          restarts=s.restarts + 1)

    def body(s):
        if capacity < num_blocks:
            s = jax.lax.cond(s.j >= capacity, restart, lambda s: s, s)
        j = s.j
        basis = _linalg.constrain(
            jax.lax.dynamic_update_slice_in_dim(s.basis, s.block, j * b, axis=0), rows_sharding)
        w = block_mv(s.block)  # (b, p): H Q_j, one batched matvec.
        nonfinite = ~jnp.all(jnp.isfinite(w))
        w = jnp.where(nonfinite, 0.0, w)
        norm_est = jnp.maximum(s.norm_est, jnp.max(jnp.linalg.norm(w, axis=1)))
        cross = jnp.dot(basis, w.T, precision=_HIGHEST)  # (n, b) = basis H Q_j^T.
        if reorth == 0:  # Plain block Lanczos: couple to the last two blocks only.
            cross = jnp.where(((blk == j) | (blk == j - 1))[:, None], cross, 0.0)
        w = w - jnp.dot(cross.T, basis, precision=_HIGHEST)
        for _ in range(reorth - 1):  # classical Gram-Schmidt again, coefficients kept
            extra = jnp.dot(basis, w.T, precision=_HIGHEST)
            w = w - jnp.dot(extra.T, basis, precision=_HIGHEST)
            cross = cross + extra
        projected = jax.lax.dynamic_update_slice_in_dim(s.projected, cross, j * b, axis=1)
        threshold = breakdown_factor * eps * norm_est
        block, replaced, coupling = _linalg.block_orthonormalize(
            w, basis, jax.random.fold_in(key, s.total + 2), threshold)
        block = _linalg.constrain(block, rows_sharding)
        # Arnoldi relation H Q_jᵀ = Σ_{i≤j} Q_iᵀ P_ij + Q_{j+1}ᵀ R: R below the diagonal (the
        # symmetric T reads only the upper block triangle); the last block's R stays in
        # `coupling`. :func:`_finish` reads Ritz residuals from this relation.
        below = jax.lax.dynamic_update_slice(projected, coupling, ((j + 1) * b, j * b))
        projected = jnp.where(j + 1 < capacity, below, projected)
        new = _BlockState(j=j + 1, basis=basis, projected=projected, block=block,
                          coupling=coupling, replaced=replaced, norm_est=norm_est,
                          done=s.total + 1 >= num_blocks, nonfinite=s.nonfinite | nonfinite,
                          total=s.total + 1, restarts=s.restarts)
        # Never stop right after a refill: an invariant block says nothing about eigenvalues
        # that the basis has not reached yet.
        due = ((j + 1) * b >= k) & ((s.total + 1) % check_every == 0) & ~replaced
        converged = jax.lax.cond(due, lambda s: jnp.all(ritz_estimates(s) <= tol),
                                 lambda s: jnp.zeros((), bool), new)
        return new._replace(done=new.done | converged)

    init = _BlockState(
        j=jnp.zeros((), jnp.int32),
        basis=_linalg.constrain(jnp.zeros((n, p), dtype), rows_sharding),
        projected=jnp.zeros((n, n), dtype), block=_linalg.constrain(first, rows_sharding),
        coupling=jnp.zeros((b, b), dtype), replaced=jnp.zeros((), bool),
        norm_est=jnp.zeros((), dtype), done=jnp.zeros((), bool),
        nonfinite=~jnp.all(jnp.isfinite(first)), total=jnp.zeros((), jnp.int32),
        restarts=jnp.zeros((), jnp.int32),
    )
    return _Program(init=init, cond=cond, body=body,
                    finish=functools.partial(_finish, mv=mv, k=k, b=b, which=which, tol=tol,
                                             dtype=dtype, eps=eps, sharding=sharding,
                                             rows_sharding=rows_sharding, block_mv=block_mv,
                                             verify=verify, key=key))


def _relation_coefficients(s, vecs, theta, b):
    """Coefficients of the residual vectors H y - θ y of the Ritz pairs (θ, y = Qᵀ s) from the
    Arnoldi relation H Qᵀ = Qᵀ P + Q_nextᵀ R e_lastᵀ recorded in `projected` (upper block
    triangle as computed, not symmetrised; couplings below it): on the basis (n, k) and on the
    pending block (b, k). No matvec."""
    n = s.projected.shape[0]
    rows = jnp.arange(n) < s.j * b
    relation = jnp.where(rows[:, None] & rows[None, :], s.projected, 0.0)
    vecs = jnp.where(rows[:, None], vecs, 0.0)
    coeffs = jnp.dot(relation, vecs, precision=_HIGHEST) - vecs * theta  # (n, k)
    last = jax.lax.dynamic_slice_in_dim(vecs, (s.j - 1) * b, b, axis=0)  # (b, k)
    return coeffs, jnp.dot(s.coupling, last, precision=_HIGHEST)


def _finish(s, *, mv, k, b, which, tol, dtype, eps, sharding, rows_sharding, block_mv, verify,
            key):
    theta, vecs, valid = _linalg.ritz(_linalg.symmetric_projection(s.projected, b), s.j * b)
    sel = _linalg.select(theta, valid, k, which)
    eigenvalues = theta[sel]
    replicated = None if sharding is None else sharding_lib.replicated(sharding.mesh)
    if verify == "explicit":
        rows = vecs[:, sel].T  # (k, n)
    else:  # the eigenvectors and the relation's residual vectors by one product with the basis
        coeffs, pending = _relation_coefficients(s, vecs[:, sel], theta[sel], b)
        rows = jnp.concatenate([vecs[:, sel].T, coeffs.T], axis=0)  # (2k, n)
    # Computed split like the basis (a replicated product would gather the whole basis).
    both = _linalg.constrain(jnp.dot(rows, s.basis, precision=_HIGHEST), rows_sharding)
    eigenvectors = both[:k]
    norm = jnp.max(jnp.where(valid, jnp.abs(theta), 0.0))
    scale = jnp.maximum(jnp.abs(eigenvalues), jnp.sqrt(eps) * norm)
    nonfinite = s.nonfinite
    if verify == "explicit":  # k products in one batch
        h_vectors = block_mv(eigenvectors) if k == b else jax.vmap(mv)(eigenvectors)
        residual_vectors = h_vectors - eigenvalues[:, None] * eigenvectors
        confirmed = jnp.ones((), bool)
        products = k
    else:  # the relation, confirmed by one product at a random unit combination c of the k
        residual_vectors = _linalg.constrain(
            both[k:] + jnp.dot(pending.T, s.block, precision=_HIGHEST), rows_sharding)
        c = jax.random.normal(jax.random.fold_in(key, 0x5EED), (k,), dtype)
        c = c / jnp.linalg.norm(c)
        z = jnp.dot(c, eigenvectors, precision=_HIGHEST)
        hz = mv(z)
        nonfinite = nonfinite | ~jnp.all(jnp.isfinite(hz))
        predicted = jnp.dot(c * eigenvalues, eigenvectors, precision=_HIGHEST) + jnp.dot(
            c, residual_vectors, precision=_HIGHEST)
        confirmed = jnp.linalg.norm(hz - predicted) <= tol * jnp.min(scale)
        products = 1
    residuals = jnp.linalg.norm(residual_vectors, axis=1)
    relative = _linalg.relative_residuals(residuals, eigenvalues, norm, eps)
    # Ghosts (copies of one eigenpair that a basis without reorthogonalisation produces) have
    # small residuals but are not orthogonal to their twin: they fail this test.
    gram = jnp.dot(eigenvectors, eigenvectors.T, precision=_HIGHEST)
    orthogonal = jnp.max(jnp.abs(gram - jnp.eye(k, dtype=dtype)), axis=1) <= tol
    converged = (relative <= tol) & orthogonal & confirmed & ~nonfinite
    nan = jnp.asarray(jnp.nan, dtype)
    return Eigenpairs(
        eigenvalues=jnp.where(nonfinite, nan, eigenvalues),
        # k vectors, whole on every device (readable by every process), gathered last.
        eigenvectors=_linalg.constrain(jnp.where(nonfinite, nan, eigenvectors), replicated),
        residuals=jnp.where(nonfinite, nan, residuals),
        converged=converged,
        num_matvecs=s.total * b + products,
    )


@functools.partial(jax.jit, static_argnames=_TOP_STATIC)
def _top_jit(matvec, v0, key, **static):
    program = _top_program(matvec, v0, key, **static)
    return program.finish(jax.lax.while_loop(program.cond, program.body, program.init))


# Host-driven: the same program, one compiled call per block. XLA:CPU runs convolutions inside
# while-loop bodies many times slower than outside (jax-ml/jax#12868), and every HVP of the
# compiled solve is inside its while loop; here each step is a program of its own.


@functools.partial(jax.jit, static_argnames=_TOP_STATIC)
def _host_init(matvec, v0, key, **static):
    program = _top_program(matvec, v0, key, **static)
    return program.init, program.cond(program.init)


@functools.partial(jax.jit, static_argnames=_TOP_STATIC, donate_argnames=("state",))
def _host_step(matvec, v0, key, state, **static):
    program = _top_program(matvec, v0, key, **static)
    new = program.body(state)
    return new, program.cond(new)


@functools.partial(jax.jit, static_argnames=_TOP_STATIC)
def _host_finish(matvec, v0, key, state, **static):
    return _top_program(matvec, v0, key, **static).finish(state)


_CONV_CACHE: dict = {}


def _wants_host_driver(matvec, v0) -> bool:
    """True on CPU when the product holds a convolution (read from its traced program, once
    per operator type and shapes): XLA:CPU runs it slowly in a loop body (:mod:`_xla`)."""
    if jax.default_backend() != "cpu":
        return False
    leaves, treedef = jax.tree_util.tree_flatten((matvec, v0))
    key = (treedef, tuple((np.shape(x), str(jnp.result_type(x))) for x in leaves))
    if key not in _CONV_CACHE:
        jaxpr = jax.make_jaxpr(lambda m, v: m(v))(matvec, v0)
        _CONV_CACHE[key] = _xla.loops_are_slow(jaxpr.jaxpr)
    return _CONV_CACHE[key]


def _top_host(matvec, v0, key, **static):
    # Linearised once (if cached) for every step; the batch loop written out, not a loop.
    matvec = linearization.prepare(matvec, unroll=True)
    state, going = _host_init(matvec, v0, key, **static)
    while bool(going):
        state, going = _host_step(matvec, v0, key, state, **static)
    return _host_finish(matvec, v0, key, state, **static)


def top_eigenpairs(matvec: Matvec, v0: PyTree, k: int, *, num_steps: int | None = None,
                   which: str = "LA", tol: float | None = None, block_size: int = 1,
                   reorthogonalize: int = 2, dtype=None, key: jax.Array | None = None,
                   check_every: int | None = None,
                   breakdown_factor: float = DEFAULT_BREAKDOWN_FACTOR,
                   max_basis: int | None = None, sharding=None,
                   driver: str = "auto", verify: str = "relation") -> Eigenpairs:
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

    Every returned pair is then checked: ``residuals[j] = ||H v_j - λ_j v_j||``, and
    ``converged[j]`` is true when

    .. math:: \|H v_j - \lambda_j v_j\| \le \mathrm{tol}\cdot
              \max\bigl(|\lambda_j|,\ \sqrt{\varepsilon}\,\|H\|_{est}\bigr)
              \quad\text{and}\quad \max_{i\ne j}|v_i\cdot v_j| \le \mathrm{tol},

    a residual relative to the eigenvalue (floored for eigenvalues near zero; ε: rounding unit
    of the operator's dtype, :math:`\|H\|_{est}`: largest |Ritz value|) and orthogonality to
    the other returned vectors (which catches ghost copies). How the residual vectors are
    obtained is ``verify``:

    * ``"relation"`` (default; one matvec): from the block Arnoldi relation
      :math:`H Q^\top = Q^\top P + Q_{+}^\top R\, e^\top`, recorded as computed (every
      Gram-Schmidt coefficient kept, :math:`P` not symmetrised), so
      :math:`H v_j - \lambda_j v_j = Q^\top (P - \lambda_j) s_j + Q_{+}^\top R\, s_{j,last}`
      for a linear operator, to rounding (:math:`O(\varepsilon\|H\|)`), whatever the
      orthogonality of Q. One product at a random unit combination
      :math:`z = \sum_j c_j v_j` confirms it: unless
      :math:`\|Hz - \sum_j c_j(\lambda_j v_j + r_j)\| \le \mathrm{tol}\cdot\min_j
      \max(|\lambda_j|, \sqrt{\varepsilon}\|H\|_{est})`, no pair is converged. A
      product that is not linear, not symmetric or not deterministic fails it; a relation
      error of norm e on any pair passes unseen with probability at most
      :math:`0.8\,\sqrt{k}\,\tau/e` (τ the threshold above).
    * ``"explicit"`` (k matvecs, one batch): :math:`H v_j` computed for every pair.

    **Memory-bounded (thick restart).** With ``max_basis``, the basis holds at most that many
    vectors: when it is full, the wanted ``keep`` Ritz vectors (k plus half the spare room) are
    kept, the projection becomes :math:`\mathrm{diag}(\theta)`, and the pending Lanczos block
    continues from them (thick-restart Lanczos, Wu & Simon 2000; with the projection recorded
    explicitly, the arrow part of :math:`T` is filled in by the next products). The residual
    check is the same (the arrow is recorded in the relation too).

    Args:
      matvec: ``v -> H v`` for symmetric H, on pytrees like ``v0`` or flat arrays.
      v0: start vector: a pytree like the operator's vectors (the params), or flat in
        ``ravel_pytree`` order; see :func:`random_start_vector`.
      k: number of eigenpairs, ``1 <= k < p``.
      num_steps: maximum number of Krylov matvecs before the k residual checks, rounded down
        to a multiple of ``block_size``; without ``max_basis`` also the basis size
        (``max(k, block_size) <= num_steps <= p``; default :func:`default_num_steps`, and the
        basis holds ``num_steps * p`` numbers); with it, the budget over all restarts (default
        ``max(default_num_steps, 20 * max_basis)``).
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
      max_basis: cap on the basis size (vectors), ``k + 2 * block_size <= max_basis <= p``;
        None: no restart.
      sharding: a ``NamedSharding`` of flat ``(p,)`` vectors; the basis is split the same way
        (``max_basis * p / devices`` numbers per device). Default: the operator's
        ``vector_sharding``.
      driver: "compiled" runs the whole solve as one ``lax.while_loop`` (jittable,
        vmappable); "host" runs the same steps from Python, one compiled call per block
        (XLA:CPU runs convolutions inside loop bodies many times slower than outside,
        jax-ml/jax#12868); "auto" (default) picks "host" on CPU for operators whose product
        contains a convolution, when called outside a trace, and "compiled" otherwise.
        Both give the same numbers to round-off.
      verify: "relation" (default) or "explicit": how the residuals are obtained (above);
        ``num_matvecs`` counts 1 or k products for it.

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
      (1977); K. Wu, H. Simon, "Thick-restart Lanczos method for large symmetric eigenvalue
      problems", SIAM J. Matrix Anal. Appl. 22 (2000); Gur-Ari, Roberts, Dyer (2018), App. A.
    """
    matvec = _tree.as_operator(matvec)
    v0 = _linalg.start_as_tree(v0, matvec)
    _linalg.check_start_vector(v0)
    _linalg.check_start_like_operator(v0, matvec)
    _linalg.check_operator_output(matvec, v0)
    _tree.warn_float64_dropped("v0", v0)
    dim = _tree.tree_size(v0)
    if dim < 2:
        raise ValueError(f"the operator must have dimension >= 2, got {dim}.")
    k = _tree.check_int("k", k, 1, dim - 1)
    block_size = _tree.check_int("block_size", block_size, 1, dim)
    capacity = keep = None
    if max_basis is not None:
        max_basis = _tree.check_int("max_basis", max_basis, k + 2 * block_size, dim)
        capacity = max_basis // block_size
        n = capacity * block_size
        keep = min(n - block_size, k + (n - k) // 2)
        keep = max(keep - keep % block_size, -(-k // block_size) * block_size)
        if num_steps is None:
            num_steps = max(default_num_steps(k, dim, block_size), 20 * max_basis)
        num_steps = _tree.check_int("num_steps", num_steps, n)
    if num_steps is None:
        num_steps = default_num_steps(k, dim, block_size)
    if max_basis is None:
        num_steps = _tree.check_int("num_steps", num_steps, max(k, block_size), dim)
    num_blocks = num_steps // block_size
    if num_blocks * block_size < k:
        raise ValueError(f"`num_steps` rounded down to a multiple of block_size={block_size} "
                         f"is {num_blocks * block_size} < k={k}.")
    if capacity is not None and capacity >= num_blocks:
        capacity = keep = None  # the budget never fills the basis: no restart
    if which not in _linalg.WHICH:
        raise ValueError(f"`which` must be one of {_linalg.WHICH}, got {which!r}.")
    reorthogonalize = _tree.check_int("reorthogonalize", reorthogonalize, 0, 4)
    if check_every is None:
        check_every = max(1, (capacity or num_blocks) // 32)
    check_every = _tree.check_int("check_every", check_every, 1)
    dtype = _tree.resolve_dtype(dtype, v0)
    tol = _linalg.resolve_tol(tol, v0)
    sharding = _linalg.vector_sharding(matvec, sharding)
    if key is not None:
        _tree.check_key("key", key)
    if verify not in VERIFY:
        raise ValueError(f"`verify` must be one of {VERIFY}, got {verify!r}.")
    if driver not in ("auto", "compiled", "host"):
        raise ValueError(f"`driver` must be 'auto', 'compiled' or 'host', got {driver!r}.")
    traced = not (_tree.is_concrete(v0) and _tree.is_concrete(matvec)
                  and (key is None or _tree.is_concrete(key)))
    if driver == "host" and traced:
        raise ValueError("`driver='host'` runs the solve from Python and cannot be traced "
                         "(inside jit or vmap); use driver='compiled' there.")
    if driver == "auto":
        driver = "host" if not traced and _wants_host_driver(matvec, v0) else "compiled"
    with _tree.x64_scope(dtype):
        key = jax.random.key(1) if key is None else key
        solve = _top_host if driver == "host" else _top_jit
        out = solve(matvec, v0, key, k=k, num_blocks=num_blocks, block_size=block_size,
                    which=which, tol=tol, reorth=reorthogonalize, dtype=jnp.dtype(dtype),
                    check_every=check_every, breakdown_factor=float(breakdown_factor),
                    capacity=capacity, keep=keep, sharding=sharding, verify=verify)
    if _tree.is_concrete(out) and not np.all(np.isfinite(np.asarray(out.eigenvalues))):
        raise FloatingPointError(
            "`matvec` returned a non-finite value during Lanczos; check the parameters and the "
            "loss (the eigenpairs would be NaN)."
        )
    return out
