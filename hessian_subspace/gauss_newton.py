r"""Generalised Gauss-Newton products :math:`G v`, on a batch (:func:`ggn_vp`) or a data set
(:func:`dataset_ggn`, a :class:`GGNOperator` batched and weighted like
:func:`hessian_subspace.dataset_hvp`).

The model is split into ``output_fn(params, batch) -> (n, m)`` outputs and
``output_loss(outputs, batch) -> mean loss``; :math:`G` is the Hessian without its term in the
second derivatives of the outputs (positive semi-definite for a loss convex in the outputs).

References:
  Schraudolph, "Fast curvature matrix-vector products for second-order gradient descent",
  Neural Computation 2002.
  Martens, "New insights and perspectives on the natural gradient method", JMLR 21 (2020).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar

import jax

from hessian_subspace import _tree
from hessian_subspace.curvature import (
    check_like,
    check_operator_args,
    check_precision,
    DatasetOperator,
    matmul_precision,
    param_shardings,
    as_loss_pytree,
)
from hessian_subspace.linearization import with_cache

PyTree = Any
OutputFn = Callable[[Any, Any], jax.Array]  # (params, batch) -> outputs (n, m).
OutputLoss = Callable[[jax.Array, Any], jax.Array]  # (outputs, batch) -> mean loss.


def _ggn_product(output_fn, output_loss, params, v, batch):
    f = lambda p: output_fn(p, batch)  # noqa: E731
    outputs, jvp_fn = jax.linearize(f, params)  # One forward pass; jvp_fn: v -> J v.
    hjv = jax.jvp(jax.grad(lambda o: output_loss(o, batch)), (outputs,), (jvp_fn(v),))[1]
    return jax.linear_transpose(jvp_fn, params)(hjv)[0]  # J^T (H_l J v).


def ggn_vp(output_fn: OutputFn, output_loss: OutputLoss, params: PyTree, v: PyTree,
           batch: PyTree, *, precision: str | None = None) -> PyTree:
    r"""Generalised Gauss-Newton product :math:`G v` for the mean loss over one batch.

    With outputs :math:`f_a = f(\theta, x_a) \in \mathbb{R}^m`, per-example loss
    :math:`\ell(f_a, y_a)` and :math:`L = \frac{1}{n}\sum_a \ell(f_a, y_a)`,

    .. math:: G = \frac{1}{n}\sum_{a=1}^{n} J_a^\top H_{\ell,a} J_a, \qquad
              J_a = \partial f_a/\partial\theta,\quad
              H_{\ell,a} = \partial^2 \ell/\partial f_a^2,

    i.e. the Hessian :math:`H = G + \frac{1}{n}\sum_{a,c} (\partial\ell/\partial f_{ac})\,
    \nabla^2_\theta f_{ac}` without its second term. :math:`G` is positive semi-definite when
    :math:`\ell` is convex in the outputs and equals :math:`H` when :math:`f` is linear in
    :math:`\theta`. For softmax cross-entropy :math:`H_{\ell} = \mathrm{diag}(p) - pp^\top`; for
    ``mean((f - y) ** 2)`` over the ``(n, m)`` outputs, :math:`\frac{1}{n}H_\ell = 2I/(nm)`.

    Computed as ``J v`` (``jax.linearize``: one forward pass), the output-space product
    (forward-over-reverse on ``output_loss``, which holds the :math:`1/n`), then ``J^T``
    (``jax.linear_transpose``). Pure and jit-compatible.

    Args:
      output_fn: ``output_fn(params, batch) -> outputs`` of shape ``(n, m)``.
      output_loss: ``output_loss(outputs, batch) -> scalar``, the **mean** loss over the batch.
      params: pytree of floating-point arrays.
      v: pytree like ``params``.
      batch: passed to both functions.
      precision: matmul precision while tracing ("default", "high", "highest", ...).

    Returns:
      A pytree like ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> import hessian_subspace as hs
      >>> f = lambda w, batch: batch["x"] @ w  # linear model: G = H = 2 X^T X / (n m)
      >>> loss = lambda out, batch: jnp.mean((out - batch["y"]) ** 2)
      >>> batch = {"x": jnp.eye(2), "y": jnp.zeros((2, 2))}
      >>> hs.ggn_vp(f, loss, jnp.zeros((2, 2)), jnp.ones((2, 2)), batch)
      Array([[0.5, 0.5],
             [0.5, 0.5]], dtype=float32)

    References:
      Schraudolph, "Fast curvature matrix-vector products for second-order gradient descent",
      Neural Computation 14 (2002).
      Martens, "New insights and perspectives on the natural gradient method", JMLR 21 (2020).
    """
    precision = check_precision(precision)
    check_like("v", v, params)
    _tree.check_finite("params", params)
    with matmul_precision(precision):
        return _ggn_product(output_fn, output_loss, params, v, batch)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["params", "data", "output_fn", "output_loss"],
    meta_fields=["batch_size", "precision", "param_shardings", "cache", "unroll"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class GGNOperator(DatasetOperator):
    r"""The linear map :math:`v \mapsto Gv` of the Gauss-Newton matrix of the mean loss over a
    fixed data set (see :func:`ggn_vp`). A pytree like :class:`HessianOperator`, with the same
    methods; ``describe()`` reports ``curvature="ggn"``. Build it with :func:`dataset_ggn`."""

    params: PyTree
    data: PyTree
    output_fn: jax.tree_util.Partial
    output_loss: jax.tree_util.Partial
    batch_size: int | None
    precision: str | None
    param_shardings: tuple | None = None
    cache: bool = False
    unroll: bool | None = None  # None: dataset_mean decides

    curvature: ClassVar[str] = "ggn"

    def _batch_product(self, v: PyTree, batch: PyTree) -> PyTree:
        return _ggn_product(self.output_fn, self.output_loss, self.params, v, batch)


def dataset_ggn(output_fn: OutputFn, output_loss: OutputLoss, params: PyTree, data: PyTree, *,
                batch_size: int | None = None, precision: str | None = None,
                cache: bool | str = "auto", cache_budget: float | None = None) -> GGNOperator:
    r"""Returns ``v ↦ G v``, the Gauss-Newton matrix of the **mean** loss over ``data``.

    :math:`G v = \sum_j (n_j/n)\, G_j v` with :math:`G_j` the GGN of batch j's mean loss
    (:func:`ggn_vp`), batched exactly like :func:`dataset_hvp` (one compiled loop, ragged last
    batch weighted by its share, data parallel when ``data`` is sharded).

    Args:
      output_fn: ``output_fn(params, batch) -> (n, m)`` outputs (logits); a
        ``jax.tree_util.Partial`` binding the model state keeps it dynamic.
      output_loss: ``output_loss(outputs, batch) -> scalar``, the mean loss over the batch.
      params: pytree of floating-point arrays; must be finite.
      data: pytree of arrays with a common leading example axis.
      batch_size: examples per batch (clamped to the data set size).
      precision: matmul precision of the product; reported by ``describe()``.
      cache, cache_budget: the cached linearisation, as in :func:`dataset_hvp`.

    Returns:
      A :class:`GGNOperator`, callable on pytrees shaped like ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> import hessian_subspace as hs
      >>> f = lambda w, batch: batch["x"] @ w[:, None]
      >>> loss = lambda out, batch: 0.5 * jnp.mean(out ** 2)
      >>> op = hs.dataset_ggn(f, loss, jnp.zeros(3), {"x": jnp.eye(3)}, batch_size=2)
      >>> op(jnp.array([3.0, 0.0, 0.0]))  # G = H = X^T X / n = I / 3
      Array([1., 0., 0.], dtype=float32)
    """
    batch_size, precision = check_operator_args(params, data, batch_size, precision)
    op = GGNOperator(params=params, data=data, output_fn=as_loss_pytree(output_fn),
                     output_loss=as_loss_pytree(output_loss), batch_size=batch_size,
                     precision=precision, param_shardings=param_shardings(params))
    return with_cache(op, cache, cache_budget)
