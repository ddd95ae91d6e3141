"""One checkpoint through a chain: the per-checkpoint step, without files.

:func:`apply` runs every transform of a chain on one checkpoint's
:class:`~hessian_subspace.analysis.Context` and returns what the checkpoint produced — the
transforms' record entries, the arrays they store, and each transform's new state — touching no
file. The :class:`~hessian_subspace.analysis.Analyzer` wraps it: it builds the context, adds
its bookkeeping (step, status, fingerprints ...) and hands the result to the store.

:func:`context` builds a checkpoint's context by hand (the Hessian of the mean loss over
``data``), so a chain can be run and tested with no results directory at all::

    ctx = analysis.step.context(0, params, loss_fn, data, batch_size=256)
    out = analysis.step.apply(pipe, ctx, pipe.init(ctx))
    out.record["f_top"], out.stored, out.state["eigenpairs"]["eigenvectors"]

State carries everything a transform needs from earlier checkpoints (the previous basis of a
warm start, the reference bases of subspace overlaps): pass the previous step's ``out.state``
to the next step's ``apply``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import numpy as np

from hessian_subspace import _tree, blocks, curvature, layout
from hessian_subspace.analysis import checks
from hessian_subspace.analysis import context as context_lib
from hessian_subspace.analysis.transforms import RESERVED_FOLDERS, RESERVED_KEYS, Chain, Stored

PyTree = Any


class StepResult(NamedTuple):
    """What one checkpoint produced (:func:`apply`)."""

    record: dict[str, Any]  # the transforms' record entries, then hvps.
    stored: dict[str, dict[str, np.ndarray]]  # folder -> arrays (the `Stored` outputs).
    state: dict[str, PyTree]  # transform name -> its state after this checkpoint.


def apply(chain: Chain, ctx: context_lib.Context, state: Mapping[str, PyTree], *,
          taken: Iterable[str] = ()) -> StepResult:
    """Runs every transform of ``chain`` in order on ``ctx``.

    Args:
      chain: the transforms (:func:`~hessian_subspace.analysis.chain`).
      ctx: this checkpoint's context; each transform's outputs are added to it.
      state: every transform's state before this checkpoint, by name (``chain.init(ctx)``
        before the first one).
      taken: record keys already used (the analyzer's bookkeeping and fields): an output under
        one of them breaks the transform's contract.

    Returns:
      A :class:`StepResult`.

    Raises:
      TransformContractError: an output that is not a dict, a record key written twice, an
        output too big or of a kind a record cannot hold, or an array stored twice.
      FloatingPointError: a NaN (or an infinity outside an error bar) in a recorded output.
    """
    taken = set(taken) | set(RESERVED_KEYS)
    record: dict[str, Any] = {}
    stored: dict[str, dict] = {}
    new_state: dict[str, PyTree] = {}
    for t in chain.transforms:
        ctx.current = t.name
        outputs, new_state[t.name] = t.update(ctx, state[t.name])
        if not isinstance(outputs, Mapping):
            raise checks.TransformContractError(
                f"transform {t.name!r} returned {type(outputs).__name__}, not a dict of "
                "outputs")
        for key, value in outputs.items():
            if isinstance(value, Stored):
                if key in RESERVED_FOLDERS or not key or key.startswith(".") or any(
                        c in key for c in "/\\"):
                    raise checks.TransformContractError(
                        f"transform {t.name!r} stores arrays under {key!r}, which is not a "
                        "plain folder name (no path separator, no leading dot) or is a folder "
                        f"the results directory keeps ({', '.join(RESERVED_FOLDERS)}); choose "
                        "another key")
                arrays = stored.setdefault(key, {})
                clash = set(arrays) & set(value)
                if clash:
                    raise checks.TransformContractError(
                        f"transform {t.name!r} stores {sorted(clash)} in {key!r}, which an "
                        "earlier transform stored already")
                arrays.update({k: _tree.to_host(v) for k, v in value.items()})
                continue
            if key in t.context_only:
                continue
            if key in record or key in taken:
                raise checks.TransformContractError(
                    f"transform {t.name!r} outputs {key!r}, which is already in the record; "
                    "rename one of them (and declare the keys a transform writes with "
                    "records=..., so that chain() refuses a clash before any work)")
            try:
                record[key] = recordable(t.name, key, value)
            except ValueError as e:
                raise checks.TransformContractError(str(e)) from None
            checks.check_finite_output(t.name, key, record[key])
        ctx.add({k: v for k, v in outputs.items() if not isinstance(v, Stored)})
    ctx.current = None
    record["hvps"] = ctx.hvps
    return StepResult(record=record, stored=stored, state=new_state)


def context(step: int, params: PyTree, loss_fn: Callable, data: PyTree, *,
            batch_size: int = 1000, state: PyTree = None, test_data: PyTree = None,
            seed: int = 0, extras: Mapping[str, Any] | None = None) -> context_lib.Context:
    """A checkpoint's context with no analyzer and no results directory: the Hessian of the mean
    of ``loss_fn`` over ``data`` at ``params`` (float32 or whatever ``params`` are; no mesh).

    Args:
      step: the checkpoint's step.
      params: its parameters.
      loss_fn: ``loss(params, batch)``, or ``loss(params, batch, state)`` with ``state``.
      data: the analysis set (a pytree of arrays with a leading example axis).
      batch_size: examples per batch of the data-set means.
      state: frozen model state (None: none).
      test_data: a test set for :func:`~hessian_subspace.analysis.loss`.
      seed: the seed of ``ctx.rng``.
      extras: the rest of the checkpoint the transforms may read as ``ctx["extras"]`` (e.g.
        the optimizer state).
    """
    step = checks.check_step(step)
    batch_size = _tree.check_int("batch_size", batch_size, 1)
    checks.check_state_arg(loss_fn, state)
    bind = context_lib.default_bind(state)
    bound_loss = bind(loss_fn)
    batches = layout.batch_data(data, batch_size=batch_size)
    test_batches = None if test_data is None else layout.batch_data(test_data,
                                                                    batch_size=batch_size)

    def make_operator(curvature_name=None, *, block="default", output_fn=None,
                      output_loss=None):
        if curvature_name not in (None, "hessian") or output_fn is not None:
            raise ValueError("a context made by step.context offers the Hessian only; use an "
                             "Analyzer for the Gauss-Newton matrix")
        op = curvature.dataset_hvp(bound_loss, params, batches)
        block = None if block == "default" else checks.check_block(block)
        return op if block is None else blocks.restrict(op, list(block))

    entries = dict(params=params, state=state, loss_fn=bound_loss, data=data,
                   test_data=test_data, batches=batches, test_batches=test_batches,
                   batch_size=batch_size, operator=make_operator(), extras=dict(extras or {}),
                   dtype=str(np.dtype(_tree.resolve_dtype(None, params))),
                   precision=None, seed=seed, output_fn=None, output_loss=None)
    return context_lib.Context(step, entries, seed=seed, make_operator=make_operator, bind=bind)


# --------------------------------------------------------------------------------------------
# Outputs of transforms as they go into records.

MAX_RECORDED = 100_000


def recordable(transform: str, key: str, value: Any) -> Any:
    """An output as it goes into the record (numbers, short arrays, dicts of them)."""
    size = sum(np.size(x) for x in jax.tree_util.tree_leaves(value)
               if hasattr(x, "shape") or isinstance(x, (list, tuple)))
    if size > MAX_RECORDED:
        raise ValueError(f"output {key!r} of transform {transform!r} holds {size} numbers; "
                         "return it as analysis.Stored(...) or list it in `context_only`")
    return host_values(value)


def host_values(value: Any) -> Any:
    """Device arrays in ``value`` as host arrays; dicts keep their key order (which
    ``tree_map`` would sort: the order of layers in a record is the parameters' order)."""
    if isinstance(value, jax.Array):
        return _tree.to_host(value)
    if isinstance(value, dict):
        return type(value)((k, host_values(v)) for k, v in value.items())
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(host_values(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(host_values(v) for v in value)
    return jax.tree_util.tree_map(
        lambda x: _tree.to_host(x) if isinstance(x, jax.Array) else x, value)
