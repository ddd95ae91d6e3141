"""What the :class:`hessian_subspace.analysis.Analyzer` checks before it computes or writes
anything: its arguments (steps, blocks), whether the loss takes a model state, and the loss /
outputs contract on one batch of the data (shapes only, ``jax.eval_shape``)."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import jax
import numpy as np

from hessian_subspace.analysis import context as context_lib

PyTree = Any


def check_step(step) -> int:
    """``step`` as an int >= 0, or a ``ValueError`` naming it."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"`step` must be an int >= 0, got {step!r}")
    return int(step)


def check_block(block) -> tuple[str, ...] | None:
    """``block`` (a parameter-path prefix or a sequence of them) as a tuple; None stays None."""
    if block is None:
        return None
    blocks = (block,) if isinstance(block, str) else tuple(block) if isinstance(
        block, (list, tuple)) else None
    if not blocks or not all(isinstance(b, str) and b for b in blocks):
        raise ValueError(f"`block` must be a parameter-path prefix or a sequence of them, got "
                         f"{block!r}")
    return blocks


def required_positional(fn: Callable) -> int | None:
    """How many positional arguments ``fn`` needs (None when it cannot be told)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
               and p.default is p.empty)


def check_state_arg(loss_fn: Callable, state: PyTree) -> None:
    """A ``TypeError`` when a model state is given to a ``loss_fn(params, batch)`` or missing
    for a ``loss_fn(params, batch, state)`` (nothing when the signature cannot be read)."""
    needed = required_positional(loss_fn)
    if needed is None:
        return
    if state is None and needed >= 3:
        raise TypeError("`loss_fn` takes a model state (loss_fn(params, batch, state)); "
                        "pass it: analyzer(step, params, state)")
    if state is not None and needed == 2:
        raise TypeError("a model `state` was given but `loss_fn` takes (params, batch); "
                        "make it loss_fn(params, batch, state)")


def check_contract(loss_fn: Callable, output_fn: Callable | None, data: PyTree,
                   batch_size: int, params_like: PyTree, state: PyTree) -> None:
    """The loss (and the outputs, if given) evaluated on shapes only, on one batch of ``data``
    with parameters shaped like ``params_like``: a mismatch (a batch without the keys the loss
    reads, inputs of the wrong shape, float class labels, a vector loss) is a ``TypeError`` or
    ``ValueError`` naming ``data``/``loss_fn`` before anything is computed or written; integer
    labels ``data['y']`` are checked against the number of outputs."""
    n = min(batch_size, int(np.shape(jax.tree_util.tree_leaves(data)[0])[0]))
    batch = jax.tree_util.tree_map(lambda x: x[:n], data)
    bind = context_lib.default_bind(state)
    shapes = ", ".join(f"{jax.tree_util.keystr(path)}: {np.shape(x)} {np.asarray(x).dtype}"
                       for path, x in jax.tree_util.tree_leaves_with_path(batch))
    for label, fn in (("loss_fn", loss_fn), ("output_fn", output_fn)):
        if fn is None:
            continue
        try:
            out = jax.eval_shape(bind(fn), params_like, batch)
        except Exception as e:  # JAX, flax and user code raise many types
            kind = TypeError if isinstance(e, TypeError) else ValueError
            raise kind(f"`{label}` cannot be evaluated on a batch of `data` ({shapes}) "
                       f"with these `params`: {type(e).__name__}: {e}") from e
        if label == "loss_fn" and getattr(out, "shape", None) != ():
            raise ValueError(f"`loss_fn` must return the scalar mean loss of a batch, got {out}")
        y = data.get("y") if isinstance(data, Mapping) else None
        if label == "output_fn" and y is not None and np.ndim(out) >= 2 \
                and np.issubdtype(np.asarray(y).dtype, np.integer):
            lo, hi = int(np.min(y)), int(np.max(y))
            if lo < 0 or hi >= out.shape[-1]:
                raise ValueError(
                    f"`data['y']`: integer labels must be class indices in [0, "
                    f"{out.shape[-1]}) (`output_fn` gives {out.shape[-1]} outputs), "
                    f"found values in [{lo}, {hi}]")
