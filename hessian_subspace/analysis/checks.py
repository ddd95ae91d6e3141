"""What the :class:`hessian_subspace.analysis.Analyzer` checks before it computes or writes
anything: its arguments (steps, blocks), whether the loss takes a model state, and the loss /
outputs contract on one batch of the data (shapes only, ``jax.eval_shape``)."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import jax
import numpy as np

from hessian_subspace import _tree
from hessian_subspace.analysis import context as context_lib

PyTree = Any


def check_step(step) -> int:
    """``step`` as an int >= 0, or a ``ValueError`` naming it."""
    return _tree.check_int("step", step, 0)


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


class TransformContractError(ValueError):
    """A transform broke its contract at a checkpoint (an output key already in the record, a
    result that is not a dict of outputs, an output too large for a record): that
    checkpoint's record fails with this reason; the analysis goes on."""


def check_record_fields(record_fields: Mapping[str, Any] | None, chain) -> dict:
    """``record_fields`` as a dict, or a ``ValueError`` if a key is one the analyzer or a
    transform of ``chain`` writes."""
    from hessian_subspace.analysis.transforms import RESERVED_KEYS, key_clash

    fields = dict(record_fields or {})
    declared = dict(chain.record_keys(), **{k: "the analyzer" for k in RESERVED_KEYS})
    for key in fields:
        other = key_clash(str(key), declared)
        if other is not None:
            who = declared[other]
            who = who if who == "the analyzer" else f"transform {who!r}"
            raise ValueError(f"`record_fields`: {key!r} is a record key {who} writes; name the "
                             "field otherwise")
    return fields


def check_not_raw_bytes(name: str, data: PyTree) -> None:
    """A ``TypeError`` naming the leaf when a data set holds ``uint8`` arrays (raw image bytes,
    as the paper's models and ``training.train`` refuse them): scale them to floats first."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(data)[0]:
        if np.asarray(leaf[:1] if np.ndim(leaf) else leaf).dtype == np.uint8:
            raise TypeError(f"`{name}{jax.tree_util.keystr(path)}` holds uint8 values (raw "
                            "image bytes?); scale them to floats first, e.g. "
                            "x.astype(np.float32) / 255 (token ids: cast them to int32)")


def warn_float64_analysed_in_float32(params: PyTree) -> bool:
    """Warns (once per analyzer: returns True when it did) that float64 parameters are
    analysed in float32 (the analyzer's ``dtype``), as the core functions warn that JAX would
    cast them."""
    if not any(getattr(x, "dtype", None) == np.float64 for x in jax.tree_util.tree_leaves(params)):
        return False
    import warnings

    warnings.warn("`params` holds float64 arrays but the analysis runs in float32 "
                  "(analysis.Operator(dtype='float32')); pass operator=analysis.Operator("
                  "dtype='float64') to analyse them in float64 "
                  "(under a scoped jax.enable_x64), or float32 parameters.", UserWarning,
                  stacklevel=4)
    return True


def _nonfinite_paths(value: Any, path: str) -> list[str]:
    if isinstance(value, Mapping):
        return [p for k, v in value.items() for p in _nonfinite_paths(v, f"{path}/{k}")]
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return [p for i, v in enumerate(value) for p in _nonfinite_paths(v, f"{path}[{i}]")]
    if isinstance(value, (bool, np.bool_, str, bytes)) or value is None:
        return []
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):
        return []
    if not np.issubdtype(arr.dtype, np.inexact):
        return []
    # An error bar is +inf where it cannot be given (no spectral gap): recorded as null.
    bound = path.rsplit("/", 1)[-1].endswith("bound")
    bad = np.isnan(arr) if bound else ~np.isfinite(arr)
    return [path] if np.any(bad) else []


def check_finite_output(transform: str, key: str, value: Any) -> None:
    """A ``FloatingPointError`` naming the output when a recorded value is NaN or infinite
    (JSON would store it as null, looking like "not computed"); an error bar (a key ending in
    ``bound``) may be +inf: no bound."""
    bad = _nonfinite_paths(value, key)
    if bad:
        raise FloatingPointError(f"transform {transform!r} output non-finite values in "
                                 f"{', '.join(bad[:5])}")


@jax.jit
def count_nonfinite(tree) -> jax.Array:
    """The number of NaN/Inf entries in the floating leaves of ``tree``."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree)
              if jax.numpy.issubdtype(jax.numpy.result_type(x), jax.numpy.inexact)]
    return sum((jax.numpy.size(x) - jax.numpy.sum(jax.numpy.isfinite(x)))
               for x in leaves) if leaves else 0
