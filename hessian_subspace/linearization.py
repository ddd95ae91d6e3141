r"""The cached linearisation of a curvature operator.

For one checkpoint a data-set operator (:class:`hessian_subspace.HessianOperator`,
:class:`hessian_subspace.GGNOperator`, and wrappers of them) is fixed, and its product is linear
in v, so ``jax.linearize(op.matvec, 0)`` splits it into what does not depend on v — the
forward and backward passes of the gradient over every batch, computed once and stored as the
residuals of a ``Partial`` — and the operations on v, applied at every solver step
(:func:`linearize`, :class:`LinearizedOperator`). :func:`linearization_bytes` reads the memory
this takes from the traced program; :func:`with_cache` resolves an operator's ``cache="auto"``
against :func:`default_cache_budget`; :func:`prepare` does it by one compiled call for solvers
driven from Python.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hessian_subspace import _xla

PyTree = Any


def _is_dataset_operator(op) -> bool:
    """A data-set operator (``HessianOperator``, ``GGNOperator``): a dataclass with the
    ``cache`` and ``unroll`` fields and ``data_batches`` (curvature imports this module, so
    the test is by those fields, not by class)."""
    return (dataclasses.is_dataclass(op) and hasattr(op, "cache") and hasattr(op, "unroll")
            and hasattr(op, "data_batches"))


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["linear", "source"], meta_fields=[])
@dataclasses.dataclass(frozen=True, eq=False)
class LinearizedOperator:
    r"""``v ↦ A v`` of a data-set operator A through its stored linearisation.

    ``linear`` is the ``jax.tree_util.Partial`` that ``jax.linearize`` returns for the
    (linear) product ``v ↦ A v`` at ``v = 0``: its leaves are the residuals, the activations
    and derivatives of the forward and backward passes, computed once; applying it evaluates
    only the operations that involve ``v`` (for forward-over-reverse: the tangent forward and
    backward passes). It lives inside one compiled solve (:func:`linearize` is called by the
    solvers through the operator's ``prepared()``), so nothing is recompiled per checkpoint.
    ``source`` is the operator it came from (template, mesh, ``describe()``).
    """

    linear: jax.tree_util.Partial
    source: Any

    def __call__(self, v: PyTree) -> PyTree:
        out = self.linear(v)
        shardings = getattr(self.source, "param_shardings", None)
        if shardings is not None:
            leaves, treedef = jax.tree_util.tree_flatten(out)
            out = treedef.unflatten([jax.lax.with_sharding_constraint(x, s) for x, s in
                                     zip(leaves, shardings, strict=True)])
        return out

    @property
    def like(self) -> PyTree:
        return self.source.like

    @property
    def dim(self) -> int:
        return self.source.dim

    @property
    def mesh(self):
        return getattr(self.source, "mesh", None)

    @property
    def vector_sharding(self):
        return getattr(self.source, "vector_sharding", None)

    def describe(self) -> dict:
        return self.source.describe()


def _linear_map(op) -> jax.tree_util.Partial:
    zeros = jax.tree_util.tree_map(jnp.zeros_like, op.like)
    return jax.linearize(op.matvec, zeros)[1]


def linearize(op) -> LinearizedOperator:
    r"""The product of a data-set operator, linearised once: ``jax.linearize`` of
    ``v ↦ op(v)`` at ``v = 0``.

    The product is linear in ``v``, so the linear map is the same operator (the same
    operations on ``v``, so the same numbers to round-off); what does not depend on ``v`` —
    for :math:`Hv` by forward-over-reverse, the forward pass and the backward pass of the
    gradient, over every batch — is computed once, here, and stored (memory:
    :func:`linearization_bytes`). Costs about one product. Meant for use inside a jitted solve
    (the eigensolvers call it through ``op.prepared()`` when the operator's ``cache`` is
    set); outside one it works too, but every call compiles again.

    Args:
      op: a :class:`HessianOperator` or :class:`GGNOperator` (or any operator with ``like``
        and a ``matvec`` that is linear in its argument).

    Returns:
      A :class:`LinearizedOperator`.
    """
    return LinearizedOperator(linear=_linear_map(op), source=op)


@jax.jit
def _linear_map_jit(op):
    return _linear_map(op)


def prepare(op, *, unroll: bool = False):
    """``op.prepared()`` computed by one compiled call, for code that applies ``op`` from
    Python many times (the host-driven eigensolver): the stored linearisation of a data-set
    operator whose ``cache`` is set (inside wrappers such as :func:`hessian_subspace.restrict`
    too); anything else is returned as it is. With ``unroll``, data-set operators of at most
    ``_xla.MAX_UNROLLED_BATCHES`` batches write their batch loop out (no loop in the program).
    Repeated calls with operators of the same shapes return operators of the same pytree
    structure, so the code applying them compiles once."""
    if _is_dataset_operator(op):
        if unroll and op.data_batches <= _xla.MAX_UNROLLED_BATCHES:
            op = dataclasses.replace(op, unroll=True)
        return LinearizedOperator(linear=_linear_map_jit(op), source=op) if op.cache else op
    inner = getattr(op, "operator", None)
    if inner is not None and callable(getattr(op, "prepared", None)):
        prepared = prepare(inner, unroll=unroll)
        return op if prepared is inner else dataclasses.replace(op, operator=prepared)
    return op


_BYTES_CACHE: dict = {}


def linearization_bytes(op) -> int:
    """Bytes of the residuals :func:`linearize` stores for ``op``, per device.

    Read from the traced program (no computation): the residual arrays other than the
    operator's own inputs (parameters and data are resident anyway), divided by the devices of
    the operator's mesh (residuals of data-parallel batches are split like the data; an
    estimate when parameters are replicated). Remembered per operator type and shapes.
    """
    leaves, treedef = jax.tree_util.tree_flatten(op)
    key = (treedef, tuple((np.shape(x), str(jnp.result_type(x))) for x in leaves))
    if key not in _BYTES_CACHE:
        closed = jax.make_jaxpr(lambda o: jax.tree_util.tree_leaves(_linear_map(o)))(op)
        inputs = {id(v) for v in closed.jaxpr.invars}
        seen, total = set(), 0
        for v in closed.jaxpr.outvars:
            if hasattr(v, "val") or id(v) in inputs or id(v) in seen:  # literal or input
                continue
            seen.add(id(v))
            total += int(np.prod(v.aval.shape, dtype=np.int64)) * np.dtype(v.aval.dtype).itemsize
        _BYTES_CACHE[key] = total
    mesh = getattr(op, "mesh", None)
    return _BYTES_CACHE[key] // (1 if mesh is None else mesh.size)


def default_cache_budget() -> float:
    """Bytes per device a cached linearisation may take by default: a quarter of the first
    local device's memory limit where the runtime reports one (GPUs, TPUs), else a quarter of
    the host's physical memory shared among its local devices."""
    device = jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 -- backends without memory statistics
        stats = {}
    if stats.get("bytes_limit"):
        return 0.25 * float(stats["bytes_limit"])
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 8 * 2**30
    return 0.25 * float(physical) / max(1, jax.local_device_count())


def with_cache(op, cache, cache_budget):
    """``op`` with its ``cache`` flag resolved ("auto": the linearisation fits the budget)."""
    if cache_budget is not None and (isinstance(cache_budget, bool)
                                     or not float(cache_budget) > 0):
        raise ValueError(f"`cache_budget` must be a positive number of bytes, got "
                         f"{cache_budget!r}.")
    if cache == "auto":
        budget = default_cache_budget() if cache_budget is None else float(cache_budget)
        cache = linearization_bytes(op) <= budget
    elif not isinstance(cache, bool):
        raise ValueError(f"`cache` must be True, False or 'auto', got {cache!r}.")
    return dataclasses.replace(op, cache=bool(cache))
