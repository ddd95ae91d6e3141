r"""A curvature operator seen through a diagonal preconditioner.

With an optimizer that divides the gradient by :math:`D` (Adam:
:math:`D = \mathrm{diag}(\sqrt{\hat v} + \epsilon)`, :math:`\hat v` the bias-corrected second
moment), the dynamics near a point are governed by :math:`D^{-1}H`, which is similar to the
symmetric :math:`D^{-1/2} H D^{-1/2}`: same eigenvalues, eigenvectors related by
:math:`D^{1/2}`. Its largest eigenvalue is the "preconditioned sharpness" whose size relative to
:math:`2/\eta` (times a momentum factor) decides stability (Cohen et al. 2022, "Adaptive
gradient methods at the edge of stability").

:func:`precondition` builds :math:`v \mapsto s \odot H(s \odot v)` for a scale pytree
:math:`s = D^{-1/2}`; the result is an operator like the others (``like``, ``dim``,
``describe()``), so the eigensolvers, spectra and blocks take it unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from hessian_subspace import _tree
from hessian_subspace.curvature import apply_operator

PyTree = Any


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["operator", "scale"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True, eq=False)
class PreconditionedOperator:
    r""":math:`v \mapsto s \odot H(s \odot v)` (build it with :func:`precondition`)."""

    operator: Any
    scale: PyTree

    def __call__(self, v: PyTree) -> PyTree:
        return apply_operator(self, v)

    def matvec(self, v: PyTree) -> PyTree:
        scaled = jax.tree_util.tree_map(lambda s, x: s.astype(x.dtype) * x, self.scale, v)
        out = self.operator(scaled)
        return jax.tree_util.tree_map(lambda s, x: s.astype(x.dtype) * x, self.scale, out)

    def prepared(self):
        """This operator over the wrapped one's ``prepared()`` (its cached linearisation, if
        it has one): called once by the solvers inside their trace."""
        prepare = getattr(self.operator, "prepared", None)
        return self if prepare is None else dataclasses.replace(self, operator=prepare())

    @property
    def like(self) -> PyTree:
        return self.operator.like

    @property
    def dim(self) -> int:
        return _tree.tree_size(self.like)

    @property
    def vector_sharding(self):
        return getattr(self.operator, "vector_sharding", None)

    def describe(self) -> dict:
        info = dict(self.operator.describe()) if hasattr(self.operator, "describe") else {}
        info["preconditioned"] = "s * H(s * v)"
        return info


def precondition(matvec: Callable[[PyTree], PyTree], scale: PyTree) -> PreconditionedOperator:
    r"""The operator :math:`S H S`, :math:`S = \mathrm{diag}(s)`, for a positive ``scale``.

    Args:
      matvec: ``v -> H v`` with a ``like`` template (e.g. :func:`hessian_subspace.dataset_hvp`).
      scale: a pytree like the parameters, positive and finite: :math:`D^{-1/2}` for a
        preconditioner :math:`D` (see :func:`adam_scale`).

    Returns:
      A :class:`PreconditionedOperator`.

    Example:
      >>> import jax.numpy as jnp
      >>> import hessian_subspace as hs
      >>> op = hs.dataset_hvp(lambda w, b: 0.5 * jnp.mean((b["x"] @ w) ** 2), jnp.zeros(2),
      ...                     {"x": jnp.eye(2)}, batch_size=2)  # H = I / 2
      >>> hs.precondition(op, jnp.array([2.0, 1.0]))(jnp.ones(2))  # diag(4, 1) / 2
      Array([2. , 0.5], dtype=float32)
    """
    like = getattr(matvec, "like", None)
    if like is None:
        raise ValueError("`matvec` needs a `like` template (an operator of this package)")
    if jax.tree_util.tree_structure(scale) != jax.tree_util.tree_structure(like):
        raise ValueError("`scale` must have the structure of the parameters")
    for s, x in zip(jax.tree_util.tree_leaves(scale), jax.tree_util.tree_leaves(like),
                    strict=True):
        if np.shape(s) != np.shape(x):
            raise ValueError(f"`scale` leaf of shape {np.shape(s)} where the parameters have "
                             f"{np.shape(x)}")
    if _tree.is_concrete(scale):
        _tree.check_finite("scale", scale)
        if any(np.any(np.asarray(_tree.to_host(s)) <= 0) for s in
               jax.tree_util.tree_leaves(scale)):
            raise ValueError("`scale` must be positive")
    return PreconditionedOperator(operator=matvec, scale=scale)


def adam_scale(nu: PyTree, count, *, b2: float = 0.999, eps: float = 1e-8) -> PyTree:
    r""":math:`D^{-1/2}` for Adam: :math:`D = \sqrt{\hat v} + \epsilon`,
    :math:`\hat v = \nu / (1 - \beta_2^t)` (the bias-corrected second moment of optax's
    ``scale_by_adam`` state: ``nu`` and ``count`` = t)."""
    if _tree.is_concrete(count):  # in float64: 1 - b2^t loses digits in float32 for small t
        correction = 1.0 - float(b2) ** max(int(np.asarray(_tree.to_host(count))), 1)
    else:
        t = jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)
        correction = 1.0 - jnp.asarray(b2, jnp.float32) ** t
    return jax.tree_util.tree_map(
        lambda v: 1.0 / jnp.sqrt(jnp.sqrt(jnp.maximum(v, 0.0) / jnp.asarray(correction, v.dtype))
                                 + eps), nu)
