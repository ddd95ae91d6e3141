"""The checkpoint format: orbax directories as they are read by the analysis and written by
training, below both.

Reading any orbax directory (a user's own, single-item or composite) — :func:`orbax_checkpoints`,
:class:`OrbaxCheckpoints`, :func:`conform` (a restored tree fitted to the caller's template) —
only reads: nothing in a checkpoint directory is created, renamed or deleted.

This package's train-state checkpoints (:class:`CheckpointWriter`, :func:`run_checkpoints`,
:func:`read_meta`, :func:`list_steps`): a checkpoint at step t holds θ_t (the parameters after t
optimizer updates) in three items,

- ``model``: ``{"params": ..., "model_state": ...}`` (model_state: e.g. batch-norm statistics);
- ``optimizer``: the optax state (read by the analysis only when asked for);
- ``meta``: JSON with the step, the run's config, and a **content checksum** of params and
  model state (SHA-256 over every leaf's path, dtype, shape and bytes), verified whenever a
  checkpoint is read: a flipped bit becomes a :class:`CheckpointError`, not wrong weights.

Only finalised checkpoints are listed or read (orbax writes to a temporary directory and renames
it when complete). Errors: :class:`CheckpointError` (this checkpoint cannot be used) and
:class:`PeerLostError` (a collective of a multi-process restore failed: not the checkpoint's
fault, so no failure record is written for it).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from hessian_subspace import _tree

PyTree = Any
MODEL, OPTIMIZER, META = "model", "optimizer", "meta"
CHECKSUM = "sha256-leaves-v1"


def _ocp():
    """orbax.checkpoint, imported when a checkpoint is first read or written (importing the
    analysis should not cost orbax's import time)."""
    import orbax.checkpoint as ocp

    return ocp


__all__ = ["CheckpointError", "CheckpointWriter", "OrbaxCheckpoints", "PeerLostError",
           "checksum", "conform", "list_steps", "orbax_checkpoints", "peer_failure",
           "read_meta", "run_checkpoints"]


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
    ocp = _ocp()
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
        ocp = _ocp()
        manager = _manager(self.directory)
        try:
            if step not in manager.all_steps():
                raise CheckpointError(f"no finalised checkpoint for step {step} in "
                                      f"{self.directory}")
            try:
                if self.item is None and self.meta_item is None:
                    args = ocp.args.StandardRestore(self._placed_target())
                    return manager.restore(step, args=args), None, {}, {}
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
            first = first_line(e)
            first = first if len(first) <= 300 else first[:300] + " ..."
            raise CheckpointError(f"cannot restore step {step} from {self.directory}: "
                                  f"{type(e).__name__}: {first}") from e
        finally:
            manager.close()

    def _placed_target(self):
        """For a single-item checkpoint that is the parameters, with ``like`` made of
        ``ShapeDtypeStruct``s placed on devices (a mesh): the restore target, so that each
        array lands on its sharding and every process reads only its shards (orbax's
        multi-host path). None otherwise: restore what is there."""
        leaves = jax.tree_util.tree_leaves(self.like)
        if (not leaves or self.params_key is not None or self.select is not None
                or not all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None
                           for x in leaves)):
            return None
        return jax.tree_util.tree_map(_ocp().utils.to_shape_dtype_struct, self.like)

    def _target(self):
        """The abstract restore target of the item (None: restore what is there)."""
        if not self.exact or self.item is None:
            return None
        ocp = _ocp()

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


def first_line(error: BaseException) -> str:
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
# This package's train-state checkpoints.


def checksum(tree: PyTree) -> str:
    """SHA-256 over every leaf of ``tree`` (key path, dtype, shape, bytes), in flatten order."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = np.ascontiguousarray(_tree.to_host(leaf))
        h.update(f"{_tree.path_name(path)}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def verify(meta: dict, params: PyTree, model_state: PyTree) -> None:
    expected = (meta or {}).get("checksum")
    if not expected:  # checkpoints written before checksums existed
        return
    got = {"params": checksum(params), "model_state": checksum(model_state)}
    bad = [k for k in got if expected.get(k) != got[k]]
    if bad:
        raise CheckpointError(f"checksum mismatch in {', '.join(bad)} at step "
                              f"{meta.get('step')}: the checkpoint's data changed after it was "
                              "written")


def _options(read_only: bool, async_save: bool = True):
    return _ocp().CheckpointManagerOptions(
        max_to_keep=None, create=not read_only, read_only=read_only,
        save_interval_steps=0 if read_only else 1,
        enable_async_checkpointing=async_save and not read_only,
        save_root_metadata=not read_only)


class CheckpointWriter:
    """Writes train-state checkpoints of one run (``save`` is asynchronous; ``close`` waits)."""

    def __init__(self, directory: str | os.PathLike, *, async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = _ocp().CheckpointManager(
            self.directory, options=_options(read_only=False, async_save=async_save),
            item_names=(MODEL, OPTIMIZER, META))

    def save(self, step: int, *, params: PyTree, model_state: PyTree, opt_state: PyTree,
             meta: dict) -> None:
        """Starts saving the state at ``step`` (returns before the write finishes); ``meta``
        gains the step and the checksums of ``params`` and ``model_state``."""
        ocp = _ocp()
        params, model_state = jax.device_get((params, model_state))
        self._check_space(step, (params, model_state, opt_state))
        meta = dict(meta, step=int(step), checksum=dict(
            algorithm=CHECKSUM, params=checksum(params), model_state=checksum(model_state)))
        self._manager.save(int(step), args=ocp.args.Composite(**{
            MODEL: ocp.args.StandardSave({"params": params, "model_state": model_state}),
            OPTIMIZER: ocp.args.StandardSave(opt_state),
            META: ocp.args.JsonSave(meta),
        }))

    def _check_space(self, step: int, tree: PyTree) -> None:
        """An ``OSError`` (ENOSPC) naming the directory when the disk cannot hold another
        checkpoint, before orbax starts writing it in a background thread (whose failure would
        surface as a cascade of tracebacks naming no file)."""
        # Twice the arrays, and orbax's metadata files (~40 kB, more in 4 kB blocks).
        need = 2 * sum(int(np.asarray(x).nbytes) for x in jax.tree_util.tree_leaves(tree)) \
            + (256 << 10)
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise OSError(errno.ENOSPC, f"No space left on device: {self.directory} has "
                                        f"{free} bytes free, the checkpoint of step {step} "
                                        f"needs about {need}")

    def wait(self) -> None:
        """Blocks until every started save is finalised on disk.

        Raises:
          OSError: a save failed (a full disk), naming the checkpoint directory.
        """
        try:
            self._manager.wait_until_finished()
        except OSError as e:
            raise OSError(e.errno, f"{e.strerror or e}: cannot write a checkpoint in "
                                   f"{self.directory}") from e

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore_train_state(self, step: int, target: dict) -> dict:
        """Restores ``{"params", "model_state", "opt_state", "meta"}`` shaped like ``target``
        (for resuming); the checksum is verified."""
        ocp = _ocp()
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        out = self._manager.restore(step, args=ocp.args.Composite(**{
            MODEL: ocp.args.StandardRestore(
                {"params": abstract["params"], "model_state": abstract["model_state"]}),
            OPTIMIZER: ocp.args.StandardRestore(abstract["opt_state"]),
            META: ocp.args.JsonRestore(),
        }))
        verify(out[META], out[MODEL]["params"], out[MODEL]["model_state"])
        return dict(params=out[MODEL]["params"], model_state=out[MODEL]["model_state"],
                    opt_state=out[OPTIMIZER], meta=out[META])

    def close(self) -> None:
        self.wait()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def run_checkpoints(directory: str | os.PathLike, *, like: PyTree = None,
                    state_like: PyTree = None, final_step: int | None = None,
                    optimizer: bool = False) -> OrbaxCheckpoints:
    """The checkpoints of a training run of this package, as an analysis source: item
    ``model``, keys ``params`` and ``model_state``, checksums verified.

    Args:
      directory: the run's ``checkpoints/`` directory (only read).
      like: parameters (or ``ShapeDtypeStruct``s) the restored tree must match; with
        ``state_like`` too, they are the restore target, and their shardings say where the
        arrays go (every process reads only its shards: orbax's multi-host path).
      state_like: the same for the model state.
      final_step: the run's last step (``watch`` stops after it).
      optimizer: also restore the optimizer state (as restored: nested dicts and lists), as
        ``extras["optimizer"]`` of each checkpoint (e.g. Adam's second moment for
        :func:`hessian_subspace.analysis.views.adam_preconditioned`).
    """
    return OrbaxCheckpoints(directory, like=like, state_like=state_like, item=MODEL,
                                    params_key="params", state_key="model_state",
                                    meta_item=META, verify=verify, final_step=final_step,
                                    exact=state_like is not None,
                                    extra_items=(OPTIMIZER,) if optimizer else ())


def list_steps(directory: str | os.PathLike) -> list[int]:
    """Finalised checkpoint steps in ``directory`` (sorted; [] if none or no directory)."""
    return OrbaxCheckpoints(directory).steps()


def read_meta(directory: str | os.PathLike, step: int) -> dict:
    """The ``meta`` JSON of one checkpoint (the run's config, number of outputs, checksums)."""
    ocp = _ocp()
    manager = ocp.CheckpointManager(os.path.abspath(os.fspath(directory)),
                                    options=_options(read_only=True),
                                    item_names=(MODEL, OPTIMIZER, META))
    try:
        if step not in manager.all_steps():
            raise CheckpointError(f"no finalised checkpoint for step {step} in {directory}")
        try:
            out = manager.restore(step, args=ocp.args.Composite(**{
                META: ocp.args.JsonRestore()}))
        except Exception as e:  # orbax and json raise many types for a corrupt file
            path = os.path.join(os.path.abspath(os.fspath(directory)), str(step), META)
            raise CheckpointError(f"cannot read {path} (the meta item of step {step}): "
                                  f"{type(e).__name__}: {e}") from e
        meta = out[META]
        if not isinstance(meta, dict):
            raise CheckpointError(f"the meta item of step {step} in {directory} is not a JSON "
                                  f"object: {type(meta).__name__}")
        return meta
    finally:
        manager.close()
