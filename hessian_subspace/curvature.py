r"""Hessian-vector products by forward-over-reverse autodiff, on a batch or on a whole data set.

Everything here depends on one contract: ``loss_fn(params, *args) -> scalar``. For data sets,
``loss_fn(params, batch)`` must return the **mean** loss over the examples of ``batch``; then

.. math:: L(\theta) = \frac{1}{n}\sum_{a=1}^{n} \ell(\theta; x_a), \qquad
          H v = \sum_{j} \frac{n_j}{n} \nabla^2 L_j(\theta)\, v,

where batch :math:`j` holds :math:`n_j` examples and :math:`L_j` is its mean loss, so a ragged
last batch is weighted exactly. The Hessian is never formed (Pearlmutter 1994).

References:
  Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994.
  Gur-Ari, Roberts, Dyer, "Gradient Descent Happens in a Tiny Subspace", arXiv:1812.04754, App. A.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import flatten_util

from hessian_subspace import _tree

PyTree = Any
LossFn = Callable[..., jax.Array]

_PRECISIONS = (None, "default", "high", "highest", "bfloat16", "tensorfloat32", "float32")


def _check_precision(precision):
    if isinstance(precision, jax.lax.Precision):
        return str(precision).split(".")[-1].lower()
    if precision not in _PRECISIONS:
        raise ValueError(
            f"`precision` must be one of {_PRECISIONS[1:]} or None (JAX's default), "
            f"got {precision!r}."
        )
    return precision


def _matmul_precision(precision):
    """Scoped matmul precision for tracing (a no-op context for None)."""
    if precision is None:
        return _NullContext()
    return jax.default_matmul_precision(precision)


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def hvp(loss_fn: LossFn, params: PyTree, v: PyTree, *args: Any, precision: str | None = None
        ) -> PyTree:
    r"""Returns :math:`\nabla^2_\theta\, \mathrm{loss\_fn}(\theta, *args)\cdot v` at ``params``.

    Forward-over-reverse: ``jvp`` of ``grad``, costing about one forward and two backward passes.
    Pure and jit-compatible.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      params: pytree of floating-point arrays, the point where the Hessian is taken.
      v: pytree with the structure and shapes of ``params``.
      *args: passed to ``loss_fn`` after ``params`` (typically a batch).
      precision: matmul precision used while tracing the product ("default", "high",
        "highest", ...); None keeps JAX's default.

    Returns:
      A pytree like ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> import hessian_subspace as hs
      >>> loss = lambda w, x: 0.5 * jnp.sum((x * w) ** 2)
      >>> hs.hvp(loss, jnp.ones(3), jnp.array([1.0, 0.0, 0.0]), jnp.array([2.0, 1.0, 1.0]))
      Array([4., 0., 0.], dtype=float32)
    """
    precision = _check_precision(precision)
    _check_like("v", v, params)
    _tree.check_finite("params", params)
    with _matmul_precision(precision):
        return jax.jvp(lambda p: jax.grad(loss_fn)(p, *args), (params,), (v,))[1]


def _check_like(name: str, tree: PyTree, like: PyTree) -> None:
    t1, t2 = jax.tree_util.tree_structure(tree), jax.tree_util.tree_structure(like)
    if t1 != t2:
        raise ValueError(f"`{name}` must have the pytree structure of `params`: {t1} vs {t2}.")
    for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(like), strict=True):
        if np.shape(a) != np.shape(b):
            raise ValueError(
                f"`{name}` leaf of shape {np.shape(a)} where `params` has {np.shape(b)}.")


def _num_examples(data: PyTree) -> int:
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves:
        raise ValueError(
            "`data` is an empty pytree; it must hold arrays with a leading example axis.")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if None in sizes:
        raise ValueError("every leaf of `data` needs a leading example axis; found a scalar.")
    if len(sizes) != 1:
        raise ValueError(f"leaves of `data` disagree on the number of examples: {sorted(sizes)}.")
    n = sizes.pop()
    if n < 1:
        raise ValueError("`data` holds no examples.")
    return n


def dataset_mean(fn: Callable[[PyTree], PyTree], data: PyTree, *, batch_size: int) -> PyTree:
    r"""Example-weighted mean of a per-batch mean quantity over a whole data set.

    Computes :math:`\sum_j (n_j/n)\,\mathrm{fn}(\mathrm{batch}_j)` in one compiled loop. Batches
    are strided: with :math:`m = \lfloor n/b \rfloor` full batches, batch :math:`j` holds
    examples :math:`j, j+m, j+2m, \dots` of the first :math:`mb`, so when ``data`` is sharded
    along its example axis every batch is spread over all devices (data parallelism). The
    remaining :math:`n - mb` examples form one ragged batch with weight :math:`(n-mb)/n`.

    Args:
      fn: ``fn(batch) -> pytree``, the *mean* over the batch of some per-example quantity.
      data: pytree of arrays, each with a leading example axis of size n.
      batch_size: b, the number of examples per batch (clamped to n).

    Returns:
      The pytree :math:`\frac{1}{n}\sum_a q(x_a)` where ``fn`` averages q over a batch.
    """
    n = _num_examples(data)
    b = min(int(batch_size), n)
    num_full, rest = divmod(n, b)

    def strided(x):  # (num_full * b, ...) -> (b, num_full, ...); batch j is [:, j].
        return jnp.reshape(x[: num_full * b], (b, num_full) + x.shape[1:])

    grid = jax.tree_util.tree_map(strided, data)

    def body(j, acc):
        batch = jax.tree_util.tree_map(lambda x: jnp.take(x, j, axis=1), grid)
        out = fn(batch)
        return jax.tree_util.tree_map(lambda a, o: a + o.astype(a.dtype), acc, out)

    first = jax.eval_shape(fn, jax.tree_util.tree_map(lambda x: x[:b], data))
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), first)
    total = jax.lax.fori_loop(0, num_full, body, zeros)
    total = jax.tree_util.tree_map(lambda t: t * (b / n), total)
    if rest:
        ragged = fn(jax.tree_util.tree_map(lambda x: x[num_full * b :], data))
        total = jax.tree_util.tree_map(
            lambda t, r: t + r.astype(t.dtype) * (rest / n), total, ragged)
    return total


def _validate_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    return int(batch_size)


def as_loss_pytree(loss_fn: LossFn) -> jax.tree_util.Partial:
    """``loss_fn`` as a pytree: a ``jax.tree_util.Partial`` stays as it is (its bound arrays,
    e.g. frozen batch-norm statistics, become dynamic inputs of compiled code); a plain
    function becomes ``Partial(loss_fn)`` (static, hashed by identity)."""
    if isinstance(loss_fn, jax.tree_util.Partial):
        return loss_fn
    if not callable(loss_fn):
        raise ValueError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
    return jax.tree_util.Partial(loss_fn)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["params", "data", "loss_fn"],
    meta_fields=["batch_size", "precision"],
)
@dataclasses.dataclass(frozen=True)
class HessianOperator:
    r"""The linear map :math:`v \mapsto Hv` of the mean loss over a fixed data set.

    A pytree: ``params``, ``data`` and the arrays bound in ``loss_fn`` (a
    ``jax.tree_util.Partial``) are leaves; ``batch_size`` and ``precision`` are static. Passing
    the operator to a jitted function (``lanczos``, ``top_eigenpairs``, ...) therefore compiles
    once per shape, whatever the parameter values: analysing many checkpoints reuses one
    program. Build it with :func:`dataset_hvp`.
    """

    params: PyTree
    data: PyTree
    loss_fn: jax.tree_util.Partial
    batch_size: int
    precision: str | None

    def __call__(self, v: PyTree) -> PyTree:
        return _apply_hessian(self, v)

    @property
    def num_examples(self) -> int:
        return _num_examples(self.data)

    @property
    def dim(self) -> int:
        """Number of parameters p (the operator is p x p)."""
        return _tree.tree_size(self.params)

    @property
    def like(self) -> PyTree:
        """A template for vectors this operator acts on (its parameters)."""
        return self.params

    def describe(self) -> dict:
        """Static facts about the operator, for result records."""
        dtypes = sorted({str(jnp.result_type(x)) for x in jax.tree_util.tree_leaves(self.params)})
        return dict(
            curvature="hessian",
            reduction="mean over examples",
            num_examples=self.num_examples,
            batch_size=min(self.batch_size, self.num_examples),
            num_params=self.dim,
            param_dtypes=dtypes,
            matmul_precision=self.precision or "default",
        )


@jax.jit
def _apply_hessian(op: HessianOperator, v: PyTree) -> PyTree:
    def batch_hvp(batch):
        return jax.jvp(lambda p: jax.grad(op.loss_fn)(p, batch), (op.params,), (v,))[1]

    with _matmul_precision(op.precision):
        return dataset_mean(batch_hvp, op.data, batch_size=op.batch_size)


def dataset_hvp(loss_fn: LossFn, params: PyTree, data: PyTree, *, batch_size: int,
                precision: str | None = None) -> HessianOperator:
    r"""Returns ``v ↦ H v`` for the **mean** loss over the whole data set ``data``.

    ``loss_fn(params, batch)`` must return the mean loss over ``batch``. All batches run inside
    one compiled program (a ``lax.fori_loop``), with batch j weighted by its share of examples,
    so the result does not depend on ``batch_size`` (up to round-off). If ``data`` is sharded
    along its example axis over a device mesh, each batch is split across the devices and the
    products are reduced by XLA: data parallelism with no change to the caller's code.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over a batch. A
        ``jax.tree_util.Partial`` binding arrays (e.g. frozen batch-norm statistics) keeps them
        dynamic, so a new checkpoint does not recompile.
      params: pytree of floating-point arrays; must be finite.
      data: pytree of arrays with a common leading example axis (the fixed analysis set).
      batch_size: examples per batch (memory knob only; clamped to the data set size).
      precision: matmul precision of the product ("default", "high", "highest", ...);
        None keeps JAX's default. Reported back by ``describe()``.

    Returns:
      A :class:`HessianOperator`, callable on pytrees shaped like ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> import hessian_subspace as hs
      >>> loss = lambda w, batch: 0.5 * jnp.mean((batch["x"] @ w) ** 2)
      >>> data = {"x": jnp.eye(3)}
      >>> op = hs.dataset_hvp(loss, jnp.zeros(3), data, batch_size=2)
      >>> op(jnp.array([3.0, 0.0, 0.0]))  # H = X^T X / n = I / 3
      Array([1., 0., 0.], dtype=float32)
    """
    batch_size = _validate_batch_size(batch_size)
    precision = _check_precision(precision)
    _tree.check_floating("params", params)
    _tree.check_finite("params", params)
    _num_examples(data)
    return HessianOperator(params=params, data=data, loss_fn=as_loss_pytree(loss_fn),
                           batch_size=batch_size, precision=precision)


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _dataset_value_and_grad(loss_fn, params, data, batch_size):
    return dataset_mean(lambda batch: jax.value_and_grad(loss_fn)(params, batch), data,
                        batch_size=batch_size)


def dataset_value_and_grad(loss_fn: LossFn, params: PyTree, data: PyTree, *, batch_size: int
                           ) -> tuple[jax.Array, PyTree]:
    """Mean loss and its gradient over the whole data set, batched like :func:`dataset_hvp`.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over a batch.
      params: pytree of floating-point arrays.
      data: pytree of arrays with a common leading example axis.
      batch_size: examples per batch.

    Returns:
      ``(loss, grad)``: a scalar and a pytree like ``params``.
    """
    batch_size = _validate_batch_size(batch_size)
    _tree.check_finite("params", params)
    _num_examples(data)
    return _dataset_value_and_grad(as_loss_pytree(loss_fn), params, data, batch_size)


def dense_hessian(loss_fn: LossFn, params: PyTree, *args: Any) -> jax.Array:
    """The full ``(p, p)`` Hessian in ``ravel_pytree`` order (small models and tests only).

    Memory is p² numbers: a 10k-parameter model already needs 400 MB in float32.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      params: pytree of arrays.
      *args: passed to ``loss_fn`` after ``params``.

    Returns:
      The symmetric Hessian matrix, ``(p, p)``, in the dtype of the flattened params.
    """
    flat, unravel = flatten_util.ravel_pytree(params)
    return jax.hessian(lambda x: loss_fn(unravel(x), *args))(flat)


def dense_matrix(matvec: Callable[[PyTree], PyTree], like: PyTree) -> jax.Array:
    """Materialises a linear operator as a ``(p, p)`` matrix from p matvecs (tests, tiny models).

    Column i is ``matvec(e_i)`` in ``ravel_pytree`` order; computed with ``lax.map``.
    """
    mv, like_flat = _tree.flat_matvec(matvec, like, flatten_util.ravel_pytree(like)[0].dtype)
    eye = jnp.eye(like_flat.size, dtype=like_flat.dtype)
    return jax.lax.map(mv, eye).T
