r"""The paper's metrics: how much of the gradient lies in the top Hessian subspace, and how fast
that subspace moves.

Vectors (gradients, Hg) may be pytrees or flat arrays; bases are ``(k, p)`` arrays with
**orthonormal rows** (as returned by :func:`top_eigenpairs`) or pytrees whose leaves have a
leading axis k. Called on concrete values, the functions check their input: a basis whose rows
are not orthonormal to :data:`ORTHONORMALITY_TOL` is a ``ValueError``, and a zero gradient (or
Hg) an :class:`UndefinedMetricError` (f_top and overlap(g, Hg) are 0/0 there); under ``jit``
these are not checked, and a zero vector gives NaN. All functions are pure and jit-compatible;
inner products use ``Precision.HIGHEST``. Notation follows Gur-Ari, Roberts, Dyer (2018):
:math:`P` is the orthogonal projector onto the span of a basis.

Computed eigenvectors are not exact, so the metrics of a computed subspace carry an error:
:func:`subspace_error_bound` turns Ritz residuals and the next Ritz value into bounds on the
projector error (Davis-Kahan), and :func:`gradient_fraction_bound` and
:func:`subspace_overlap_bound` into error bars on f_top and on eq. 5.

References:
  Gur-Ari, Roberts, Dyer, "Gradient Descent Happens in a Tiny Subspace", arXiv:1812.04754,
  eqs. 2-5 and 12.
  Knyazev, Argentati, "Principal angles between subspaces in an A-based scalar product",
  SIAM J. Sci. Comput. 23 (2002) (the sine/cosine formula for principal angles).
  Davis, Kahan, "The rotation of eigenvectors by a perturbation. III", SIAM J. Numer. Anal. 7
  (1970) (the sin θ theorem behind the error bars).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hessian_subspace import _tree

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


def _vec(x: PyTree) -> jax.Array:
    return _tree.as_flat(x)


class UndefinedMetricError(ValueError):
    """A metric of a zero vector: f_top, c_i² or overlap(g, Hg) of g = 0 (or Hg = 0) is 0/0."""


# How far from orthonormal a basis may be: max |B Bᵀ − I| <= ORTHONORMALITY_TOL. It catches
# bases that are not orthonormal by construction (unnormalised or non-orthogonal rows), while
# a float32 basis at rounding level (~1e-6, also when cast to float64) passes; a deviation δ
# moves f_top and eq. 5 by O(δ).
ORTHONORMALITY_TOL = 1e-3


def _rows(basis: PyTree, name: str) -> jax.Array:
    """``basis`` as ``(k, p)`` rows; a plain array must be 2-D (shapes are static, so this
    is checked before any tracing, under jit too)."""
    if isinstance(basis, (jax.Array, np.ndarray)) and np.ndim(basis) != 2:
        hint = "; for one vector pass `x[None]`" if np.ndim(basis) == 1 else ""
        raise ValueError(f"`{name}` must be a (k, p) array of orthonormal rows (or a pytree of "
                         f"leaves stacked along a leading k axis), got shape "
                         f"{np.shape(basis)}{hint}.")
    return _tree.as_flat_rows(basis)


def _orthonormal(rows: jax.Array, name: str) -> None:
    """A concrete basis must have orthonormal rows (:data:`ORTHONORMALITY_TOL`); a traced one
    is not checked (the formulas then assume it). Called after the shape checks."""
    if _tree.is_concrete(rows) and jnp.issubdtype(rows.dtype, jnp.floating):
        gram = jnp.dot(rows, rows.T, precision=_HIGHEST)
        err = float(jnp.max(jnp.abs(gram - jnp.eye(rows.shape[0], dtype=rows.dtype))))
        if not err <= ORTHONORMALITY_TOL:
            raise ValueError(
                f"`{name}` must have orthonormal rows: max |B Bᵀ − I| = {err:.3g} > "
                f"{ORTHONORMALITY_TOL:g}; orthonormalise it first (e.g. "
                f"jnp.linalg.qr(B.T)[0].T), or pass eigenvectors as returned by "
                f"top_eigenpairs.")


def _nonzero(name: str, x: jax.Array, what: str) -> None:
    """A concrete zero vector makes the metric 0/0: an :class:`UndefinedMetricError` naming
    it (traced values are not checked; the metric is then NaN)."""
    if _tree.is_concrete(x) and not bool(jnp.any(x != 0)):
        raise UndefinedMetricError(f"`{name}` is the zero vector: {what} is 0/0, undefined.")


def _same_dim(name_a: str, p_a: int, name_b: str, p_b: int) -> None:
    """Both live in parameter space of the same dimension, or a ValueError naming them."""
    if p_a != p_b:
        raise ValueError(
            f"`{name_a}` has dimension p = {p_a} but `{name_b}` has p = {p_b}; both must live "
            f"in the same parameter space (bases are (k, p) rows: a (p, k) array of columns "
            f"needs `.T`).")


def _common(*arrays):
    dtype = jnp.result_type(*arrays)
    return [a.astype(dtype) for a in arrays]


def eigenvector_overlaps(g: PyTree, eigenvectors: PyTree) -> jax.Array:
    r"""Squared cosines :math:`c_i^2 = (v_i\cdot g)^2/\|g\|^2` (eq. 12), one per basis row.

    Over a full orthonormal basis they sum to 1; over the top k they sum to f_top.

    Args:
      g: gradient, pytree or flat ``(p,)``.
      eigenvectors: ``(k, p)`` orthonormal rows (or a stacked pytree).

    Returns:
      ``(k,)`` array in [0, 1].

    Example:
      >>> import jax.numpy as jnp
      >>> c2 = eigenvector_overlaps(jnp.array([3.0, 4.0, 0.0]), jnp.eye(3)[:2])
      >>> [round(float(c), 4) for c in c2]
      [0.36, 0.64]
    """
    g, v = _common(_vec(g), _rows(eigenvectors, "eigenvectors"))
    _same_dim("eigenvectors", v.shape[1], "g", g.shape[0])
    _orthonormal(v, "eigenvectors")
    _nonzero("g", g, "(v_i·g)²/‖g‖²")
    coeffs = jnp.dot(v, g, precision=_HIGHEST)
    return coeffs**2 / jnp.dot(g, g, precision=_HIGHEST)


def gradient_fraction(g: PyTree, eigenvectors: PyTree) -> jax.Array:
    r""":math:`f_{top} = \|P g\|^2/\|g\|^2` (eq. 2): the fraction of the gradient's squared norm
    in the span of the (orthonormal) ``eigenvectors``.

    Args:
      g: gradient, pytree or flat ``(p,)``.
      eigenvectors: ``(k, p)`` orthonormal rows (or a stacked pytree).

    Returns:
      Scalar in [0, 1].

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(gradient_fraction(jnp.array([3.0, 4.0, 0.0]), jnp.eye(3)[:1])), 4)
      0.36
    """
    return jnp.sum(eigenvector_overlaps(g, eigenvectors))


def hessian_gradient_overlap(g: PyTree, hg: PyTree) -> jax.Array:
    r"""overlap(g, Hg) :math:`= g^\top H g / (\|g\|\,\|Hg\|)` (eq. 3), in [-1, 1].

    Args:
      g: gradient, pytree or flat.
      hg: the Hessian-gradient product H g, same structure as ``g``.

    Returns:
      Scalar cosine between g and Hg.

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(hessian_gradient_overlap(jnp.array([1.0, 1.0]), jnp.array([1.0, 0.0]))), 4)
      0.7071
    """
    g, hg = _common(_vec(g), _vec(hg))
    _same_dim("hg", hg.shape[0], "g", g.shape[0])
    _nonzero("g", g, "gᵀHg/(‖g‖‖Hg‖)")
    _nonzero("hg", hg, "gᵀHg/(‖g‖‖Hg‖)")
    num = jnp.dot(g, hg, precision=_HIGHEST)
    return num / (jnp.linalg.norm(g) * jnp.linalg.norm(hg))


def subspace_overlap(basis_a: PyTree, basis_b: PyTree) -> jax.Array:
    r"""Overlap of two subspaces, :math:`\mathrm{Tr}(P_a P_b)/\sqrt{k_a k_b}` (eq. 5).

    Equals :math:`\|A B^\top\|_F^2/\sqrt{k_a k_b}` for orthonormal rows, which is invariant to
    signs, order and any rotation within either basis: 1 for the same subspace, 0 for
    orthogonal ones, about :math:`\sqrt{k_a k_b}/p` for random ones.

    Args:
      basis_a: ``(k_a, p)`` orthonormal rows (or a stacked pytree).
      basis_b: ``(k_b, p)`` orthonormal rows.

    Returns:
      Scalar in [0, 1].

    Example:
      >>> import jax.numpy as jnp
      >>> float(subspace_overlap(jnp.eye(4)[:2], jnp.eye(4)[1:3]))
      0.5
    """
    a, b = _common(_rows(basis_a, "basis_a"), _rows(basis_b, "basis_b"))
    _same_dim("basis_a", a.shape[1], "basis_b", b.shape[1])
    _orthonormal(a, "basis_a")
    _orthonormal(b, "basis_b")
    return jnp.sum(_squared_cosines(a, b)) / jnp.sqrt(a.shape[0] * b.shape[0])


def _squared_cosines(a: jax.Array, b: jax.Array) -> jax.Array:
    """``(A B^T)**2``: for orthonormal rows, Tr(P_a P_b) is its sum (eq. 5's numerator)."""
    return jnp.dot(a, b.T, precision=_HIGHEST) ** 2


def nested_subspace_overlaps(basis_a: PyTree, basis_b: PyTree) -> jax.Array:
    r""":func:`subspace_overlap` between the spans of the leading d rows of two bases, for every
    d = 1 .. min(k_a, k_b), from one product: ``out[d - 1]`` :math:`=
    \mathrm{Tr}(P_{a,d} P_{b,d})/d` (eq. 5 for the top-d subspaces when the rows are
    eigenvectors in descending order, as in the paper's Figs. 2-3).

    Args:
      basis_a: ``(k_a, p)`` orthonormal rows, ordered (e.g. by eigenvalue).
      basis_b: ``(k_b, p)`` orthonormal rows, ordered.

    Returns:
      ``(min(k_a, k_b),)`` overlaps in [0, 1].

    Example:
      >>> import jax.numpy as jnp
      >>> b = jnp.eye(4)[jnp.array([0, 2, 1])]
      >>> [float(x) for x in nested_subspace_overlaps(jnp.eye(4)[:3], b)]
      [1.0, 0.5, 1.0]
    """
    a, b = _common(_rows(basis_a, "basis_a"), _rows(basis_b, "basis_b"))
    _same_dim("basis_a", a.shape[1], "basis_b", b.shape[1])
    _orthonormal(a, "basis_a")
    _orthonormal(b, "basis_b")
    r = min(a.shape[0], b.shape[0])
    cumulative = jnp.cumsum(jnp.cumsum(_squared_cosines(a[:r], b[:r]), axis=0), axis=1)
    return jnp.diagonal(cumulative) / jnp.arange(1, r + 1, dtype=a.dtype)


def principal_angles(basis_a: PyTree, basis_b: PyTree) -> jax.Array:
    r"""Principal angles between two subspaces, ascending, in radians.

    Uses cosines (singular values of :math:`A B^\top`) for large angles and sines (singular
    values of :math:`B - B A^\top A`) for small ones, so tiny angles keep full relative
    accuracy (Knyazev & Argentati 2002).

    Args:
      basis_a: ``(k_a, p)`` orthonormal rows.
      basis_b: ``(k_b, p)`` orthonormal rows.

    Returns:
      ``(min(k_a, k_b),)`` angles in [0, π/2].

    Example:
      >>> import jax.numpy as jnp
      >>> [round(float(a), 4) for a in principal_angles(jnp.eye(3)[:2], jnp.eye(3)[1:])]
      [0.0, 1.5708]
    """
    a, b = _common(_rows(basis_a, "basis_a"), _rows(basis_b, "basis_b"))
    _same_dim("basis_a", a.shape[1], "basis_b", b.shape[1])
    _orthonormal(a, "basis_a")
    _orthonormal(b, "basis_b")
    if a.shape[0] < b.shape[0]:
        a, b = b, a  # b is the smaller basis; angles are symmetric.
    r = min(a.shape[0], b.shape[0])
    cos = jnp.linalg.svd(jnp.dot(a, b.T, precision=_HIGHEST), compute_uv=False)[:r]
    cos = jnp.sort(jnp.clip(cos, 0.0, 1.0))[::-1]
    resid = b - jnp.dot(jnp.dot(b, a.T, precision=_HIGHEST), a, precision=_HIGHEST)
    sin = jnp.linalg.svd(resid, compute_uv=False)[:r]
    sin = jnp.sort(jnp.clip(sin, 0.0, 1.0))
    return jnp.where(cos**2 < 0.5, jnp.arccos(cos), jnp.arcsin(sin))


def random_vertex_overlap(eigenvalues: jax.Array) -> jax.Array:
    r"""Expected overlap(g, Hg) if g sat on a random vertex of the top subspace (eq. 4):
    :math:`\sum_i\lambda_i/\sqrt{k\sum_i\lambda_i^2}`; ≈ 0.87 for :math:`\lambda_i\propto i`.

    Args:
      eigenvalues: ``(k,)`` top eigenvalues.

    Returns:
      Scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(random_vertex_overlap(jnp.arange(1.0, 1001.0))), 3)
      0.866
    """
    lam = jnp.asarray(eigenvalues)
    return jnp.sum(lam) / jnp.sqrt(lam.shape[0] * jnp.sum(lam**2))


leaf_slices = _tree.leaf_slices


def mass_by_leaf(vector: PyTree, like: PyTree) -> dict[str, jax.Array]:
    r"""Squared norm of a vector on each parameter leaf, :math:`\|v_\ell\|^2` by leaf path: how
    an eigenvector (or the gradient) spreads over the layers (the paper's Figs. 6-7).

    Args:
      vector: flat ``(p,)`` in ``ravel_pytree`` order of ``like``, or a pytree like ``like``.
      like: the parameters (any pytree: dicts, flax, nnx states, Equinox modules).

    Returns:
      ``{"dense_0/kernel": mass, ...}`` ("/"-joined key paths, :func:`leaf_slices`); the masses
      of a unit vector sum to 1.

    Example:
      >>> import jax.numpy as jnp
      >>> like = {"a": jnp.zeros(2), "b": {"c": jnp.zeros(1)}}
      >>> {k: round(float(v), 2) for k, v in mass_by_leaf(jnp.array([0.6, 0.0, 0.8]), like).items()}
      {'a': 0.36, 'b/c': 0.64}
    """
    v = _vec(vector)
    return {name: jnp.sum(v[a:b] ** 2) for name, a, b in leaf_slices(like)}


# --------------------------------------------------------------------------------------------
# Error bars from Ritz residuals.


class SubspaceErrorBound(NamedTuple):
    """Output of :func:`subspace_error_bound`: how far the computed top-k projector
    :math:`\\hat P` can be from the exact one :math:`P` (θ_i: principal angles between them)."""

    spectral: jax.Array  # (); bound on ||P̂ - P||_2 = max_i sin θ_i.
    frobenius: jax.Array  # (); bound on ||P̂ - P||_F = sqrt(2) ||sin Θ||_F.
    sine_sum: jax.Array  # (); bound on Σ_i sin θ_i = ||P̂ - P||_* / 2 (trace norm).
    gap: jax.Array  # (); δ = λ̂_k - λ̂_{k+1} - ρ; if <= 0 there is no bound (the above are inf).
    k: jax.Array  # () int; dimension of the subspace.


def subspace_error_bound(residuals: jax.Array, eigenvalues: jax.Array,
                         next_eigenvalue: jax.Array, next_residual: jax.Array
                         ) -> SubspaceErrorBound:
    r"""A posteriori bound on the error of a computed top-k eigenspace, from Ritz residuals.

    Let :math:`\hat V` (p x k) hold orthonormal computed eigenvectors with values
    :math:`\hat\lambda_1..\hat\lambda_k`, residuals :math:`r_i = \|H\hat v_i -
    \hat\lambda_i\hat v_i\|`, :math:`R = H\hat V - \hat V\hat\Lambda`
    (:math:`\|R\|_F = (\sum_i r_i^2)^{1/2}`), and :math:`(\hat\lambda_{k+1}, r_{k+1})` the next
    Ritz pair, with its vector orthonormal to :math:`\hat V`. :math:`P` projects on the exact
    top-k eigenspace :math:`V` of H, assumed separated: :math:`\lambda_k > \lambda_{k+1}`.

    *Gap.* Kahan's theorem (Parlett, *The Symmetric Eigenvalue Problem*, Thm. 11.5.1) applied to
    the k+1 Ritz pairs: k+1 eigenvalues of H lie, in order, within
    :math:`\rho = \|[R, r_{k+1}]\|_2 \le (\|R\|_F^2 + r_{k+1}^2)^{1/2}` of the Ritz values. If
    they are the top k+1 (**assumption**: Lanczos missed none of them, which no residual can
    reveal: an eigenvector orthogonal to the Krylov space leaves every residual small), then
    :math:`\lambda_{k+1} \le \hat\lambda_{k+1} + \rho`, and the computed values, all
    :math:`\ge \hat\lambda_k = \min_i \hat\lambda_i`, are separated from the rest of the
    spectrum by :math:`\delta = \hat\lambda_k - \hat\lambda_{k+1} - \rho`.

    *Angles.* With :math:`U_\perp` the eigenvectors of :math:`\lambda_{k+1}, \dots`,
    :math:`U_\perp^\top R = \Lambda_\perp X - X\hat\Lambda` for :math:`X = U_\perp^\top\hat V`,
    whose singular values are the :math:`\sin\theta_i`; spectra separated by δ give
    :math:`\|\Lambda_\perp X - X\hat\Lambda\| \ge \delta\|X\|` (Davis & Kahan 1970, sin θ
    theorem), so :math:`\|\sin\Theta\|_F \le \|R\|_F/\delta`, and also
    :math:`\max_i\sin\theta_i \le \|R\|_2/\delta \le \|R\|_F/\delta`. For equal-rank projectors
    the eigenvalues of :math:`\hat P - P` are :math:`\pm\sin\theta_i`, hence

    .. math:: \|\hat P - P\|_2 \le \frac{\|R\|_F}{\delta},\quad
              \|\hat P - P\|_F \le \frac{\sqrt2\,\|R\|_F}{\delta},\quad
              \sum_i \sin\theta_i \le \frac{\sqrt k\,\|R\|_F}{\delta}.

    The bounds are first order in the residuals; values >= 1 (spectral) say nothing, since
    :math:`\|\hat P - P\|_2 \le 1` always.

    Args:
      residuals: ``(k,)`` residual norms of the computed top-k pairs.
      eigenvalues: ``(k,)`` their Ritz values (any order).
      next_eigenvalue: scalar :math:`\hat\lambda_{k+1}`, the next Ritz value.
      next_residual: scalar :math:`r_{k+1}`, its residual norm (0 if ``next_eigenvalue`` is
        known to bound the rest of the spectrum from above, e.g. an exact eigenvalue).

    Returns:
      A :class:`SubspaceErrorBound`; its bounds are ``inf`` when :math:`\delta \le 0`.

    Example:
      >>> import jax.numpy as jnp
      >>> b = subspace_error_bound(jnp.array([1e-3, 1e-3]), jnp.array([10.0, 9.0]), 1.0, 1e-3)
      >>> print(f"{float(b.gap):.4f} {float(b.spectral):.2e}")
      7.9983 1.77e-04

    References:
      C. Davis, W. M. Kahan, "The rotation of eigenvectors by a perturbation. III", SIAM J.
      Numer. Anal. 7 (1970). B. N. Parlett, *The Symmetric Eigenvalue Problem* (1998), §11.5.
    """
    return jax.tree_util.tree_map(
        lambda x: x[-1],
        subspace_error_bounds(jnp.append(jnp.asarray(residuals), next_residual),
                              jnp.append(jnp.asarray(eigenvalues), next_eigenvalue)))


def subspace_error_bounds(residuals: jax.Array, eigenvalues: jax.Array) -> SubspaceErrorBound:
    r""":func:`subspace_error_bound` for every leading block of m computed Ritz pairs at once.

    Entry d - 1 bounds the span of pairs 1..d, with pair d + 1 as the next one, for
    d = 1 .. m - 1 (e.g. every top-d subspace of eq. 5 from one Lanczos run). Vectorised
    (cumulative sums and minima), so one compilation serves every d.

    Args:
      residuals: ``(m,)`` residual norms, in the order of ``eigenvalues``.
      eigenvalues: ``(m,)`` Ritz values, largest first (the blocks are leading entries).

    Returns:
      A :class:`SubspaceErrorBound` whose fields have shape ``(m - 1,)``.

    Example:
      >>> import jax.numpy as jnp
      >>> b = subspace_error_bounds(jnp.zeros(3), jnp.array([3.0, 2.0, 2.0]))
      >>> b.spectral.tolist(), b.gap.tolist()  # exact pairs; no gap between 2 and 2
      ([0.0, inf], [1.0, 0.0])
    """
    r = jnp.asarray(residuals)
    dtype = jnp.result_type(r, jnp.asarray(eigenvalues), float)
    r = r.astype(dtype)
    lam = jnp.asarray(eigenvalues, dtype)
    res = jnp.sqrt(jnp.cumsum(r**2))[:-1]  # ||R_d||_F for d = 1 .. m-1.
    rho = jnp.sqrt(res**2 + r[1:] ** 2)
    gap = jax.lax.cummin(lam)[:-1] - lam[1:] - rho
    sine = jnp.where(gap > 0, res / jnp.where(gap > 0, gap, 1.0), jnp.inf)
    k = jnp.arange(1, lam.shape[0])
    return SubspaceErrorBound(spectral=sine, frobenius=jnp.sqrt(2.0).astype(dtype) * sine,
                              sine_sum=jnp.sqrt(k.astype(dtype)) * sine, gap=gap, k=k)


def gradient_fraction_bound(residuals: jax.Array, eigenvalues: jax.Array,
                            next_eigenvalue: jax.Array, next_residual: jax.Array) -> jax.Array:
    r"""Bound on :math:`|\hat f_{top} - f_{top}|` for f_top computed in a computed eigenspace.

    :math:`\hat f - f = g^\top(\hat P - P)g/\|g\|^2`, a Rayleigh quotient of
    :math:`\hat P - P`, so :math:`|\hat f - f| \le \|\hat P - P\|_2`, bounded by
    :func:`subspace_error_bound` (same arguments and assumption). Attained when g lies along
    the top eigenvector of :math:`\hat P - P`. For :math:`f_{next}` (eigenvectors k+1..2k),
    :math:`P_{next} = P_{2k} - P_k` gives the sum of this bound at 2k and at k.

    Returns:
      Scalar bound (``inf`` when the gap is not positive).

    Example:
      >>> import jax.numpy as jnp
      >>> b = gradient_fraction_bound(jnp.array([1e-3]), jnp.array([10.0]), 2.0, 0.0)
      >>> print(f"{float(b):.3e}")
      1.250e-04
    """
    return subspace_error_bound(residuals, eigenvalues, next_eigenvalue, next_residual).spectral


def subspace_overlap_bound(error_a: SubspaceErrorBound, error_b: SubspaceErrorBound
                           ) -> jax.Array:
    r"""Bound on the error of :func:`subspace_overlap` between two computed eigenspaces.

    With :math:`E = \hat P - P`,
    :math:`\mathrm{Tr}(\hat P_a\hat P_b) - \mathrm{Tr}(P_a P_b)
    = \mathrm{Tr}(E_a\hat P_b) + \mathrm{Tr}(P_a E_b)`. E has eigenvalues
    :math:`\pm\sin\theta_i` (trace 0) and :math:`0 \preceq M \preceq I` for a projector M, so
    :math:`|\mathrm{Tr}(E M)| \le \sum_i \sin\theta_i`: the positive part of E weighted by
    numbers in [0, 1]. Hence

    .. math:: |\hat O - O| \le \frac{\sum_i\sin\theta^a_i + \sum_i\sin\theta^b_i}
              {\sqrt{k_a k_b}} \le \frac{\sqrt{k_a}\,\|R_a\|_F/\delta_a
              + \sqrt{k_b}\,\|R_b\|_F/\delta_b}{\sqrt{k_a k_b}},

    tighter by :math:`\sqrt{2k_b/k_a}` than Cauchy-Schwarz,
    :math:`|\mathrm{Tr}(E_a\hat P_b)| \le \|E_a\|_F\sqrt{k_b}`. Attained to first order when
    :math:`P_b` contains the directions :math:`\hat P_a` rotated towards with equal angles.

    Args:
      error_a: :func:`subspace_error_bound` of the first subspace.
      error_b: that of the second.

    Returns:
      Scalar bound (``inf`` if either gap is not positive).

    Example:
      >>> import jax.numpy as jnp
      >>> a = subspace_error_bound(jnp.array([1e-3, 1e-3]), jnp.array([10.0, 9.0]), 1.0, 0.0)
      >>> print(f"{float(subspace_overlap_bound(a, a)):.3e}")
      2.500e-04
    """
    norm = jnp.sqrt(error_a.k * error_b.k).astype(jnp.result_type(error_a.sine_sum))
    return (error_a.sine_sum + error_b.sine_sum) / norm
