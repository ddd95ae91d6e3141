"""Training with optax (SGD, momentum, Adam) and orbax train-state checkpoints, resumable.

The step functions are pure and jitted; :func:`train` is the loop around them: a deterministic
batch order (a function of the step alone), checkpoints on a schedule that is dense early
(the paper's metrics move within the first ~100 steps), a per-step JSON-lines log, and resume
from the last finalised checkpoint with bit-identical results on the same machine.

Step convention: the checkpoint and log entry "step t" describe θ_t, the parameters after t
optimizer updates (step 0 is the initialisation).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from tqdm import tqdm

from hessian_subspace import _io, curvature
from hessian_subspace.training import batches, tasks
from hessian_subspace import checkpoints as ckpt_lib

PyTree = Any

OPTIMIZERS = ("sgd", "momentum", "adam")
TRAIN_LOG = "train_log.jsonl"
CHECKPOINT_DIR = "checkpoints"


@flax.struct.dataclass
class TrainState:
    """Everything a training run needs to continue; a pytree."""

    step: jax.Array  # () int32: updates applied so far.
    params: PyTree
    opt_state: PyTree
    model_state: PyTree  # non-trainable collections, e.g. {"batch_stats": ...}


def make_optimizer(name: str, learning_rate: float, *, momentum: float = 0.9, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """The paper's optimizers: plain SGD (its default), SGD with momentum, Adam.

    Args:
      name: "sgd", "momentum" or "adam".
      learning_rate: η.
      momentum: heavy-ball coefficient for "momentum".
      b1, b2, eps: Adam's parameters.
    """
    if not learning_rate > 0:
        raise ValueError(f"`learning_rate` must be > 0, got {learning_rate}.")
    if name == "sgd":
        return optax.sgd(learning_rate)
    if name == "momentum":
        return optax.sgd(learning_rate, momentum=momentum)
    if name == "adam":
        return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
    raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}, got {name!r}.")


def init_train_state(model, tx: optax.GradientTransformation, key: jax.Array,
                     example_x) -> TrainState:
    """Initial parameters, model state and optimizer state (step 0)."""
    params, model_state = tasks.init_variables(model, key, example_x)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      model_state=model_state)


def make_train_step(model, tx: optax.GradientTransformation, task: str, seed: int
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """A jitted ``step(state, batch, **extra_args) -> (state, metrics)``.

    Dropout (if any) uses the key ``fold_in(key(seed), step)``, so a resumed run repeats it.
    ``metrics`` holds the mini-batch loss (and accuracy), measured in training mode on θ_t.
    ``extra_args`` go to ``tx.update`` (e.g. ``curvature_data`` for :mod:`optim`'s
    transformations): inputs of the compiled step, not captured constants.
    """
    loss_fn = tasks.train_loss_fn(model, task)
    base_key = jax.random.fold_in(jax.random.key(seed), 0x5EED)
    tx = optax.with_extra_args_support(tx)

    @jax.jit
    def step(state: TrainState, batch: dict, **extra_args) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(base_key, state.step)
        (loss, (model_state, outputs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.model_state, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra_args)
        params = optax.apply_updates(state.params, updates)
        metrics = tasks.batch_metrics(outputs, batch, task)
        metrics["loss"] = loss
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                          model_state=model_state), metrics

    return step


def evaluate(model, task: str, params: PyTree, model_state: PyTree, dataset: dict, *,
             batch_size: int = 1000) -> dict[str, float]:
    """Mean loss (and accuracy) of the model in inference mode over a whole data set."""
    metrics_fn = curvature.bind_state(tasks.inference_metrics(model, task), model_state)
    data = {"x": dataset["x"], "y": dataset["y"]}
    out = _dataset_metrics(metrics_fn, params, data, batch_size=min(batch_size, len(data["y"])))
    return {k: float(v) for k, v in out.items()}


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _dataset_metrics(metrics_fn, params: PyTree, data: dict, *, batch_size: int) -> dict:
    return curvature.dataset_mean(lambda b: metrics_fn(params, b), data, batch_size=batch_size)


@dataclasses.dataclass(frozen=True)
class CheckpointSchedule:
    """When to checkpoint: ``"1:100,10:1000,100"`` = every step up to 100, every 10 up to 1,000,
    then every 100; step 0 and the final step are always included.

    Each comma-separated term is ``every:until`` (inclusive) and the last is ``every`` alone.
    """

    spec: str = "1:100,10:1000,100"

    def __post_init__(self):
        self._parse()

    def _parse(self) -> list[tuple[int, float]]:
        terms = [t.strip() for t in str(self.spec).split(",") if t.strip()]
        if not terms:
            raise ValueError(f"empty checkpoint schedule {self.spec!r}")
        out, last_until = [], 0
        for i, term in enumerate(terms):
            parts = term.split(":")
            try:
                every = int(parts[0])
                until = int(parts[1]) if len(parts) == 2 else float("inf")
            except (ValueError, IndexError):
                raise ValueError(f"bad checkpoint schedule term {term!r} in {self.spec!r}; "
                                 "use every:until,...,every") from None
            if every < 1 or len(parts) > 2 or (len(parts) == 1 and i != len(terms) - 1) or \
                    until <= last_until:
                raise ValueError(f"bad checkpoint schedule term {term!r} in {self.spec!r}; "
                                 "use every:until,...,every with increasing until")
            out.append((every, until))
            last_until = until
        return out

    def should_save(self, step: int, num_steps: int) -> bool:
        if step == 0 or step == num_steps:
            return True
        start = 0
        for every, until in self._parse():
            if step <= until:
                return (step - start) % every == 0
            start = until
        return False

    def steps(self, num_steps: int) -> list[int]:
        return [s for s in range(num_steps + 1) if self.should_save(s, num_steps)]


class _JsonLines:
    """Append-only JSON-lines log that a resumed run first truncates to the restored step."""

    def __init__(self, path: str, keep_until_step: int | None):
        self.path = path
        if keep_until_step is None:
            lines = []
        else:
            lines = []
            if os.path.exists(path):
                with open(path) as f:
                    for line in f:
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError:
                            break  # a line cut by a kill: drop it and everything after
                        # θ_t's checkpoint record belongs to the restored state; its training
                        # record (the update t -> t+1) will be written again.
                        step = record.get("step", 0)
                        if step < keep_until_step or (step == keep_until_step and
                                                      record.get("event") == "checkpoint"):
                            lines.append(line if line.endswith("\n") else line + "\n")
        _io.write_text(path, "".join(lines))
        self._file = open(path, "a")

    def write(self, records: list[dict]) -> None:
        for r in records:
            self._file.write(json.dumps(r) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_train_log(workdir: str) -> list[dict]:
    """The records of a run's ``train_log.jsonl`` (a truncated last line is ignored)."""
    out = []
    path = os.path.join(workdir, TRAIN_LOG)
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def _placement(mesh, data_axes, batch_size):
    """``(place(state), put_batch(batch))`` for training on ``mesh`` (identity without one)."""
    if mesh is None:
        return (lambda state: state), (lambda batch: batch)
    from jax.sharding import NamedSharding, PartitionSpec

    from hessian_subspace import sharding

    if jax.process_count() > 1 and not mesh.is_fully_addressable:
        raise ValueError("multi-host training is not implemented: train on one host (a mesh of "
                         "its devices) and analyse the checkpoints on several")
    axes = sharding.data_axes(mesh, data_axes)
    size = sharding.data_parallel_size(mesh, axes)
    if batch_size % size:
        raise ValueError(f"`batch_size` {batch_size} must be a multiple of the mesh's data "
                         f"axes size {size} ({dict(mesh.shape)})")
    split = NamedSharding(mesh, PartitionSpec(axes))
    replicated = sharding.replicated(mesh)

    def place(state: TrainState) -> TrainState:
        return state.replace(
            step=jax.device_put(state.step, replicated),
            params=jax.device_put(state.params, sharding.fsdp_shardings(state.params, mesh)),
            opt_state=jax.device_put(state.opt_state,
                                     sharding.fsdp_shardings(state.opt_state, mesh)),
            model_state=jax.device_put(state.model_state, replicated))

    return place, lambda batch: jax.device_put(batch, split)


def _tree_is_finite(tree) -> bool:
    leaves = jax.tree_util.tree_leaves(tree)
    return bool(all(jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype,
                                                                                jnp.inexact)))


def _num_outputs(model, example_x) -> int:
    """The size of the model's last output axis (shapes only), or a ValueError naming the
    inputs the model cannot take."""
    try:
        out = jax.eval_shape(lambda x: model.init_with_output(
            jax.random.key(0), x, train=False)[0], example_x)
    except Exception as e:  # flax/JAX raise many types for inputs of the wrong shape
        raise ValueError(f"the model cannot be applied to `train_set['x']` (one example of "
                         f"shape {np.shape(example_x)[1:]}, dtype {np.asarray(example_x).dtype})"
                         f": {type(e).__name__}: {e}") from e
    return int(out.shape[-1])


def _resume(writer, state: TrainState, meta: dict, workdir: str) -> tuple[TrainState, bool]:
    """The state of the last finalised checkpoint in ``writer`` (and True), or ``state`` (and
    False) when there is none. A checkpoint of another run (``meta["identity"]``) is refused."""
    done = writer.all_steps()
    if not done:
        return state, False
    restored = writer.restore_train_state(done[-1], {
        "params": state.params, "model_state": state.model_state,
        "opt_state": state.opt_state})
    old = restored["meta"].get("identity")
    if "identity" in meta and old is not None and old != meta["identity"]:
        writer.close()
        raise ValueError(
            f"{workdir} holds checkpoints of a different run (config differs); use a new "
            "workdir or delete the old checkpoints.")
    logging.info("Resuming from step %d in %s", done[-1], workdir)
    return TrainState(step=jnp.asarray(done[-1], jnp.int32), params=restored["params"],
                      opt_state=restored["opt_state"],
                      model_state=restored["model_state"]), True


class _PendingMetrics:
    """Training metrics still on the device, fetched and logged together at a flush (one
    transfer per log interval); a non-finite loss raises there."""

    def __init__(self, log, writer):
        self.log, self.writer = log, writer
        self.pending: list[tuple[int, dict]] = []
        self.last: dict = {}  # the last logged record

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def flush(self) -> None:
        if not self.pending:
            return
        values = jax.device_get([m for _, m in self.pending])
        records = []
        for (s, _), m in zip(self.pending, values, strict=True):
            m = {k: float(v) for k, v in m.items()}
            if not np.isfinite(m["loss"]):
                raise FloatingPointError(
                    f"non-finite training loss at step {s}; last checkpoint kept: "
                    f"{self.writer.all_steps()[-1:]}")
            records.append(dict(step=s, event="train", **m))
        self.log.write(records)
        self.last.update(records[-1])
        self.pending.clear()


def train(*, model, task: str, train_set: dict, test_set: dict | None,
          optimizer: optax.GradientTransformation, batch_size: int, num_steps: int, seed: int,
          workdir: str, schedule: CheckpointSchedule = CheckpointSchedule(),
          meta: dict | None = None, eval_batch_size: int = 1000, log_every: int = 50,
          callbacks: Sequence[Callable[[int, TrainState], None]] = (),
          curvature_data: dict | None = None, progress: bool = True,
          mesh=None, data_axes=("data",)) -> TrainState:
    """Trains ``model`` with ``optimizer``, checkpointing into ``workdir/checkpoints``.

    If ``workdir`` already holds checkpoints of the same run (same ``meta["identity"]``),
    training resumes from the last finalised one (and may continue past its old last step);
    the per-step log is truncated to that step first, so a killed run restarted with the same
    arguments ends exactly like an uninterrupted one.

    Args:
      model: a flax linen module with ``__call__(x, train)`` (e.g.
        :mod:`hessian_subspace.paper.models`).
      task: "classification" or "regression".
      train_set, test_set: data sets ``{"x", "y"}`` (numpy); test_set may be None.
      optimizer: an optax transformation (see :func:`make_optimizer`).
      batch_size: mini-batch size; the order is :func:`batches.batch_indices` of (step, seed).
      num_steps: total number of updates.
      seed: seed of the initialisation, the batch order and dropout.
      workdir: output directory (``checkpoints/``, ``train_log.jsonl``).
      schedule: checkpoint steps (step 0 and ``num_steps`` always included).
      meta: JSON-able dict stored in every checkpoint. If it has an ``"identity"`` entry, a
        workdir whose checkpoints carry a different one is refused (another run's checkpoints).
      eval_batch_size: batch size of the test-set evaluation at checkpoint steps.
      log_every: steps between log flushes / progress lines.
      callbacks: ``fn(step, state)`` called after each checkpoint is saved (e.g. the metric
        pipeline, in-process).
      curvature_data: fixed data passed to the optimizer's update at every step as
        ``curvature_data=`` (the Hessian access of :mod:`optim`'s transformations).
      progress: show a progress bar.
      mesh: a device mesh of this process's devices: each mini-batch is split over
        ``data_axes`` (``batch_size`` must be a multiple of their size), parameters and
        optimizer state FSDP-style over the ``model`` axis
        (:func:`hessian_subspace.sharding.fsdp_shardings`). Multi-host training is not
        implemented (a mesh over several processes is refused); analyses are multi-host.
      data_axes: the mesh axes that split examples.

    Returns:
      The final :class:`TrainState`.

    Raises:
      FloatingPointError: a training loss or the parameters became non-finite; nothing after
        the last finite checkpoint is saved.
    """
    if num_steps < 0:
        raise ValueError(f"`num_steps` must be >= 0, got {num_steps}.")
    tasks.check_data("train_set", train_set, task)
    num_outputs = _num_outputs(model, train_set["x"][:1])
    tasks.check_data("train_set", train_set, task, num_outputs)
    if test_set is not None:
        tasks.check_data("test_set", test_set, task, num_outputs)
    n = int(train_set["x"].shape[0])
    if not 1 <= batch_size <= n:
        raise ValueError(f"`batch_size` must be in [1, {n}], got {batch_size}.")
    place, put_batch = _placement(mesh, data_axes, batch_size)
    meta = dict(meta or {})
    os.makedirs(workdir, exist_ok=True)
    writer = ckpt_lib.CheckpointWriter(os.path.join(workdir, CHECKPOINT_DIR))
    state = init_train_state(model, optimizer, jax.random.key(seed), train_set["x"][:1])
    state, resumed = _resume(writer, state, meta, workdir)
    state = place(state)
    start = int(state.step)
    log = _JsonLines(os.path.join(workdir, TRAIN_LOG), keep_until_step=start if resumed else None)
    step_fn = make_train_step(model, optimizer, task, seed)

    def checkpoint(state: TrainState, step: int) -> None:
        if not _tree_is_finite(state.params):
            raise FloatingPointError(f"parameters became non-finite before step {step}; last "
                                     f"checkpoint kept: {writer.all_steps()[-1:]}")
        record = {"step": step}
        if test_set is not None:
            ev = evaluate(model, task, state.params, state.model_state, test_set,
                          batch_size=eval_batch_size)
            record.update({f"test_{k}": v for k, v in ev.items()})
        writer.save(step, params=state.params, model_state=state.model_state,
                    opt_state=state.opt_state, meta=meta)
        log.write([dict(record, event="checkpoint")])
        for callback in callbacks:
            callback(step, state)

    pending = _PendingMetrics(log, writer)
    last, flush = pending.last, pending.flush

    try:
        if start == 0:
            checkpoint(state, 0)
        bar = tqdm(total=num_steps, initial=start, desc="train", unit="step",
                   disable=not progress)
        tick, tick_step = time.perf_counter(), start
        for step in range(start, num_steps):
            idx = batches.batch_indices(n, batch_size, step, seed)
            batch = put_batch({"x": train_set["x"][idx], "y": train_set["y"][idx]})
            if curvature_data is None:
                state, metrics = step_fn(state, batch)
            else:
                state, metrics = step_fn(state, batch, curvature_data=curvature_data)
            pending.add(step, metrics)  # loss of θ_step on its mini-batch
            bar.update(1)
            if schedule.should_save(step + 1, num_steps):
                flush()
                checkpoint(state, step + 1)
            if (step + 1) % log_every == 0 or step + 1 == num_steps:
                flush()
                now = time.perf_counter()
                rate = (step + 1 - tick_step) / max(now - tick, 1e-9)
                tick, tick_step = now, step + 1
                logging.info("step %d/%d  loss %.4f  accuracy %.3f  %.1f steps/s", step + 1,
                             num_steps, last.get("loss", float("nan")),
                             last.get("accuracy", float("nan")), rate)
                bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}")
        bar.close()
        flush()
    finally:
        writer.close()
        log.close()
    return state
