r"""Exchangeable trace and diagonal estimators (XTrace, XDiag): every product serves both as
part of a low-rank sketch and as a random probe.

With ``m`` products, ``s = m / 2`` Rademacher vectors :math:`\omega_i` give :math:`Y = H\Omega`
and an orthonormal basis :math:`Q` of its range (``s`` products); :math:`Z = HQ` (``s`` more)
gives :math:`T = Q^\top H Q`. Hutch++ (:func:`~hessian_subspace.hutchinson_trace` with
``deflate``) would spend the sketch on the low-rank part and fresh probes on the rest. XTrace
uses each :math:`\omega_i` for both: leaving it out of the sketch,
:math:`Q_{(i)} = \mathrm{orth}(H\Omega_{-i})`, and

.. math:: t_i = \mathrm{Tr}(Q_{(i)}^\top H Q_{(i)})
          + \omega_i^\top (I - Q_{(i)}Q_{(i)}^\top) H (I - Q_{(i)}Q_{(i)}^\top)\,\omega_i

is unbiased for :math:`\mathrm{Tr}\,H` (:math:`Q_{(i)}` does not depend on :math:`\omega_i`),
and the estimate is their mean. No product beyond the ``m`` is needed: :math:`Q_{(i)}` spans
:math:`Q` less one direction :math:`s_i` (the unit vector of :math:`\mathbb{R}^s` orthogonal
to every column of :math:`R` but the i-th, :math:`Y^\top = QR`), so every term is an
``s × s`` computation on :math:`T`, :math:`R` and :math:`Q^\top\Omega`. XDiag is the same
with :math:`\mathrm{diag}(Q_{(i)}Q_{(i)}^\top H) + \omega_i \odot (I - Q_{(i)}Q_{(i)}^\top)
H\omega_i` (Bekas et al.'s estimator on the residual).

The standard error is the spread of the :math:`t_i` over :math:`\sqrt{s}`, as the authors
state it: the :math:`t_i` share most of their sketch, so it is an estimate of the error, not a
bound (tests/test_xtrace.py checks it against repetitions). ``deflate=`` (known eigenpairs,
exactly as in :func:`~hessian_subspace.hutchinson_trace`) takes their part out first; the
sketch then looks for what they left.

Reference:
  Epperly, Tropp, Webber, "XTrace: making the most of every sample in stochastic trace
  estimation", SIAM J. Matrix Anal. Appl. 45(1), 2024 (XTrace, XDiag).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import flatten_util

from hessian_subspace import _linalg, _probes, _tree
from hessian_subspace.spectrum import DiagonalEstimate, TraceEstimate, default_probe_batch

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


def _left_out_directions(r: jax.Array) -> jax.Array:
    """Rows s_i: unit vectors orthogonal to every column of ``r`` (s × s) but the i-th (the
    last column of a complete QR of the other columns; any unit vector orthogonal to them
    when those are rank deficient)."""
    s = r.shape[0]
    others = np.array([[j for j in range(s) if j != i] for i in range(s)])  # (s, s - 1)

    def one(cols):
        q, _ = jnp.linalg.qr(r[:, cols], mode="complete")
        return q[:, -1]

    return jax.vmap(one)(jnp.asarray(others))


def _sketch(matvec, like, key, deflation, num_matvecs, probe_batch):
    """The m products and the s × s quantities both estimators share, in at least float32
    (QR has no half-precision kernels; a bfloat16 model's products are promoted)."""
    like_flat, _ = flatten_util.ravel_pytree(like)
    dtype = jnp.promote_types(like_flat.dtype, jnp.float32)
    work = like_flat.astype(dtype)
    mv, _ = _tree.flat_matvec(matvec, like, dtype)
    product = functools.partial(_probes.deflated_product, mv, deflation)
    s = num_matvecs // 2
    keys = jax.random.split(key, s)
    omega = jax.vmap(lambda k: _probes.probe(k, work, "rademacher"))(keys)
    y = jax.lax.map(product, omega, batch_size=probe_batch)  # (s, p): rows H ω_i
    q, r = jnp.linalg.qr(y.T)  # Yᵀ = Q R, Q (p, s)
    q = q.T  # rows
    z = jax.lax.map(product, q, batch_size=probe_batch)  # (s, p): rows H q_j
    t = jnp.dot(q, z.T, precision=_HIGHEST)
    t = 0.5 * (t + t.T)  # Qᵀ H Q
    w = jnp.dot(q, omega.T, precision=_HIGHEST)  # column i: Qᵀ ω_i
    left = _left_out_directions(r)  # rows s_i
    return work, omega, y, q, z, r, t, w, left


def _trace_samples(omega, y, r, t, w, left):
    """XTrace's leave-one-out estimates t_i (module docstring), from s × s algebra."""
    # Tr(Q_(i)ᵀ H Q_(i)) = Tr T - s_iᵀ T s_i.
    low = jnp.trace(t) - jnp.einsum("ij,jk,ik->i", left, t, left, precision=_HIGHEST)
    # The residual probe (I - Q P_i Qᵀ) ω_i with P_i = I - s_i s_iᵀ: Qᵀ of it is w_i - P_i w_i.
    v = w.T - jnp.sum(left * w.T, axis=1, keepdims=True) * left  # rows P_i w_i
    omega_y = jnp.sum(omega * y, axis=1)  # ω_iᵀ H ω_i
    cross = jnp.sum(r.T * v, axis=1)  # (Qᵀ H ω_i)ᵀ P_i w_i, with Qᵀ H ω_i = R[:, i]
    quad = jnp.einsum("ij,jk,ik->i", v, t, v, precision=_HIGHEST)
    return low + omega_y - 2.0 * cross + quad


def _mean_and_error(samples, axis=0):
    s = samples.shape[axis]
    return jnp.mean(samples, axis=axis), jnp.std(samples, axis=axis, ddof=1) / jnp.sqrt(s)


@functools.partial(jax.jit, static_argnames=("num_matvecs", "probe_batch"))
def _xtrace(matvec, like, key, deflation, *, num_matvecs, probe_batch):
    work, omega, y, _, _, r, t, w, left = _sketch(matvec, like, key, deflation, num_matvecs,
                                                  probe_batch)
    estimate, error = _mean_and_error(_trace_samples(omega, y, r, t, w, left))
    exact, _ = _probes.exact_part(deflation, work)
    return exact + estimate, error


@functools.partial(jax.jit, static_argnames=("num_matvecs", "probe_batch"))
def _xdiag(matvec, like, key, deflation, *, num_matvecs, probe_batch):
    work, omega, y, q, z, r, t, w, left = _sketch(matvec, like, key, deflation, num_matvecs,
                                                  probe_batch)
    _, unravel = flatten_util.ravel_pytree(like)
    # diag(Q P_i Qᵀ H), in rows: Σ_j q_j ⊙ z_j less (Q s_i) ⊙ (Z s_i) (Q, Z as p × s).
    full = jnp.sum(q * z, axis=0)
    qs = jnp.dot(left, q, precision=_HIGHEST)  # rows Q s_i  (s, p)
    zs = jnp.dot(left, z, precision=_HIGHEST)
    # (I - Q P_i Qᵀ) H ω_i = y_i - Q P_i R[:, i].
    c = r.T - jnp.sum(left * r.T, axis=1, keepdims=True) * left  # rows P_i R[:, i]
    resid = y - jnp.dot(c, q, precision=_HIGHEST)
    samples = full[None, :] - qs * zs + omega * resid  # (s, p): row i is XDiag's d_i
    diagonal, error = _mean_and_error(samples)
    trace, trace_error = _mean_and_error(_trace_samples(omega, y, r, t, w, left))
    exact_trace, exact_diag = _probes.exact_part(deflation, work)
    return DiagonalEstimate(diagonal=unravel(exact_diag + diagonal),
                            standard_error=unravel(error), trace=exact_trace + trace,
                            trace_standard_error=trace_error)


def _checked(matvec, key, num_matvecs, like, probe_batch, deflate):
    matvec = _tree.as_operator(matvec)
    like = _probes.template(matvec, like)
    _tree.check_key("key", key)
    num_matvecs = _tree.check_int("num_matvecs", num_matvecs, 4)
    if num_matvecs % 2:
        raise ValueError(f"`num_matvecs` must be even (half sketch, half its products), got "
                         f"{num_matvecs}")
    if probe_batch is not None:
        probe_batch = _tree.check_int("probe_batch", probe_batch, 1)
    like_flat, _ = flatten_util.ravel_pytree(like)
    if num_matvecs // 2 > like_flat.size:
        raise ValueError(f"`num_matvecs` / 2 = {num_matvecs // 2} exceeds the dimension "
                         f"{like_flat.size}: compute the trace exactly instead")
    deflation = _probes.deflation(deflate, like)
    _linalg.check_operator_output(matvec, like)
    if probe_batch is None:
        probe_batch = default_probe_batch(matvec, like, num_matvecs // 2, 2)
    return matvec, like, num_matvecs, deflation, probe_batch


def xtrace(matvec: Callable[[PyTree], PyTree], key: jax.Array, *, num_matvecs: int,
           like: PyTree = None, probe_batch: int | None = None, deflate=None) -> TraceEstimate:
    r"""XTrace (Epperly, Tropp, Webber 2024): the trace from ``num_matvecs`` products, each used
    both in a low-rank sketch of H and as a probe of what the sketch misses (module docstring).
    Unbiased; far below Hutchinson's error when a few eigenvalues carry most of
    :math:`\|H\|_F` (a Hessian's outliers), Hutchinson's order otherwise. Memory: 4 ·
    ``num_matvecs / 2`` vectors of p numbers at once (probes, their products, the basis and
    its products); the s leave-one-out directions cost s QRs of s × (s − 1), O(s⁴),
    negligible below s ≈ 200. Computed in at least float32.

    Args:
      matvec: ``v -> H v`` on pytrees like ``like``.
      key: PRNG key.
      num_matvecs: products spent, even, >= 4: ``num_matvecs / 2`` sketch vectors, as many
        products with their orthonormal basis.
      like: template of the vectors (defaults to ``matvec.like``).
      probe_batch: products vmapped together; default :func:`default_probe_batch`.
      deflate: known eigenpairs (an :class:`~hessian_subspace.Eigenpairs` or ``(values,
        vectors)``) whose part is taken exactly; the sketch then runs on the rest.

    Returns:
      :class:`~hessian_subspace.TraceEstimate` ``(estimate, standard_error)``; the standard
      error is the spread of the ``num_matvecs / 2`` leave-one-out estimates over its square
      root (an estimate, as in the paper). A non-finite product raises ``FloatingPointError``
      (called outside jit).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> a = jnp.diag(jnp.array([5.0, 4.0, 0.0, 0.0, 0.0, 0.0]))  # rank 2: exact with 3 vectors
      >>> est = xtrace(lambda v: a @ v, jax.random.key(0), num_matvecs=6, like=jnp.zeros(6))
      >>> round(float(est.estimate), 4), round(float(est.standard_error), 4)
      (9.0, 0.0)
    """
    matvec, like, num_matvecs, deflation, probe_batch = _checked(
        matvec, key, num_matvecs, like, probe_batch, deflate)
    return _probes.finite(TraceEstimate(*_xtrace(matvec, like, key, deflation,
                                                 num_matvecs=num_matvecs,
                                                 probe_batch=probe_batch)))


def xdiag(matvec: Callable[[PyTree], PyTree], key: jax.Array, *, num_matvecs: int,
          like: PyTree = None, probe_batch: int | None = None, deflate=None
          ) -> DiagonalEstimate:
    r"""XDiag (Epperly, Tropp, Webber 2024): the diagonal from ``num_matvecs`` products, the
    exchangeable form of :func:`~hessian_subspace.hutchinson_diagonal` with a low-rank sketch
    (module docstring). Unbiased per entry. Memory: about 8 · ``num_matvecs / 2`` vectors of
    p numbers at once (the sketch, its products, the leave-one-out estimates for the standard
    errors), against :func:`xtrace`'s 4.

    Args:
      matvec, key, num_matvecs, like, probe_batch, deflate: as in :func:`xtrace`.

    Returns:
      :class:`~hessian_subspace.DiagonalEstimate`: ``diagonal`` and ``standard_error`` per
      entry (shaped like ``like``); ``trace`` and its standard error are :func:`xtrace`'s
      from the same products (not the diagonal's sum, the one-sided form
      :math:`\mathrm{Tr}(\Pi H) + \omega^\top(I-\Pi)H\omega`, which has more variance).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> a = jnp.diag(jnp.array([5.0, 4.0, 0.0, 0.0, 0.0, 0.0]))
      >>> d = xdiag(lambda v: a @ v, jax.random.key(0), num_matvecs=6, like=jnp.zeros(6))
      >>> [round(x, 4) for x in d.diagonal.tolist()]
      [5.0, 4.0, 0.0, 0.0, 0.0, 0.0]
    """
    matvec, like, num_matvecs, deflation, probe_batch = _checked(
        matvec, key, num_matvecs, like, probe_batch, deflate)
    return _probes.finite(_xdiag(matvec, like, key, deflation, num_matvecs=num_matvecs,
                                 probe_batch=probe_batch))


__all__ = ["xdiag", "xtrace"]
