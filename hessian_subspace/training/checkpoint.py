"""Train-state checkpoints of this package's training runs, with orbax.

A checkpoint at step t holds θ_t (the parameters after t optimizer updates) in three items:

- ``model``: ``{"params": ..., "model_state": ...}`` (model_state: e.g. batch-norm statistics);
- ``optimizer``: the optax state (never read by the analysis);
- ``meta``: JSON with the step, the run's config, and a **content checksum** of params and
  model state (SHA-256 over every leaf's path, dtype, shape and bytes), verified whenever a
  checkpoint is read: a flipped bit becomes a :class:`CheckpointError`, not wrong weights.

Only finalised checkpoints are listed or read (orbax writes to a temporary directory and renames
it when complete), and readers open the directory read-only
(:func:`hessian_subspace.analysis.orbax_checkpoints`, which reads any orbax directory).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from hessian_subspace import _tree
from hessian_subspace.analysis import sources
from hessian_subspace.analysis.sources import CheckpointError

PyTree = Any
MODEL, OPTIMIZER, META = "model", "optimizer", "meta"
CHECKSUM = "sha256-leaves-v1"

__all__ = ["CheckpointError", "CheckpointWriter", "checksum", "list_steps", "read_meta",
           "run_checkpoints"]


def checksum(tree: PyTree) -> str:
    """SHA-256 over every leaf of ``tree`` (key path, dtype, shape, bytes), in flatten order."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = np.ascontiguousarray(_tree.to_host(leaf))
        h.update(f"{_tree.path_name(path)}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _verify(meta: dict, params: PyTree, model_state: PyTree) -> None:
    expected = (meta or {}).get("checksum")
    if not expected:  # checkpoints written before checksums existed
        return
    got = {"params": checksum(params), "model_state": checksum(model_state)}
    bad = [k for k in got if expected.get(k) != got[k]]
    if bad:
        raise CheckpointError(f"checksum mismatch in {', '.join(bad)} at step "
                              f"{meta.get('step')}: the checkpoint's data changed after it was "
                              "written")


def _options(read_only: bool, async_save: bool = True) -> ocp.CheckpointManagerOptions:
    return ocp.CheckpointManagerOptions(
        max_to_keep=None, create=not read_only, read_only=read_only,
        save_interval_steps=0 if read_only else 1,
        enable_async_checkpointing=async_save and not read_only,
        save_root_metadata=not read_only)


class CheckpointWriter:
    """Writes train-state checkpoints of one run (``save`` is asynchronous; ``close`` waits)."""

    def __init__(self, directory: str | os.PathLike, *, async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(
            self.directory, options=_options(read_only=False, async_save=async_save),
            item_names=(MODEL, OPTIMIZER, META))

    def save(self, step: int, *, params: PyTree, model_state: PyTree, opt_state: PyTree,
             meta: dict) -> None:
        """Starts saving the state at ``step`` (returns before the write finishes); ``meta``
        gains the step and the checksums of ``params`` and ``model_state``."""
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
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        out = self._manager.restore(step, args=ocp.args.Composite(**{
            MODEL: ocp.args.StandardRestore(
                {"params": abstract["params"], "model_state": abstract["model_state"]}),
            OPTIMIZER: ocp.args.StandardRestore(abstract["opt_state"]),
            META: ocp.args.JsonRestore(),
        }))
        _verify(out[META], out[MODEL]["params"], out[MODEL]["model_state"])
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
                    optimizer: bool = False) -> sources.OrbaxCheckpoints:
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
    return sources.OrbaxCheckpoints(directory, like=like, state_like=state_like, item=MODEL,
                                    params_key="params", state_key="model_state",
                                    meta_item=META, verify=_verify, final_step=final_step,
                                    exact=state_like is not None,
                                    extra_items=(OPTIMIZER,) if optimizer else ())


def list_steps(directory: str | os.PathLike) -> list[int]:
    """Finalised checkpoint steps in ``directory`` (sorted; [] if none or no directory)."""
    return sources.OrbaxCheckpoints(directory).steps()


def read_meta(directory: str | os.PathLike, step: int) -> dict:
    """The ``meta`` JSON of one checkpoint (the run's config, number of outputs, checksums)."""
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
