"""Checkpoint sources: where the parameters of each step come from.

A source lists finalised steps and loads one of them; :meth:`Analyzer.run` streams any source
through the metric pipeline (and follows a live one with ``watch=True``)::

    class Source(Protocol):
        def steps(self) -> list[int]: ...                   # finalised steps, ascending
        def load(self, step: int) -> tuple[params, state]:  # state: None if the model has none
            ...                                              # raises CheckpointError

Built in: :func:`orbax_checkpoints`, a directory written by ``orbax.checkpoint.CheckpointManager``
(the user's own, single-item or composite, or this package's training runs through
:func:`hessian_subspace.training.checkpoint.run_checkpoints`), and :func:`in_memory`, a mapping
``{step: params}`` or ``{step: (params, state)}``. Sources only read: nothing in a checkpoint
directory is created, renamed or deleted.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import jax
import numpy as np

from hessian_subspace import _tree

PyTree = Any


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unfinished, corrupt, or does not match the expected tree."""


class PeerLostError(RuntimeError):
    """A collective across the processes of a multi-process run failed: a peer process died or
    stopped answering. Not a property of the checkpoint being read, so no failure record is
    written for it; the run ends (``launch.analyze`` exits non-zero)."""


# What the runtime's errors say when a peer is gone (gloo on CPU, the coordination service).
_PEER_SIGNS = ("gloo", "connection closed by peer", "connection reset by peer",
               "deadline_exceeded", "deadline exceeded", "unavailable:", "heartbeat",
               "coordination service", "failed to connect", "broken pipe",
               "barrier timed out")


def peer_failure(error: BaseException, during: str) -> PeerLostError | None:
    """``error`` as a :class:`PeerLostError` naming the lost processes, if it is a collective
    failure of a multi-process run (None otherwise)."""
    if jax.process_count() <= 1:
        return None
    text = f"{type(error).__name__}: {error}".lower()
    if not any(sign in text for sign in _PEER_SIGNS):
        return None
    # Which peer is gone, the runtime does not say here (asking the coordination service
    # would wait on the dead peer); ``launch`` watches its peers and names it.
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return PeerLostError(
        f"process {jax.process_index()} of {jax.process_count()} lost a peer during {during}: "
        f"a collective across the processes failed ({first[:300]}); no record was written for "
        "it. Restart every process: finished records are reused.")


class Source(Protocol):
    """What :meth:`hessian_subspace.analysis.Analyzer.run` reads checkpoints from."""

    def steps(self) -> list[int]:
        """Finalised steps, ascending (re-read on every call, so a live run shows new ones)."""

    def load(self, step: int) -> tuple[PyTree, PyTree | None]:
        """``(params, state)`` of one step, or ``(params, state, extras)`` with a dict of
        anything else the analysis may use (``ctx["extras"]``: e.g. the optimizer state);
        raises :class:`CheckpointError`."""


class _QuietOrbax(logging.Filter):
    """Drops orbax's INFO chatter (several lines per save and restore) and its warnings about
    read-only managers, which are opened read-only on purpose; other orbax warnings stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" not in record.pathname:
            return True
        if record.levelno < logging.WARNING:
            return False
        message = record.getMessage()
        # "Skipping merge of OCDBT checkpoints": an optimizer state without arrays (plain SGD).
        return not ("read only" in message or "read_only=True" in message
                    or "Skipping merge of OCDBT" in message)


logging.getLogger("absl").addFilter(_QuietOrbax())


# --------------------------------------------------------------------------------------------
# Fitting a restored tree to the caller's template.


def _path_map(tree: PyTree) -> dict[str, Any]:
    return {_tree.path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def conform(tree: PyTree, like: PyTree, what: str) -> PyTree:
    """``tree`` (as restored: nested dicts and lists) in the structure of ``like``.

    Leaves are matched by structure when the structures agree, else by their "/"-joined key
    paths (a flax ``FrozenDict``, an nnx ``State`` or a dataclass restores as nested dicts with
    the same paths). Shapes must agree; floating leaves are cast to ``like``'s dtype.

    Raises:
      CheckpointError: naming the missing, extra or mis-shaped leaves.
    """
    like_leaves, treedef = jax.tree_util.tree_flatten(like)
    if jax.tree_util.tree_structure(tree) == treedef:
        leaves = jax.tree_util.tree_leaves(tree)
        names = [n for n, _, _ in _tree.leaf_slices(like)]
    else:
        have, want = _path_map(tree), _path_map(like)
        missing = [n for n in want if n not in have]
        if missing:
            raise CheckpointError(
                f"{what} does not match `like`: {len(missing)} leaves missing, e.g. "
                f"{missing[:4]}; the checkpoint has {sorted(have)[:8]}"
                f"{' ...' if len(have) > 8 else ''}")
        extra = [n for n in have if n not in want]
        if extra:
            raise CheckpointError(f"{what} has leaves that `like` lacks: {extra[:4]}")
        names = list(want)
        leaves = [have[n] for n in names]
    out = []
    for name, leaf, ref in zip(names, leaves, like_leaves, strict=True):
        shape = tuple(getattr(ref, "shape", np.shape(ref)))
        if tuple(np.shape(leaf)) != shape:
            raise CheckpointError(f"{what} leaf {name!r} has shape {tuple(np.shape(leaf))}, "
                                  f"`like` has {shape}")
        dtype = np.dtype(ref.dtype if hasattr(ref, "dtype") else np.result_type(ref))
        have = np.dtype(leaf.dtype if hasattr(leaf, "dtype") else np.result_type(leaf))
        if np.issubdtype(dtype, np.inexact) and have != dtype:
            leaf = leaf.astype(dtype) if isinstance(leaf, jax.Array) else \
                np.asarray(leaf).astype(dtype)
        out.append(leaf)
    return treedef.unflatten(out)


def _subtree(tree: PyTree, key: str | Sequence | None, what: str) -> PyTree:
    if key is None:
        return tree
    parts = key.split("/") if isinstance(key, str) else list(key)
    node = tree
    for i, part in enumerate(parts):
        try:
            node = node[int(part)] if isinstance(node, (list, tuple)) else node[part]
        except (KeyError, IndexError, TypeError, ValueError):
            where = "/".join(str(p) for p in parts[:i]) or "(root)"
            keys = list(node) if isinstance(node, Mapping) else type(node).__name__
            raise CheckpointError(f"{what}: no key {part!r} under {where}; it has {keys}") \
                from None
    return node


# --------------------------------------------------------------------------------------------
# Orbax directories.


def _manager(directory: str):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                           save_root_metadata=False,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory, options=options)


class OrbaxCheckpoints:
    """A directory of orbax checkpoints, read-only (see :func:`orbax_checkpoints`)."""

    def __init__(self, directory: str | os.PathLike, *, like: PyTree = None,
                 state_like: PyTree = None, item: str | None = None,
                 state_item: str | None = None,
                 params_key: str | Sequence | None = None, state_key: str | Sequence | None = None,
                 select: Callable[[PyTree], tuple[PyTree, PyTree]] | None = None,
                 meta_item: str | None = None,
                 verify: Callable[[dict, PyTree, PyTree], None] | None = None,
                 final_step: int | None = None, exact: bool = False,
                 extra_items: Sequence[str] = ()):
        self.directory = os.path.abspath(os.fspath(directory))
        if select is not None and not callable(select):
            raise TypeError(f"`select` must be callable, got {type(select).__name__}")
        if select is not None and (params_key is not None or state_key is not None):
            raise ValueError("give either `select` or `params_key`/`state_key`, not both")
        if state_item is not None and item is None:
            raise ValueError("`state_item` needs `item` (the item of the parameters)")
        if state_item is not None and select is not None:
            raise ValueError("give either `select` or `state_item`, not both")
        for name, value in (("item", item), ("state_item", state_item), ("meta_item", meta_item)):
            if value is not None and not (isinstance(value, str) and value):
                raise ValueError(f"`{name}` must be a non-empty string, got {value!r}")
        self.like, self.state_like = like, state_like
        self.item, self.state_item = item, state_item
        self.params_key, self.state_key = params_key, state_key
        self.select, self.meta_item, self.verify = select, meta_item, verify
        self.final_step = final_step
        # The item holds exactly `like` (and `state_like`) at the keys: restore with them as
        # the target, so that arrays land on their shardings (orbax's multi-host path).
        self.exact = bool(exact) and like is not None and select is None
        self.extra_items = tuple(extra_items)
        if self.extra_items and item is None:
            raise ValueError("`extra_items` needs `item` (a composite checkpoint)")

    def steps(self) -> list[int]:
        if not os.path.isdir(self.directory):
            return []
        manager = _manager(self.directory)
        try:
            return sorted(int(s) for s in manager.all_steps())
        finally:
            manager.close()

    def _restore(self, step: int) -> tuple[PyTree, PyTree, dict, dict]:
        import orbax.checkpoint as ocp

        manager = _manager(self.directory)
        try:
            if step not in manager.all_steps():
                raise CheckpointError(f"no finalised checkpoint for step {step} in "
                                      f"{self.directory}")
            try:
                if self.item is None and self.meta_item is None:
                    return manager.restore(step, args=ocp.args.StandardRestore()), None, {}, {}
                items = {self.item: ocp.args.StandardRestore(self._target())}
                if self.state_item is not None:
                    items[self.state_item] = ocp.args.StandardRestore()
                if self.meta_item is not None:
                    items[self.meta_item] = ocp.args.JsonRestore()
                for name in self.extra_items:
                    items[name] = ocp.args.StandardRestore()
                out = manager.restore(step, args=ocp.args.Composite(**items))
                meta = dict(out[self.meta_item] or {}) if self.meta_item else {}
                state = out[self.state_item] if self.state_item is not None else None
                return out[self.item], state, meta, {n: out[n] for n in self.extra_items}
            except ValueError as e:
                if "Composite" in str(e) and self.item is None:
                    names = sorted(dict(manager.item_metadata(step) or {}))
                    raise CheckpointError(
                        f"step {step} in {self.directory} has several items {names}; say which "
                        f"one holds the parameters with `item=`") from None
                raise
        except CheckpointError:
            raise
        except Exception as e:  # orbax raises many types for missing, corrupt or odd trees
            lost = peer_failure(e, f"the restore of step {step} from {self.directory}")
            if lost is not None:
                raise lost from e
            first = _first_line(e)
            first = first if len(first) <= 300 else first[:300] + " ..."
            raise CheckpointError(f"cannot restore step {step} from {self.directory}: "
                                  f"{type(e).__name__}: {first}") from e
        finally:
            manager.close()

    def _target(self):
        """The abstract restore target of the item (None: restore what is there)."""
        if not self.exact or self.item is None:
            return None
        import orbax.checkpoint as ocp

        def abstract(tree):
            return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)

        if self.params_key is None:
            return abstract(self.like)
        if not isinstance(self.params_key, str) or "/" in self.params_key or (
                self.state_key is not None and not isinstance(self.state_key, str)):
            return None
        target = {self.params_key: abstract(self.like)}
        if self.state_key is not None:
            if self.state_like is None:
                return None
            target[self.state_key] = abstract(self.state_like)
        return target

    def load(self, step: int) -> tuple[PyTree, PyTree | None]:
        """``(params, state)`` of ``step``; raises :class:`CheckpointError`."""
        tree, state_tree, meta, extras = self._restore(int(step))
        what = f"step {step} in {self.directory}"
        if self.select is not None:
            try:
                params, state = self.select(tree)
            except Exception as e:
                raise CheckpointError(f"{what}: `select` failed: {type(e).__name__}: {e}") from e
        else:
            params = _subtree(tree, self.params_key, what)
            if state_tree is not None:
                state = _subtree(state_tree, self.state_key, what)
            else:
                state = None if self.state_key is None else _subtree(tree, self.state_key, what)
        if self.verify is not None:
            self.verify(meta, params, state)
        if self.like is not None:
            params = conform(params, self.like, f"{what} (params)")
        if self.state_like is not None and state is not None:
            state = conform(state, self.state_like, f"{what} (state)")
        return (params, state, extras) if self.extra_items else (params, state)

    def describe(self) -> dict:
        return dict(kind="orbax", directory=self.directory, item=self.item,
                    state_item=self.state_item, params_key=_key_text(self.params_key),
                    state_key=_key_text(self.state_key))


def _first_line(error: BaseException) -> str:
    """The first informative line of an error (orbax and TensorStore wrap the cause; some of
    their errors print only a bound method)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error).strip()
        if text and "bound method" not in text and not text.startswith("<"):
            line = text.splitlines()[0]
            return line if len(line) <= 300 else line[:300] + " ..."
        error = error.__cause__ or error.__context__
    return ""


def _key_text(key) -> str | None:
    return key if key is None or isinstance(key, str) else "/".join(str(k) for k in key)


def orbax_checkpoints(directory: str | os.PathLike, *, like: PyTree = None,
                      state_like: PyTree = None, item: str | None = None,
                      state_item: str | None = None,
                      params_key: str | Sequence | None = None,
                      state_key: str | Sequence | None = None,
                      select: Callable[[PyTree], tuple[PyTree, PyTree]] | None = None
                      ) -> OrbaxCheckpoints:
    """A directory written by ``orbax.checkpoint.CheckpointManager``, as a checkpoint source.

    Say where the parameters are: a single-item checkpoint
    (``manager.save(step, args=ocp.args.StandardSave(params))``) needs nothing; a composite one
    (``args=ocp.args.Composite(state=..., extra=...)``) needs ``item="state"``; if the item holds
    more than the parameters (a flax ``TrainState``: ``{"params", "opt_state", "step"}``), give
    ``params_key="params"`` (a "/"-separated path) and, for frozen model state,
    ``state_key="batch_stats"``; if the state is an item of its own
    (``args=ocp.args.Composite(params=..., batch_stats=...)``), ``state_item="batch_stats"``; or
    give ``select(item_tree) -> (params, state)`` instead.

    Args:
      directory: the manager's directory (only read).
      like: the parameters, or ``jax.ShapeDtypeStruct``s of them: restored leaves are matched
        to it (by structure, else by key path), shape-checked and cast to its dtypes, so the
        analysed tree has exactly the structure the loss expects (a flax ``FrozenDict``, an nnx
        ``State``, an Equinox module). None: the tree as restored (nested dicts).
      state_like: the same for the model state.
      item: the item of a composite checkpoint that holds the parameters.
      state_item: the item that holds the model state, when it is not ``item``.
      params_key: path of the parameters inside the item (None: the item is the parameters).
      state_key: path of the model state inside ``state_item`` or else ``item`` (None: the
        whole ``state_item``, or no state).
      select: ``select(item_tree) -> (params, state)``, instead of the keys.

    Returns:
      An :class:`OrbaxCheckpoints` source (``steps()``, ``load(step)``).

    Example::

        mngr = ocp.CheckpointManager("ckpts")
        mngr.save(step, args=ocp.args.StandardSave(params))
        ...
        analyzer.run(analysis.orbax_checkpoints("ckpts", like=params))
    """
    return OrbaxCheckpoints(directory, like=like, state_like=state_like, item=item,
                            state_item=state_item, params_key=params_key, state_key=state_key,
                            select=select)


# --------------------------------------------------------------------------------------------
# In memory.


class InMemory:
    """Checkpoints held in memory (see :func:`in_memory`)."""

    def __init__(self, checkpoints: Mapping[int, Any] | Iterable[tuple]):
        items = checkpoints.items() if isinstance(checkpoints, Mapping) else checkpoints
        self._data: dict[int, tuple[PyTree, PyTree | None]] = {}
        for entry in items:
            if not isinstance(entry, tuple) or len(entry) not in (2, 3):
                raise TypeError("in-memory checkpoints are (step, params) or "
                                "(step, params, state) tuples, or a {step: params} mapping; got "
                                f"{type(entry).__name__}")
            step, value = entry[0], entry[1:]
            if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
                raise ValueError(f"checkpoint steps must be ints >= 0, got {step!r}")
            if len(value) == 1 and isinstance(value[0], tuple) and len(value[0]) == 2 \
                    and isinstance(checkpoints, Mapping):
                value = value[0]  # {step: (params, state)}
            self._data[int(step)] = (value[0], value[1] if len(value) == 2 else None)

    def steps(self) -> list[int]:
        return sorted(self._data)

    def load(self, step: int) -> tuple[PyTree, PyTree | None]:
        if step not in self._data:
            raise CheckpointError(f"no checkpoint for step {step} in memory")
        return self._data[step]

    def describe(self) -> dict:
        return dict(kind="in_memory", steps=self.steps())


def in_memory(checkpoints: Mapping[int, Any] | Iterable[tuple]) -> InMemory:
    """A source from ``{step: params}``, ``{step: (params, state)}`` or an iterable of
    ``(step, params)`` / ``(step, params, state)`` tuples."""
    return InMemory(checkpoints)


def describe_location(source: Any) -> str:
    """Where a source reads from, for messages: its directory, or what it is."""
    directory = getattr(source, "directory", None)
    if directory:
        return f"the checkpoint directory {directory}" + (
            "" if os.path.isdir(directory) else " (it does not exist)")
    if isinstance(source, InMemory):
        return "the in-memory checkpoints"
    return f"the checkpoint source {type(source).__name__}"


def as_source(source: Any) -> Source:
    """``source`` itself if it has ``steps`` and ``load``, else :func:`in_memory` of it."""
    if callable(getattr(source, "steps", None)) and callable(getattr(source, "load", None)):
        return source
    if isinstance(source, (str, os.PathLike)):
        raise TypeError(f"got the path {os.fspath(source)!r}; wrap it: "
                        "analysis.orbax_checkpoints(path, like=params)")
    return in_memory(source)
