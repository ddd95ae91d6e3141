r"""Curvature-vector products (Hessian, Gauss-Newton, their blocks), on a batch or a data set.

Everything here depends on one contract: ``loss_fn(params, *args) -> scalar``. For data sets,
``loss_fn(params, batch)`` must return the **mean** loss over the examples of ``batch``; then

.. math:: L(\theta) = \frac{1}{n}\sum_{a=1}^{n} \ell(\theta; x_a), \qquad
          H v = \sum_{j} \frac{n_j}{n} \nabla^2 L_j(\theta)\, v,

where batch :math:`j` holds :math:`n_j` examples and :math:`L_j` is its mean loss, so a ragged
last batch is weighted exactly. The Hessian is never formed (Pearlmutter 1994).

The same weighting gives the generalised Gauss-Newton matrix :math:`G`
(:mod:`hessian_subspace.gauss_newton`, on the :class:`DatasetOperator` base defined here), and
:func:`hessian_subspace.restrict` turns either operator into its diagonal block on a subset of
the parameter leaves (one layer, say). All of them are pytrees with ``dim``, ``like`` and
``describe()``, so the eigensolvers, spectra and metrics take any of them. For one checkpoint
an operator's product can be linearised once (:mod:`hessian_subspace.linearization`).

References:
  Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994.
  Schraudolph, "Fast curvature matrix-vector products for second-order gradient descent",
  Neural Computation 2002 (the Gauss-Newton product).
  Gur-Ari, Roberts, Dyer, "Gradient Descent Happens in a Tiny Subspace", arXiv:1812.04754, App. A.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import flatten_util

from hessian_subspace import _tree, _xla, layout
from hessian_subspace import sharding as sharding_lib
from hessian_subspace.linearization import linearize, with_cache

PyTree = Any
LossFn = Callable[..., jax.Array]

_PRECISIONS = (None, "default", "high", "highest", "bfloat16", "tensorfloat32", "float32")


def check_precision(precision):
    if isinstance(precision, jax.lax.Precision):
        return str(precision).split(".")[-1].lower()
    if precision not in _PRECISIONS:
        raise ValueError(
            f"`precision` must be one of {_PRECISIONS[1:]} or None (JAX's default), "
            f"got {precision!r}."
        )
    return precision


def matmul_precision(precision):
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
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
    precision = check_precision(precision)
    check_like("v", v, params)
    _tree.check_finite("params", params)
    _tree.warn_float64_dropped("params", params)
    _check_scalar_loss(loss_fn, params, *args)
    with matmul_precision(precision):
        return jax.jvp(lambda p: jax.grad(loss_fn)(p, *args), (params,), (v,))[1]


def _check_scalar_loss(loss_fn, params, *args) -> None:
    """``loss_fn(params, *args)`` can be evaluated and is a scalar (checked on shapes only:
    ``jax.eval_shape``); an error inside it (a batch without a key the loss reads, inputs of
    the wrong shape, float class labels) is re-raised naming the loss and the batch."""
    try:
        out = jax.eval_shape(loss_fn, params, *args)
    except Exception as e:  # a user's loss: any error type
        shapes = "; ".join(
            f"{jax.tree_util.keystr(path) or 'batch'}: {np.shape(x)} {jnp.result_type(x)}"
            for path, x in jax.tree_util.tree_leaves_with_path(args)[:6])
        kind = TypeError if isinstance(e, TypeError) else ValueError
        raise kind(f"`loss_fn(params, batch)` fails on the batch ({shapes}) with these `params`: "
                   f"{type(e).__name__}: {e}") from e
    if not hasattr(out, "shape") or out.shape != ():
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(f"`loss_fn(params, batch)` must return a scalar (the mean loss over "
                         f"the batch), got {shape}.")


def check_like(name: str, tree: PyTree, like: PyTree) -> None:
    t1, t2 = jax.tree_util.tree_structure(tree), jax.tree_util.tree_structure(like)
    if t1 != t2:
        raise ValueError(f"`{name}` must have the pytree structure of `params`: {t1} vs {t2}.")
    for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(like), strict=True):
        if np.shape(a) != np.shape(b):
            raise ValueError(
                f"`{name}` leaf of shape {np.shape(a)} where `params` has {np.shape(b)}.")


def _num_examples(data: PyTree) -> int:
    if isinstance(data, layout.BatchedData):
        return data.num_examples
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


def dataset_mean(fn: Callable[[PyTree], PyTree], data: PyTree, *,
                 batch_size: int | None = None, unroll: bool | None = None) -> PyTree:
    r"""Example-weighted mean of a per-batch mean quantity over a whole data set.

    Computes :math:`\sum_j (n_j/n)\,\mathrm{fn}(\mathrm{batch}_j)` in one compiled loop over the
    full batches, plus the ragged ones. ``data`` is either a pytree of arrays (batches are then
    strided: with :math:`m = \lfloor n/b \rfloor` full batches, batch :math:`j` holds examples
    :math:`j, j+m, j+2m, \dots` of the first :math:`mb`, and the remaining :math:`n - mb` form
    one ragged batch of weight :math:`(n-mb)/n`), or a :class:`hessian_subspace.layout.
    BatchedData` laid out over a device mesh by :func:`hessian_subspace.batch_data`, in which
    case every device reads only its own examples and nothing but the results is communicated.

    Args:
      fn: ``fn(batch) -> pytree``, the *mean* over the batch of some per-example quantity.
      data: pytree of arrays, each with a leading example axis of size n, or a ``BatchedData``.
      batch_size: b, the number of examples per batch (clamped to n); not used with a
        ``BatchedData``, which has its own.
      unroll: write the batch loop out in the program instead of a ``fori_loop`` (no loop;
        compile time grows with the number of batches). None (the default): written out when
        ``fn`` holds a convolution, the backend is CPU (where XLA runs convolutions in loop
        bodies ~10x slower, see :mod:`hessian_subspace._xla`) and there are at most
        ``_xla.MAX_UNROLLED_BATCHES`` full batches; looped otherwise. A single full batch is
        never looped.

    Returns:
      The pytree :math:`\frac{1}{n}\sum_a q(x_a)` where ``fn`` averages q over a batch.
    """
    if not isinstance(data, layout.BatchedData):
        if batch_size is None:
            raise ValueError("`batch_size` is required unless `data` is a BatchedData.")
        data = _strided(data, int(batch_size))
    program, first = jax.make_jaxpr(fn, return_shape=True)(data.first_batch())
    if unroll is None:
        unroll = (data.num_batches <= _xla.MAX_UNROLLED_BATCHES
                  and _xla.loops_are_slow(program.jaxpr))
    total = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), first)
    for part, weight, stacked in data.parts():
        if stacked:
            def body(j, acc, part=part):
                batch = jax.tree_util.tree_map(lambda x: jnp.take(x, j, axis=1), part)
                out = fn(batch)
                return jax.tree_util.tree_map(lambda a, o: a + o.astype(a.dtype), acc, out)

            if data.num_batches == 1 or unroll:
                summed = total
                for j in range(data.num_batches):
                    summed = body(j, summed)
            else:
                summed = jax.lax.fori_loop(0, data.num_batches, body, total)
            total = jax.tree_util.tree_map(lambda t, w=weight: t * w, summed)
        else:
            total = jax.tree_util.tree_map(
                lambda t, r, w=weight: t + r.astype(t.dtype) * w, total, fn(part))
    return total


def _strided(data: PyTree, batch_size: int) -> layout.BatchedData:
    """The single-device layout of raw arrays, inside a trace (reshapes, no copies)."""
    n = _num_examples(data)
    b = min(batch_size, n)
    num_full, rest = divmod(n, b)
    grid = jax.tree_util.tree_map(
        lambda x: jnp.reshape(x[: num_full * b], (b, num_full) + x.shape[1:]), data)
    ragged = jax.tree_util.tree_map(lambda x: x[num_full * b:], data) if rest else None
    return layout.BatchedData(grid=grid, rest=ragged, tail=None, num_examples=n, local_batch=b,
                              num_batches=num_full, data_parallel=1, mesh=None, axes=())


def _validate_batch_size(batch_size) -> int:
    return _tree.check_int("batch_size", batch_size, 1)


def as_loss_pytree(loss_fn: LossFn) -> jax.tree_util.Partial:
    """``loss_fn`` as a pytree: a ``jax.tree_util.Partial`` stays as it is (its bound arrays,
    e.g. frozen batch-norm statistics, become dynamic inputs of compiled code); a plain
    function becomes ``Partial(loss_fn)`` (static, hashed by identity)."""
    if isinstance(loss_fn, jax.tree_util.Partial):
        return loss_fn
    if not callable(loss_fn):
        raise ValueError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
    return jax.tree_util.Partial(loss_fn)


def bind_state(fn: Callable[..., Any], state: PyTree) -> jax.tree_util.Partial:
    """``f(params, *args) = fn(params, *args, state)``, with ``state`` (frozen model state, e.g.
    BatchNorm statistics) a pytree leaf of the result.

    Operators and jitted functions built on the result take ``state`` as an input, so a new
    checkpoint's state reuses compiled code; ``fn`` itself is static (hashed by identity), or,
    if it is a ``jax.tree_util.Partial``, its bound arrays are leaves too.

    Args:
      fn: ``fn(params, *args, state)``, e.g. a loss ``loss(params, batch, state)``.
      state: any pytree (``{}`` or None for models without state).

    Returns:
      A ``jax.tree_util.Partial`` callable as ``f(params, *args)``.

    Example:
      >>> import jax.numpy as jnp
      >>> import hessian_subspace as hs
      >>> loss = lambda w, batch, state: jnp.mean((batch * w - state["shift"]) ** 2)
      >>> bound = hs.curvature.bind_state(loss, {"shift": jnp.ones(())})
      >>> float(bound(jnp.ones(()), jnp.array([1.0, 3.0])))
      2.0
    """
    return jax.tree_util.Partial(_call_with_state, as_loss_pytree(fn), state)


def _call_with_state(fn, state, params, *args):
    return fn(params, *args, state)


class DatasetOperator:
    """What the curvature operators of a mean loss over a fixed data set have in common.

    A subclass is a frozen dataclass registered as a pytree, with leaves ``params``, ``data`` and
    its loss functions (``jax.tree_util.Partial``) and static ``batch_size`` and ``precision``.
    It names itself in ``curvature`` and defines ``_batch_product(v, batch)``: its curvature
    matrix for one batch's mean loss applied to ``v``. The data-set product is the
    example-weighted mean of those (:func:`dataset_mean`), so ragged batches count exactly.
    """

    curvature: ClassVar[str]

    def __call__(self, v: PyTree) -> PyTree:
        return apply_operator(self, v)

    def matvec(self, v: PyTree) -> PyTree:
        with matmul_precision(self.precision):
            out = dataset_mean(lambda batch: self._batch_product(v, batch), self.data,
                               batch_size=self.batch_size, unroll=self.unroll)
        if self.param_shardings is not None:  # H v is laid out like the parameters.
            leaves, treedef = jax.tree_util.tree_flatten(out)
            out = treedef.unflatten([jax.lax.with_sharding_constraint(x, s) for x, s in
                                     zip(leaves, self.param_shardings, strict=True)])
        return out

    def prepared(self):
        """What the eigensolvers apply many times: with ``cache`` set, the product linearised
        once (:class:`LinearizedOperator`: the forward and backward passes that do not depend
        on ``v`` are computed here, inside the caller's trace, and only the products with ``v``
        are left); otherwise the operator itself."""
        return linearize(self) if self.cache else self

    @property
    def mesh(self):
        """The device mesh of the data or of the parameters (None: one device)."""
        if isinstance(self.data, layout.BatchedData) and self.data.mesh is not None:
            return self.data.mesh
        if self.param_shardings:
            return getattr(self.param_shardings[0], "mesh", None)
        return None

    @property
    def vector_sharding(self):
        """How flat parameter-space vectors (Krylov bases) are split: over every device of
        :attr:`mesh` (None without one); the eigensolvers read it."""
        return sharding_lib.vector_sharding(self.mesh)

    @property
    def num_examples(self) -> int:
        return _num_examples(self.data)

    @property
    def data_batches(self) -> int:
        """Batches of the data-set loop (the ragged and replicated ones included)."""
        if isinstance(self.data, layout.BatchedData):
            return self.data.num_batches + sum(1 for _, _, stacked in self.data.parts()
                                               if not stacked)
        full, rest = divmod(self.num_examples, min(self.batch_size, self.num_examples))
        return full + (1 if rest else 0)

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
            curvature=self.curvature,
            reduction="mean over examples",
            num_examples=self.num_examples,
            batch_size=(self.data.batch_size if isinstance(self.data, layout.BatchedData)
                        else min(self.batch_size, self.num_examples)),
            num_params=self.dim,
            param_dtypes=dtypes,
            matmul_precision=self.precision or "default",
            mesh=None if self.mesh is None else dict(self.mesh.shape),
            cached_linearization=bool(self.cache),
        )


@jax.jit
def apply_operator(op, v: PyTree) -> PyTree:
    """``op(v)`` for the pytree operators of this package (:class:`HessianOperator`,
    :class:`GGNOperator`, :class:`hessian_subspace.blocks.RestrictedOperator`): one compiled
    program per operator type and shape, whatever the parameter values (the operator's arrays
    are inputs, its static fields part of the cache key). ``op(v)`` calls it, and
    ``op.matvec(v)`` is the same product traced inline (what ``jax.linearize`` and an
    enclosing jit see); ``.lower(op, v)`` shows the compiled product."""
    return op.matvec(v)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["params", "data", "loss_fn"],
    meta_fields=["batch_size", "precision", "param_shardings", "cache", "unroll"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class HessianOperator(DatasetOperator):
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
    batch_size: int | None
    precision: str | None
    param_shardings: tuple | None = None
    cache: bool = False
    unroll: bool | None = None  # None: dataset_mean decides

    curvature: ClassVar[str] = "hessian"

    def _batch_product(self, v: PyTree, batch: PyTree) -> PyTree:
        return jax.jvp(lambda p: jax.grad(self.loss_fn)(p, batch), (self.params,), (v,))[1]


def dataset_hvp(loss_fn: LossFn, params: PyTree, data: PyTree, *,
                batch_size: int | None = None, precision: str | None = None,
                cache: bool | str = "auto", cache_budget: float | None = None
                ) -> HessianOperator:
    r"""Returns ``v ↦ H v`` for the **mean** loss over the whole data set ``data``.

    ``loss_fn(params, batch)`` must return the mean loss over ``batch``. All batches run inside
    one compiled program (a ``lax.fori_loop``, written out for convolutions on CPU: see
    :func:`dataset_mean`), with batch j weighted by its share of examples,
    so the result does not depend on ``batch_size`` (up to round-off). For data parallelism,
    lay ``data`` out over a device mesh with :func:`hessian_subspace.batch_data`: every device
    then computes on its own examples and only the products are reduced; parameters sharded
    over the mesh (e.g. :func:`hessian_subspace.sharding.fsdp_shardings`) keep their layout in
    ``H v`` and the eigensolvers split their bases over all devices (:attr:`vector_sharding`).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over a batch. A
        ``jax.tree_util.Partial`` binding arrays (e.g. frozen batch-norm statistics) keeps them
        dynamic, so a new checkpoint does not recompile.
      params: pytree of floating-point arrays; must be finite.
      data: pytree of arrays with a common leading example axis (the fixed analysis set), or a
        :class:`hessian_subspace.layout.BatchedData`.
      batch_size: examples per batch (memory knob only; clamped to the data set size); not
        needed with a ``BatchedData``.
      precision: matmul precision of the product ("default", "high", "highest", ...);
        None keeps JAX's default. Reported back by ``describe()``.
      cache: whether the eigensolvers, spectra and trackers linearise the product once per
        solve and apply the stored linear map at every step (:func:`linearize`: the forward
        and backward passes of the gradient are done once; the same numbers to round-off).
        "auto" (default): when :func:`linearization_bytes` fits ``cache_budget``. A single
        ``op(v)`` never caches.
      cache_budget: bytes per device the stored linearisation may take with ``cache="auto"``
        (default :func:`default_cache_budget`).

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
    batch_size, precision = check_operator_args(params, data, batch_size, precision)
    _tree.warn_float64_dropped("params", params)
    op = HessianOperator(params=params, data=data, loss_fn=as_loss_pytree(loss_fn),
                         batch_size=batch_size, precision=precision,
                         param_shardings=param_shardings(params))
    first = (data.first_batch() if isinstance(data, layout.BatchedData)
             else jax.tree_util.tree_map(lambda x: x[:batch_size], data))
    _check_scalar_loss(op.loss_fn, params, first)
    return with_cache(op, cache, cache_budget)


def param_shardings(params: PyTree) -> tuple | None:
    """The leaves' shardings when the parameters are spread over a mesh of several devices
    (None otherwise: nothing to keep)."""
    shardings = [getattr(x, "sharding", None) for x in jax.tree_util.tree_leaves(params)]
    if not shardings or any(not isinstance(s, jax.sharding.NamedSharding) for s in shardings):
        return None
    if all(s.mesh.size == 1 for s in shardings):
        return None
    return tuple(shardings)


def check_operator_args(params, data, batch_size, precision):
    """Validates what every data-set operator takes; returns (batch_size, precision)."""
    if isinstance(data, layout.BatchedData) and batch_size is None:
        batch_size = data.batch_size
    batch_size = _validate_batch_size(batch_size)
    precision = check_precision(precision)
    _tree.check_floating("params", params)
    _tree.check_finite("params", params)
    _num_examples(data)
    return batch_size, precision


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _dataset_value_and_grad(loss_fn, params, data, batch_size):
    return dataset_mean(lambda batch: jax.value_and_grad(loss_fn)(params, batch), data,
                        batch_size=batch_size)


def dataset_value_and_grad(loss_fn: LossFn, params: PyTree, data: PyTree, *,
                           batch_size: int | None = None) -> tuple[jax.Array, PyTree]:
    """Mean loss and its gradient over the whole data set, batched like :func:`dataset_hvp`.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over a batch.
      params: pytree of floating-point arrays.
      data: pytree of arrays with a common leading example axis, or a ``BatchedData``.
      batch_size: examples per batch (not needed with a ``BatchedData``).

    Returns:
      ``(loss, grad)``: a scalar and a pytree like ``params``.
    """
    if isinstance(data, layout.BatchedData):
        batch_size = None if batch_size is None else _validate_batch_size(batch_size)
        _tree.check_finite("params", params)
        return _dataset_value_and_grad(as_loss_pytree(loss_fn), params, data, None)
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
