"""Train-state checkpoints with orbax (the only module that imports orbax).

A checkpoint at step t holds θ_t (the parameters after t optimizer updates) in three items:

- ``model``: ``{"params": ..., "model_state": ...}`` (model_state: e.g. batch-norm statistics);
- ``optimizer``: the optax state (absent from analysis restores: no optimizer needed);
- ``meta``: JSON with the step, the run's config and anything else the writer adds.

Only finalised checkpoints are ever listed or read (orbax writes to a temporary directory and
renames it when complete), and readers open the directory read-only.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any
MODEL, OPTIMIZER, META = "model", "optimizer", "meta"


class _QuietOrbax(logging.Filter):
    """Drops orbax's INFO chatter (several lines per save and restore) and its warnings about
    read-only managers, which we open read-only on purpose; other orbax warnings stay."""

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


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unfinished, corrupt, or does not match the expected tree."""


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
        """Starts saving the state at ``step`` (returns before the write finishes)."""
        meta = dict(meta, step=int(step))
        self._manager.save(int(step), args=ocp.args.Composite(**{
            MODEL: ocp.args.StandardSave({"params": params, "model_state": model_state}),
            OPTIMIZER: ocp.args.StandardSave(opt_state),
            META: ocp.args.JsonSave(meta),
        }))

    def wait(self) -> None:
        """Blocks until every started save is finalised on disk."""
        self._manager.wait_until_finished()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore_train_state(self, step: int, target: dict) -> dict:
        """Restores ``{"params", "model_state", "opt_state"}`` shaped like ``target``."""
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        out = self._manager.restore(step, args=ocp.args.Composite(**{
            MODEL: ocp.args.StandardRestore(
                {"params": abstract["params"], "model_state": abstract["model_state"]}),
            OPTIMIZER: ocp.args.StandardRestore(abstract["opt_state"]),
            META: ocp.args.JsonRestore(),
        }))
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


def list_steps(directory: str | os.PathLike) -> list[int]:
    """Finalised checkpoint steps in ``directory`` (sorted; [] if none or no directory).

    Read-only: nothing in ``directory`` is created, renamed or deleted.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    manager = ocp.CheckpointManager(os.path.abspath(directory),
                                    options=_options(read_only=True),
                                    item_names=(MODEL, OPTIMIZER, META))
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def restore_model(directory: str | os.PathLike, step: int, target: dict | None = None
                  ) -> tuple[PyTree, PyTree, dict]:
    """Restores (params, model_state, meta) of one checkpoint, read-only, without the optimizer.

    Args:
      directory: the run's checkpoint directory.
      step: a finalised step (see :func:`list_steps`).
      target: optional ``{"params": ..., "model_state": ...}`` of arrays or
        ``jax.ShapeDtypeStruct`` giving the expected tree; a checkpoint that does not match it
        raises :class:`CheckpointError`.

    Returns:
      ``(params, model_state, meta)``.

    Raises:
      CheckpointError: the step is missing, unreadable, corrupt or does not match ``target``.
    """
    directory = os.path.abspath(os.fspath(directory))
    manager = ocp.CheckpointManager(directory, options=_options(read_only=True),
                                    item_names=(MODEL, OPTIMIZER, META))
    try:
        if step not in manager.all_steps():
            raise CheckpointError(f"no finalised checkpoint for step {step} in {directory}")
        model_args = ocp.args.StandardRestore(
            None if target is None else
            jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target))
        try:
            out = manager.restore(step, args=ocp.args.Composite(**{
                MODEL: model_args, META: ocp.args.JsonRestore()}))
        except Exception as e:  # orbax raises many types for corrupt or mismatched trees
            raise CheckpointError(
                f"cannot restore step {step} from {directory}: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}") from e
        model = out[MODEL]
        if target is not None:
            want = jax.tree_util.tree_structure(target)
            got = jax.tree_util.tree_structure(model)
            if want != got:
                raise CheckpointError(
                    f"step {step} in {directory} has tree {got}, expected {want}")
        return model["params"], model.get("model_state", {}), dict(out[META] or {})
    finally:
        manager.close()
