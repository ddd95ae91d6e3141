r"""The paper's metrics: how much of the gradient lies in the top Hessian subspace, and how fast
that subspace moves.

Vectors (gradients, Hg) may be pytrees or flat arrays; bases are ``(k, p)`` arrays with
**orthonormal rows** (as returned by :func:`top_eigenpairs`) or pytrees whose leaves have a
leading axis k. All functions are pure and jit-compatible; inner products use
``Precision.HIGHEST``. Notation follows Gur-Ari, Roberts, Dyer (2018): :math:`P` is the
orthogonal projector onto the span of a basis.

References:
  Gur-Ari, Roberts, Dyer, "Gradient Descent Happens in a Tiny Subspace", arXiv:1812.04754,
  eqs. 2-5 and 12.
  Knyazev, Argentati, "Principal angles between subspaces in an A-based scalar product",
  SIAM J. Sci. Comput. 23 (2002) (the sine/cosine formula for principal angles).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from hessian_subspace import _tree

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


def _vec(x: PyTree) -> jax.Array:
    return _tree.as_flat(x)


def _rows(basis: PyTree) -> jax.Array:
    return _tree.as_flat_rows(basis)


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
    g, v = _common(_vec(g), _rows(eigenvectors))
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
    a, b = _common(_rows(basis_a), _rows(basis_b))
    cross = jnp.dot(a, b.T, precision=_HIGHEST)
    return jnp.sum(cross**2) / jnp.sqrt(a.shape[0] * b.shape[0])


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
    a, b = _common(_rows(basis_a), _rows(basis_b))
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
