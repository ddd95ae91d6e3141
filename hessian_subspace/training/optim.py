r"""Optax transformations that act on the top Hessian subspace: Dom-SGD, Bulk-SGD, low-rank Newton.

Let :math:`v_1,\dots,v_k` be the top-k eigenvectors of the Hessian :math:`H` of a loss measured on
a fixed *curvature data* set (the paper measures on the whole training set, §2.1), with
eigenvalues :math:`\lambda_1\ge\dots\ge\lambda_k`, and :math:`P=\sum_i v_i v_i^\top` the orthogonal
projector onto their span. This module provides

* :func:`project_onto_subspace` — ``mode="dominant"``: :math:`u\mapsto Pu`; ``mode="bulk"``:
  :math:`u\mapsto u-Pu`. Used as (or chained with) SGD this is Dom-SGD / Bulk-SGD (Song, Ahn &
  Yun 2024): descending only inside the top subspace, where the gradient lives (Gur-Ari et al.
  2018, eq. 2), or only in its complement. It projects whatever reaches it in an
  ``optax.chain``: the gradient, or the output of momentum or Adam placed before it.
* :func:`low_rank_newton` — eq. 11 of the paper with damping: :math:`u = -\eta\sum_i
  (v_i\cdot g)\,v_i/(|\lambda_i|+\delta)`, i.e. :math:`\theta\leftarrow\theta-\eta(|H_{top}|+
  \delta I)^{-1}g_{top}`; the bulk component of g is dropped.

**Hessian access is explicit.** Both take ``hessian_fn(params, curvature_data) -> matvec`` at
construction (e.g. ``lambda p, d: hs.dataset_hvp(loss_fn, p, d, batch_size=256)``) and receive
the data at every update as an *extra argument*::

    updates, state = tx.update(grads, state, params, curvature_data=analysis_set)

so the jitted training step takes the data as an input, never as a captured constant
(``optax.chain`` forwards extra arguments to every member that accepts them). The basis is
recomputed with :func:`hessian_subspace.krylov.top_eigenpairs` every ``refresh_every`` updates
(the first update included) under ``jax.lax.cond``, so one compiled step serves refresh and
non-refresh updates; on CPU only the taken branch runs. Call ``update`` inside ``jax.jit``: run
eagerly, every call traces the eigensolver again.

Vectors are flattened once in ``ravel_pytree`` order of ``params``; the basis is a ``(k, p)``
array with orthonormal rows, like :attr:`Eigenpairs.eigenvectors` and the bases of
:mod:`hessian_subspace.metrics`.

References:
  Gur-Ari, Roberts, Dyer, "Gradient Descent Happens in a Tiny Subspace", arXiv:1812.04754
  (eq. 2: the gradient lies in the top subspace; eq. 11: low-rank Newton).
  Song, Ahn, Yun, "Does SGD really happen in tiny subspaces?" (2024) (Dom-SGD, Bulk-SGD).
  Dauphin et al., "Identifying and attacking the saddle point problem in high-dimensional
  non-convex optimization", NeurIPS 2014 (|H| in Newton's step: saddle-free Newton).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import flatten_util

from hessian_subspace import _tree, curvature, krylov

PyTree = Any
HessianFn = Callable[[PyTree, PyTree], Callable[[PyTree], PyTree]]

_HIGHEST = jax.lax.Precision.HIGHEST
MODES = ("dominant", "bulk")
# Relative size of the random part of a warm start: v0 = (unit vector in the previous basis)
# + WARM_START_NOISE * (unit random vector). Enough to let a rotated subspace back in.
WARM_START_NOISE = 0.1


class SubspaceState(NamedTuple):
    """State of :func:`project_onto_subspace` and :func:`low_rank_newton` (a pytree)."""

    count: jax.Array  # () int32; updates done. A refresh happens when count % refresh_every == 0.
    basis: jax.Array  # (k, p) float32 (float64 for float64 params); orthonormal rows in
    #                   ravel_pytree order of params; zeros until the first update.
    eigenvalues: jax.Array  # (k,) same dtype; the basis rows' eigenvalues, descending.
    converged: jax.Array  # (k,) bool; eigensolver's verdict at the last refresh.
    key: jax.Array  # raw uint32 key data (e.g. (2,)): checkpointable; split at each refresh.
    removed_fraction: jax.Array  # () float32 in [0, 1]; ||u - kept||² / ||u||² at the last
    #                              update (0 for a zero update); see each transformation.
    hvps: jax.Array  # () int32; Hessian-vector products used so far (refreshes only).


# --------------------------------------------------------------------------------------------
# Validation (construction time: plain Python values only).


def _check_float(name: str, value, *, positive: bool) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a real number, got {value!r}.") from None
    if isinstance(value, bool) or not math.isfinite(out) or out < 0 or (positive and out == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"`{name}` must be finite and {bound}, got {value!r}.")
    return out


def _check_hessian_fn(hessian_fn) -> None:
    if not callable(hessian_fn):
        raise ValueError(
            "`hessian_fn` must be callable as hessian_fn(params, curvature_data) -> matvec, "
            f"got {type(hessian_fn).__name__}.")


def _key_codec(key) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """(raw uint32 key data, data -> key usable by jax.random). Typed keys keep their impl."""
    if key is None:
        raise ValueError("`key` must be a JAX PRNG key (jax.random.key(seed)), got None.")
    try:
        arr = jnp.asarray(key)
    except TypeError:
        raise ValueError(f"`key` must be a JAX PRNG key, got {type(key).__name__}.") from None
    if jax.dtypes.issubdtype(arr.dtype, jax.dtypes.prng_key):
        if arr.shape != ():
            raise ValueError(f"`key` must be a single PRNG key, got shape {arr.shape}.")
        impl = jax.random.key_impl(arr)
        return jax.random.key_data(arr), lambda d: jax.random.wrap_key_data(d, impl=impl)
    if arr.dtype != jnp.uint32 or arr.ndim != 1:
        raise ValueError("`key` must be a JAX PRNG key (jax.random.key(seed) or a raw uint32 "
                         f"key), got dtype {arr.dtype} and shape {arr.shape}.")
    return arr, lambda d: d


def _check_solver_args(k, num_steps, tol, block_size):
    if num_steps is not None:
        num_steps = _tree.check_int("num_steps", num_steps, max(k, 1))
    if tol is not None:
        tol = _check_float("tol", tol, positive=True)
    block_size = _tree.check_int("block_size", block_size, 1)
    return num_steps, tol, block_size


# --------------------------------------------------------------------------------------------
# Shared pieces.


def _flat(tree: PyTree) -> tuple[jax.Array, Callable]:
    return flatten_util.ravel_pytree(tree)


def _basis_dtype(params: PyTree):
    return jnp.promote_types(_flat(params)[0].dtype, jnp.float32)


def _init(params: PyTree, k: int, key_data: jax.Array) -> SubspaceState:
    flat = _flat(params)[0]
    p = flat.shape[0]
    if k > p:
        raise ValueError(f"`k` = {k} exceeds the number of parameters p = {p}.")
    dtype = _basis_dtype(params)
    return SubspaceState(
        count=jnp.zeros((), jnp.int32), basis=jnp.zeros((k, p), dtype),
        eigenvalues=jnp.zeros((k,), dtype), converged=jnp.zeros((k,), bool),
        key=jnp.asarray(key_data), removed_fraction=jnp.zeros((), jnp.float32),
        hvps=jnp.zeros((), jnp.int32))


def _require(name: str, params, curvature_data, extra_args) -> None:
    if params is None:
        raise ValueError(f"{name}.update needs `params` (the point where the Hessian is taken): "
                         "call tx.update(updates, state, params, curvature_data=...).")
    if curvature_data is None:
        hint = f" (got extra arguments {sorted(extra_args)})" if extra_args else ""
        raise ValueError(f"{name}.update needs the keyword argument `curvature_data`, the data "
                         f"passed to hessian_fn(params, curvature_data){hint}.")


def _check_like(updates: PyTree, params: PyTree) -> None:
    s1, s2 = jax.tree_util.tree_structure(updates), jax.tree_util.tree_structure(params)
    if s1 != s2:
        raise ValueError(f"`updates` and `params` have different pytree structures: {s1} vs {s2}.")
    for a, b in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(params),
                    strict=True):
        if np.shape(a) != np.shape(b):
            raise ValueError(f"an `updates` leaf of shape {np.shape(a)} where `params` has "
                             f"{np.shape(b)}.")


def _start_vector(key, basis, warm_start: bool):
    """v0 for the eigensolver: a random unit combination of the previous basis rows plus
    ``WARM_START_NOISE`` times a random unit vector (pure noise before the first refresh, when
    the basis is zero, or when ``warm_start`` is off)."""
    k_coef, k_noise = jax.random.split(key)
    k, p = basis.shape
    noise = jax.random.normal(k_noise, (p,), basis.dtype)
    noise = noise / jnp.linalg.norm(noise)
    if not warm_start:
        return noise
    coef = jax.random.normal(k_coef, (k,), basis.dtype)
    coef = coef / jnp.linalg.norm(coef)
    return jnp.dot(coef, basis, precision=_HIGHEST) + WARM_START_NOISE * noise


def _top_subspace(matvec, params, v0_flat, key, *, k, num_steps, tol, block_size):
    """(eigenvalues (k,), eigenvectors (k, p), converged (k,), matvecs ()) of the top-k pairs.

    k < p: block Lanczos (:func:`krylov.top_eigenpairs`). k == p: the dense matrix from p matvecs
    and ``eigh`` (Lanczos needs k < p; a full basis is exact anyway).
    """
    flat_params, unravel = _flat(params)
    p = flat_params.shape[0]
    dtype = v0_flat.dtype
    if k == p:
        h = curvature.dense_matrix(matvec, params).astype(dtype)
        lam, vecs = jnp.linalg.eigh(0.5 * (h + h.T))
        order = jnp.argsort(-lam)
        return (lam[order], vecs[:, order].T, jnp.ones((k,), bool),
                jnp.asarray(p, jnp.int32))
    v0 = unravel(v0_flat.astype(flat_params.dtype))
    res = krylov.top_eigenpairs(matvec, v0, k, num_steps=num_steps, tol=tol,
                                block_size=block_size, key=key)
    return (res.eigenvalues.astype(dtype), res.eigenvectors.astype(dtype), res.converged,
            jnp.asarray(res.num_matvecs, jnp.int32))


def _make_refresh(hessian_fn, decode_key, *, k, refresh_every, num_steps, tol, block_size,
                  warm_start):
    """``refresh(state, params, data) -> state`` with a new basis when ``count`` is due."""

    def recompute(state: SubspaceState, params, data) -> SubspaceState:
        key, k_start, k_solver = jax.random.split(decode_key(state.key), 3)
        v0 = _start_vector(k_start, state.basis, warm_start)
        lam, vecs, conv, used = _top_subspace(
            hessian_fn(params, data), params, v0, k_solver, k=k, num_steps=num_steps, tol=tol,
            block_size=block_size)
        key_data = jax.random.key_data(key) if jax.dtypes.issubdtype(
            key.dtype, jax.dtypes.prng_key) else key
        return state._replace(basis=vecs.astype(state.basis.dtype),
                              eigenvalues=lam.astype(state.eigenvalues.dtype), converged=conv,
                              key=key_data.astype(state.key.dtype), hvps=state.hvps + used)

    def keep(state: SubspaceState, params, data) -> SubspaceState:
        del params, data
        return state

    def refresh(state: SubspaceState, params, data) -> SubspaceState:
        due = state.count % refresh_every == 0
        return jax.lax.cond(due, recompute, keep, state, params, data)

    return refresh


def _fraction(removed: jax.Array, total: jax.Array) -> jax.Array:
    """||removed||² / ||total||² clipped to [0, 1]; 0 when total is zero."""
    den = jnp.dot(total, total, precision=_HIGHEST)
    num = jnp.dot(removed, removed, precision=_HIGHEST)
    frac = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
    return jnp.clip(frac, 0.0, 1.0).astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# Public transformations.


def project_onto_subspace(mode: str, k: int, refresh_every: int, *, hessian_fn: HessianFn,
                          key: jax.Array, num_steps: int | None = None, tol: float | None = None,
                          block_size: int = 1, warm_start: bool = True
                          ) -> optax.GradientTransformationExtraArgs:
    r"""Projects updates onto the top-k Hessian subspace (``"dominant"``) or its complement
    (``"bulk"``).

    .. math:: u \mapsto P u \quad(\text{dominant}),\qquad u\mapsto u - P u\quad(\text{bulk}),
              \qquad P = \sum_{i=1}^k v_i v_i^\top,

    with :math:`v_i` the top-k (largest algebraic) eigenvectors of the Hessian returned by
    ``hessian_fn(params, curvature_data)``. ``optax.chain(project_onto_subspace("dominant", ...),
    optax.scale(-lr))`` is Dom-SGD and the ``"bulk"`` version Bulk-SGD (Song, Ahn & Yun 2024);
    placed after ``optax.scale_by_adam()`` or ``optax.trace(...)`` it projects their output.
    For the same ``key`` and schedule the two modes build the same basis, so their updates sum
    to the unprojected one.

    The basis is recomputed at updates ``0, refresh_every, 2 refresh_every, ...`` (before
    projecting that update) by :func:`hessian_subspace.krylov.top_eigenpairs`, inside
    ``jax.lax.cond``. With ``warm_start`` its start vector is a random unit combination of the
    previous basis rows plus ``WARM_START_NOISE`` (0.1) times a random unit vector, so a basis
    that barely moved is found again in few HVPs while a rotated one can still enter.

    Args:
      mode: ``"dominant"`` (keep :math:`Pu`) or ``"bulk"`` (keep :math:`u - Pu`).
      k: subspace dimension, ``1 <= k <= p`` (k = p uses a dense ``eigh`` of p HVPs; the
        projection is then the identity or zero).
      refresh_every: updates between basis recomputations, >= 1.
      hessian_fn: ``hessian_fn(params, curvature_data) -> matvec`` with ``matvec(v) = H v`` on
        pytrees shaped like ``params`` (e.g. ``lambda p, d: hs.dataset_hvp(loss_fn, p, d,
        batch_size=256)``). Called under ``jit`` with traced arguments.
      key: a JAX PRNG key (typed or raw) for start vectors; stored in the state as raw data.
      num_steps: Krylov dimension cap per refresh (default
        :func:`hessian_subspace.krylov.default_num_steps`).
      tol: eigensolver relative-residual tolerance (default
        :func:`hessian_subspace.krylov.default_tol`).
      block_size: start vectors per Lanczos block (raise it for repeated eigenvalues).
      warm_start: start each refresh from the previous basis (see above).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state, params, *,
      curvature_data, **extra_args)`` requires ``params`` and ``curvature_data`` (ValueError
      otherwise; other extra arguments are ignored) and returns the projected updates (same
      pytree and dtypes) and a :class:`SubspaceState`. ``state.removed_fraction`` is the
      fraction of ``||u||²`` that the projection removed, :math:`\|u-Pu\|^2/\|u\|^2`
      (dominant) or :math:`\|Pu\|^2/\|u\|^2` (bulk).

    Raises:
      ValueError: naming the argument, for a bad ``mode``, ``k``, ``refresh_every``,
        ``num_steps``, ``tol``, ``block_size``, ``hessian_fn`` or ``key``; at ``init`` when
        ``k`` exceeds the number of parameters.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from hessian_subspace.training import optim
      >>> hessian_fn = lambda params, a: (lambda v: a @ v)  # H = a, whatever the params
      >>> tx = optim.project_onto_subspace("dominant", 2, 10, hessian_fn=hessian_fn,
      ...                                  key=jax.random.key(0))
      >>> params = jnp.zeros(4)
      >>> a = jnp.diag(jnp.array([4.0, 3.0, 2.0, 1.0]))
      >>> u, state = jax.jit(tx.update)(jnp.ones(4), tx.init(params), params, curvature_data=a)
      >>> u.round(4) + 0.0, state.eigenvalues.round(4), round(float(state.removed_fraction), 4)
      (Array([1., 1., 0., 0.], dtype=float32), Array([4., 3.], dtype=float32), 0.5)

    References:
      Gur-Ari, Roberts, Dyer (2018), eq. 2; Song, Ahn, Yun, "Does SGD really happen in tiny
      subspaces?" (2024).
    """
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
    k = _tree.check_int("k", k, 1)
    refresh_every = _tree.check_int("refresh_every", refresh_every, 1)
    _check_hessian_fn(hessian_fn)
    key_data, decode_key = _key_codec(key)
    num_steps, tol, block_size = _check_solver_args(k, num_steps, tol, block_size)
    refresh = _make_refresh(hessian_fn, decode_key, k=k, refresh_every=refresh_every,
                            num_steps=num_steps, tol=tol, block_size=block_size,
                            warm_start=bool(warm_start))

    def init_fn(params: PyTree) -> SubspaceState:
        return _init(params, k, key_data)

    def update_fn(updates, state: SubspaceState, params=None, *, curvature_data=None,
                  **extra_args):
        _require("project_onto_subspace", params, curvature_data, extra_args)
        _check_like(updates, params)
        state = refresh(state, params, curvature_data)
        u, unravel = _flat(updates)
        basis = state.basis
        u_b = u.astype(basis.dtype)
        dom = jnp.dot(jnp.dot(basis, u_b, precision=_HIGHEST), basis, precision=_HIGHEST)
        if mode == "dominant":
            out, removed = dom, u_b - dom
        else:
            out = u_b - dom
            removed = dom
        state = state._replace(count=optax.safe_int32_increment(state.count),
                               removed_fraction=_fraction(removed, u_b))
        return unravel(out.astype(u.dtype)), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def low_rank_newton(k: int, damping: float, *, hessian_fn: HessianFn, key: jax.Array,
                    refresh_every: int = 1, step_size: float = 1.0, num_steps: int | None = None,
                    tol: float | None = None) -> optax.GradientTransformationExtraArgs:
    r"""Low-rank (damped, saddle-free) Newton step inside the top-k Hessian subspace (eq. 11).

    .. math:: u = -\eta \sum_{i=1}^k \frac{v_i\cdot g}{|\lambda_i| + \delta}\, v_i,
              \qquad\text{i.e.}\qquad
              \theta \leftarrow \theta - \eta\,(|H_{top}| + \delta I)^{-1} g_{top},

    with :math:`(\lambda_i, v_i)` the top-k (largest algebraic) eigenpairs of the Hessian,
    :math:`\eta` = ``step_size`` and :math:`\delta` = ``damping``. H is inverted only inside the
    top subspace; the bulk component :math:`g - Pg` of the incoming update is **dropped**. The
    output already carries the minus sign: use it as the whole optimizer
    (``optax.apply_updates(params, u)``), or after transformations that precondition g.

    **Negative and tiny eigenvalues.** The denominator is :math:`|\lambda_i| + \delta`
    (saddle-free Newton, Dauphin et al. 2014): along a negative-curvature direction the step
    still descends the gradient instead of climbing towards the saddle, with the curvature's
    magnitude as step scale. (With the default "top" eigenvectors, negative eigenvalues only
    appear when H has fewer than k positive ones.) ``damping >= 0``: with ``damping > 0`` each
    direction's gain is at most :math:`\eta/\delta`. With ``damping = 0`` the inverse is a
    pseudo-inverse: directions whose :math:`|\lambda_i| \le \sqrt{\varepsilon}\max_j|\lambda_j|`
    (ε of the basis dtype; below the eigensolver's accuracy floor) get no step and count as
    removed; so the step is finite whatever the spectrum, but a rank-deficient top block is
    silently truncated: use ``damping > 0`` for nonconvex losses.

    **k = p.** :func:`hessian_subspace.krylov.top_eigenpairs` needs k < p, so for k equal to
    the number of parameters the Hessian is built densely from p HVPs
    (:func:`hessian_subspace.curvature.dense_matrix`) and diagonalised by ``eigh``; then with
    ``damping=0`` and ``step_size=1`` one step lands on the minimum of a positive definite
    quadratic. Only for tiny models.

    Args:
      k: subspace dimension, ``1 <= k <= p``.
      damping: δ >= 0 (see above).
      hessian_fn: ``hessian_fn(params, curvature_data) -> matvec`` (see
        :func:`project_onto_subspace`).
      key: a JAX PRNG key for the eigensolver's start vectors.
      refresh_every: updates between eigenpair recomputations (default 1: exact Newton).
      step_size: η > 0.
      num_steps: Krylov dimension cap per refresh (default: krylov's).
      tol: eigensolver relative-residual tolerance (default: krylov's).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` like :func:`project_onto_subspace`'s, with
      ``update(updates, state, params, *, curvature_data)``; ``state.removed_fraction`` is the
      dropped part of g, :math:`\|g - P_{used}\,g\|^2/\|g\|^2` (:math:`P_{used}` over the
      directions that got a step: all k when ``damping > 0``). Refreshes warm-start from the
      previous basis.

    Raises:
      ValueError: naming the argument, for bad ``k``, ``damping``, ``refresh_every``,
        ``step_size``, ``num_steps``, ``tol``, ``hessian_fn`` or ``key``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from hessian_subspace.training import optim
      >>> a = jnp.array([[2.0, 1.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
      >>> target = jnp.array([1.0, -1.0, 2.0])  # loss 0.5 (θ - target)ᵀ a (θ - target)
      >>> tx = optim.low_rank_newton(3, 0.0, hessian_fn=lambda p, a: (lambda v: a @ v),
      ...                            key=jax.random.key(0))
      >>> theta = jnp.zeros(3)
      >>> g = a @ (theta - target)
      >>> u, state = jax.jit(tx.update)(g, tx.init(theta), theta, curvature_data=a)
      >>> (theta + u).round(4)
      Array([ 1., -1.,  2.], dtype=float32)

    References:
      Gur-Ari, Roberts, Dyer (2018), eq. 11; Dauphin et al. (2014), saddle-free Newton.
    """
    k = _tree.check_int("k", k, 1)
    damping = _check_float("damping", damping, positive=False)
    refresh_every = _tree.check_int("refresh_every", refresh_every, 1)
    step_size = _check_float("step_size", step_size, positive=True)
    _check_hessian_fn(hessian_fn)
    key_data, decode_key = _key_codec(key)
    num_steps, tol, _ = _check_solver_args(k, num_steps, tol, 1)
    refresh = _make_refresh(hessian_fn, decode_key, k=k, refresh_every=refresh_every,
                            num_steps=num_steps, tol=tol, block_size=1, warm_start=True)

    def init_fn(params: PyTree) -> SubspaceState:
        return _init(params, k, key_data)

    def update_fn(updates, state: SubspaceState, params=None, *, curvature_data=None,
                  **extra_args):
        _require("low_rank_newton", params, curvature_data, extra_args)
        _check_like(updates, params)
        state = refresh(state, params, curvature_data)
        g, unravel = _flat(updates)
        basis = state.basis
        g_b = g.astype(basis.dtype)
        mag = jnp.abs(state.eigenvalues)
        if damping > 0:
            used = jnp.ones_like(mag, dtype=bool)
        else:
            floor = jnp.sqrt(jnp.finfo(basis.dtype).eps) * jnp.max(mag)
            used = mag > floor
        coef = jnp.where(used, jnp.dot(basis, g_b, precision=_HIGHEST), 0.0)
        kept = jnp.dot(coef, basis, precision=_HIGHEST)
        gain = jnp.where(used, 1.0 / jnp.where(used, mag + damping, 1.0), 0.0)
        out = -step_size * jnp.dot(coef * gain, basis, precision=_HIGHEST)
        state = state._replace(count=optax.safe_int32_increment(state.count),
                               removed_fraction=_fraction(g_b - kept, g_b))
        return unravel(out.astype(g.dtype)), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
