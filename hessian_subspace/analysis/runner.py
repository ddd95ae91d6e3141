"""The analyzer: runs a chain of metric transforms on checkpoints and writes their records.

It owns everything impure: casting, model state, the curvature operator, the schedule,
transform state across checkpoints, failures, the result store, progress and scalar writers.
The only model contract is the loss: ``loss_fn(params, batch) -> mean loss`` or, for frozen
model state (BatchNorm statistics), ``loss_fn(params, batch, state)`` with the state given per
checkpoint. Dropout off (inference mode) is the loss's business: the Hessian must be a fixed,
deterministic operator.

Three ways in: live, from any training loop (``analyzer(step, params[, state])``, scheduled by
a :class:`Schedule`: ``every_steps`` / ``on_steps`` like clu's periodic actions); offline,
over a checkpoint source (:meth:`Analyzer.run`, e.g.
:func:`~hessian_subspace.analysis.orbax_checkpoints`); and following a live run's directory
(``run(source, watch=True)``).

A record is reused only when it was computed from the same checkpoint content, loss, data and
settings (its ``fingerprints``, :mod:`~hessian_subspace.analysis.fingerprints`); a record of
other inputs is refused (:class:`~hessian_subspace.analysis.StaleResultsError`) unless
``overwrite=True``. A run that analysed nothing, or in which checkpoints failed, raises.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import hessian_subspace as hs
from hessian_subspace import _tree, curvature, gauss_newton, layout
from hessian_subspace import sharding as sharding_lib
from hessian_subspace.analysis import checks
from hessian_subspace.analysis import context as context_lib
from hessian_subspace.analysis import fingerprints as fp
from hessian_subspace.analysis import sources as sources_lib
from hessian_subspace.analysis import specs
from hessian_subspace.analysis import state as state_lib
from hessian_subspace.analysis import step as step_lib
from hessian_subspace.analysis import store as store_lib
from hessian_subspace.analysis import writers as writers_lib
from hessian_subspace.analysis.transforms import RESERVED_KEYS, Chain, Transform, chain

PyTree = Any
CURVATURES = specs.CURVATURES
# 3: fingerprints in records; top1..topk overlaps. 4: transform state by name (state/),
# records say which state they started from (state_from); no bases/ folder.
LAYOUT_VERSION = 4


class Analyzer:
    """Runs a chain of metric transforms on checkpoints and writes one record per checkpoint.

    Args:
      transforms: a :func:`chain` (or a sequence of transforms, chained in order).
      loss_fn: ``loss_fn(params, batch) -> mean loss over the batch``, or
        ``loss_fn(params, batch, state)`` when checkpoints carry frozen model state; exactly
        the loss analysed. A ``jax.tree_util.Partial`` keeps its bound arrays dynamic.
      data: the fixed analysis set, a pytree of arrays with a leading example axis (e.g.
        ``{"x": ..., "y": ...}``). g and H are those of the mean loss over all of it.
      batch_size: examples per batch of every product over ``data`` (memory only: results do
        not depend on it beyond round-off).
      test_data: an optional test set (loss and accuracy on it, by :func:`loss`).
      results: where the records go: a directory, or :class:`Results` (directory, overwrite,
        retry_failed, record_fields, writers, progress); None keeps them in memory
        (``analyzer.records``).
      operator: what every curvature transform measures, :class:`Operator` (curvature,
        Gauss-Newton split, block, dtype, precision, HVP cache); default the Hessian in float32.
      placement: where the work runs, :class:`Placement` (mesh, data axes, parameter sharding,
        Krylov memory budget); default one device.
      schedule: which steps ``analyzer(step, ...)`` and :meth:`run` analyse,
        :class:`Schedule` (``every_steps``, ``on_steps``); default all.
      seed: PRNG seed of start vectors, probes and mini-batches (keys are folded with the step,
        so a resumed run draws the same numbers).

    Example::

        analyzer = analysis.Analyzer(analysis.chain(analysis.gradient(),
                                                    analysis.eigenpairs(k=20),
                                                    analysis.f_top(k=10)),
                                     loss_fn, data=analysis_set, batch_size=1000,
                                     results="results/run",
                                     schedule=analysis.Schedule(every_steps=100))
        for step in range(num_steps):
            analyzer(step, params)          # inside your own training loop
            params, opt_state = train_step(params, opt_state, batch)
    """

    def __init__(self, transforms: Chain | Transform | Sequence, loss_fn: Callable, *,
                 data: PyTree, batch_size: int = 1000, test_data: PyTree = None,
                 results: specs.Results | str | os.PathLike | None = None,
                 operator: specs.Operator | None = None, placement: specs.Placement | None = None,
                 schedule: specs.Schedule | None = None, seed: int = 0):
        # Everything is checked before anything is written (the specs on construction).
        if isinstance(transforms, Transform):
            transforms = chain(transforms)
        elif not isinstance(transforms, Chain):
            if isinstance(transforms, (str, bytes)) or not isinstance(transforms, Iterable):
                raise TypeError("`transforms` must be analysis.chain(...) or a sequence of "
                                f"transforms, got {type(transforms).__name__}")
            transforms = chain(*transforms)
        self.chain = transforms
        if not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self.batch_size = _tree.check_int("batch_size", batch_size, 1)
        self.seed = _tree.check_int("seed", seed)
        op = self.operator = specs.as_spec("operator", operator, specs.Operator)
        where = self.placement = specs.as_spec("placement", placement, specs.Placement)
        self.schedule = specs.as_spec("schedule", schedule, specs.Schedule)
        out = self.results = specs.as_results(results)
        # The specs' fields, read by the steps below.
        self.curvature, self.output_fn, self.output_loss = (op.curvature, op.output_fn,
                                                            op.output_loss)
        self.block, self.dtype, self.precision = op.block, op.dtype, op.precision
        self.hvp_cache, self.cache_budget = op.hvp_cache, op.cache_budget
        self._jdtype = jnp.float64 if self.dtype == "float64" else jnp.float32
        self.mesh, self.data_axes = where.mesh, where.data_axes
        self.param_sharding = where.param_sharding
        self.writers = out.writers
        self.record_fields = checks.check_record_fields(out.record_fields, self.chain)
        self.retry_failed, self.progress, self.overwrite = (out.retry_failed, out.progress,
                                                            out.overwrite)
        self.data = self._host("data", data)
        self.test_data = None if test_data is None else self._host("test_data", test_data)
        with self._scope():
            self.batches = self._lay_out(self.data)
            self.test_batches = None if test_data is None else self._lay_out(self.test_data)
        self.settings = self._describe(data)
        self._base_fingerprints = dict(
            data=self.settings["data"]["sha256"],
            settings=store_lib.settings_fingerprint(self.settings), algorithm=fp.ALGORITHM)
        # In a multi-process analysis every process computes every record; process 0 writes.
        self.store = (store_lib.MemoryStore() if out.directory is None
                      else store_lib.ResultStore(out.directory,
                                                 writer=jax.process_index() == 0))
        # Refuses a directory of other settings before anything in it is changed.
        for problem in self.store.open(self.settings, overwrite=self.overwrite):
            logging.warning("results store: %s", problem)
        self._state: tuple[int, dict] | None = None  # (step, chain state after it)
        self._contract_checked = False
        self._loss_fingerprints: dict[Any, str] = {}
        self._warned_float64 = False

    # ---- plumbing --------------------------------------------------------------------------

    def _scope(self):
        return _tree.x64_scope(self._jdtype)

    def _host(self, name: str, data: PyTree) -> PyTree:
        """The data set as host arrays in the analysis dtype (checked)."""
        leaves = jax.tree_util.tree_leaves(data)
        if not leaves:
            raise ValueError(f"`{name}` is empty; it must be a pytree of arrays with a leading "
                             "example axis")
        checks.check_not_raw_bytes(name, data)
        sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
        if None in sizes or len(sizes) != 1 or 0 in sizes:
            raise ValueError(f"every leaf of `{name}` needs the same leading example axis (>= 1 "
                             f"example); got leading sizes {sorted(map(str, sizes))}")
        dtype = np.float64 if self.dtype == "float64" else np.float32

        def cast(x):
            x = np.asarray(x)
            return x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x

        return jax.tree_util.tree_map(cast, data)

    def _lay_out(self, data: PyTree):
        return layout.batch_data(data, batch_size=self.batch_size, mesh=self.mesh,
                                 axes=self.data_axes)

    def _cast(self, x):
        x = jnp.asarray(x)
        return x.astype(self._jdtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    def _place(self, params: PyTree) -> PyTree:
        """Parameters cast to the analysis dtype and placed on the mesh."""
        params = jax.tree_util.tree_map(self._cast, params)
        if self.mesh is None:
            return params
        if self.param_sharding is not None:
            return jax.device_put(params, self.param_sharding(params))
        replicated = sharding_lib.replicated(self.mesh)

        def place(x):
            s = getattr(x, "sharding", None)
            on_mesh = isinstance(s, jax.sharding.NamedSharding) and s.mesh == self.mesh
            return x if on_mesh else jax.device_put(x, replicated)

        return jax.tree_util.tree_map(place, params)

    def _describe(self, data: PyTree) -> dict:
        return dict(
            layout=LAYOUT_VERSION, transforms=self.chain.describe(),
            analyzer=dict(batch_size=self.batch_size, dtype=self.dtype,
                          precision=self.precision, seed=self.seed, curvature=self.curvature,
                          block=list(self.block) if self.block else None,
                          loss_fn=_name(self.loss_fn), output_fn=_name(self.output_fn),
                          hvp_cache=self.hvp_cache,
                          cache_budget=self.cache_budget),
            data=fp.data_content(data))

    @property
    def records(self) -> list[dict]:
        """Every record so far, in step order."""
        return self.store.records()

    def scheduled(self, step: int) -> bool:
        """Whether ``step`` is one the analyzer analyses (its :class:`Schedule`)."""
        return self.schedule.due(step)

    def done(self, step: int) -> bool:
        """Whether ``step`` has a record that is not analysed again by default: "ok" (reused
        only if its fingerprints match the checkpoint given, see :meth:`reusable`), or
        "failed" with ``retry_failed=False``."""
        record = self.store.record(step)
        return record is not None and (record.get("status") == "ok" or not self.retry_failed)

    def _place_like(self, params: PyTree) -> PyTree:
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), self._cast_dtype(x)), params)

    def _cast_dtype(self, x):
        dtype = jnp.result_type(x)
        return self._jdtype if jnp.issubdtype(dtype, jnp.floating) else dtype

    # ---- fingerprints ----------------------------------------------------------------------

    def fingerprints(self, params: PyTree, state: PyTree = None,
                     extras: Mapping[str, Any] | None = None) -> dict:
        """What a record of these parameters and model state is computed from: ``checkpoint``
        (their content), ``loss`` (the loss's jaxpr on the analysis batch's shapes and its
        constants; with the Gauss-Newton split, its functions too), ``data``, ``settings``,
        and ``extras`` (the content of what else the checkpoint gives the transforms: the
        optimizer state, the next batch; None without)."""
        with self._scope():
            loss = self._loss_fingerprint(params, state)
        try:  # a collective over the processes when the parameters are split over them
            content = fp.tree_content({"params": params, "state": state})
            more = fp.tree_content(dict(extras)) if extras else None
        except Exception as e:
            lost = sources_lib.peer_failure(e, "the checkpoint's fingerprint")
            if lost is not None:
                raise lost from e
            raise
        return dict(self._base_fingerprints, loss=loss, checkpoint=content, extras=more)

    def _loss_fingerprint(self, params: PyTree, state: PyTree) -> str:
        like = self._place_like(params)
        state_like = None if state is None else self._place_like(state)
        key = (jax.tree_util.tree_structure((like, state_like)),
               tuple((x.shape, str(x.dtype)) for x in jax.tree_util.tree_leaves(
                   (like, state_like))))
        if key not in self._loss_fingerprints:
            n = min(self.batch_size, int(np.shape(jax.tree_util.tree_leaves(self.data)[0])[0]))
            batch = jax.tree_util.tree_map(lambda x: x[:n], self.data)
            self._loss_fingerprints[key] = fp.loss_fingerprint(
                self.loss_fn, like, batch, state_like, output_fn=self.output_fn,
                output_loss=self.output_loss)
        return self._loss_fingerprints[key]

    def reusable(self, step: int, fingerprints: dict) -> bool:
        """Whether the record of ``step`` can stand for an analysis of a checkpoint with these
        ``fingerprints``: True for a matching "ok" record whose inputs from other steps are
        unchanged (and a failed one with ``retry_failed=False``); False when there is none, or
        it must be computed again (logged).

        Raises:
          StaleResultsError: the record was computed from other inputs (named), and
            ``overwrite`` is False. With ``overwrite``, the record is moved to ``replaced/``.
        """
        record = self.store.record(step)
        if record is None:
            return False
        if record.get("status") != "ok":
            return not self.retry_failed
        stale = self.store.stale_reasons(record, fingerprints)
        if stale:
            where = ("" if self.store.directory is None else
                     f" ({self.store.record_path(step)})")
            if not self.overwrite:
                raise store_lib.StaleResultsError(store_lib.stale_message(
                    f"step {step}: its record{where} was computed from other inputs than this "
                    f"checkpoint's: {'; '.join(stale)}", self.store.directory))
            self.store.set_aside(step, f"computed from other inputs: {'; '.join(stale)} "
                                       "(overwrite=True)")
            return False
        outdated = self.store.outdated_reasons(record)
        if outdated:
            logging.info("step %d is computed again: %s", step, "; ".join(outdated))
            return False
        return True

    # ---- one checkpoint --------------------------------------------------------------------

    def __call__(self, step: int, params: PyTree, state: PyTree = None, *,
                 extras: Mapping[str, Any] | None = None) -> dict | None:
        """Analyses ``step`` if it is scheduled and has no record that can be reused (call it
        at every step of a training loop). Returns the record written, or None.

        Raises:
          StaleResultsError: the results directory holds a record of this step computed from
            other inputs (another run's checkpoint, another loss): see ``overwrite``.
        """
        step = checks.check_step(step)
        if not self.scheduled(step):
            return None
        fingerprints = None
        if self.store.record(step) is not None:
            fingerprints = self.fingerprints(params, state, extras)
            if self.reusable(step, fingerprints):
                return None
        return self.process(step, params, state, extras=extras, fingerprints=fingerprints)

    def process(self, step: int, params: PyTree, state: PyTree = None, *,
                extras: Mapping[str, Any] | None = None,
                fingerprints: dict | None = None) -> dict:
        """Runs every transform on one checkpoint and writes its record (whatever the schedule,
        replacing an existing record). Non-finite parameters, a non-finite quantity during the
        analysis or in a recorded output, a transform breaking its contract (an output key
        another transform wrote), or an unreadable stored file give a record with
        ``status: "failed"`` and the reason (and a log line); the analysis goes on with the
        next checkpoint. ``extras`` (e.g. the optimizer state) reach the transforms as
        ``ctx["extras"]``.

        Raises:
          PeerLostError: in a multi-process analysis, a collective failed because another
            process died: no record is written for this checkpoint.
        """
        try:
            return self._process(step, params, state, extras, fingerprints)
        except Exception as e:
            lost = sources_lib.peer_failure(e, f"the analysis of step {step}")
            if lost is not None:
                raise lost from e
            raise

    def _process(self, step, params, state, extras, fingerprints) -> dict:
        step = checks.check_step(step)
        checks.check_state_arg(self.loss_fn, state)
        start = time.perf_counter()
        _tree.check_floating("params", params)
        if not self._warned_float64 and self.dtype == "float32":
            self._warned_float64 = checks.warn_float64_analysed_in_float32(params)
        if not self._contract_checked:
            with self._scope():
                checks.check_contract(self.loss_fn, self.output_fn, self.data, self.batch_size,
                                      self._place_like(params), state)
            self._contract_checked = True
        if fingerprints is None:
            fingerprints = self.fingerprints(params, state, extras)
        bad = int(checks.count_nonfinite((params, state)))
        if bad:
            return self.fail(step, f"{bad} non-finite values in the parameters or model state",
                             fingerprints)
        try:
            with self._scope():
                record, stored, new_state, leaves = self._compute(step, params, state, extras)
        except (FloatingPointError, store_lib.CorruptFile, hs.UndefinedMetricError,
                checks.TransformContractError) as e:
            return self.fail(step, f"non-finite values during the analysis: {e}"
                             if isinstance(e, FloatingPointError) else str(e), fingerprints)
        record["fingerprints"] = fingerprints
        record["seconds"] = round(time.perf_counter() - start, 3)
        self.store.write_settings(self.settings)
        record = self.store.write_step(step, record, stored, state=leaves)
        self._state = (step, new_state)
        self._write_scalars(step, record)
        if self.progress:
            logging.info("step %d analysed in %.2f s (%d HVPs): %s", step, record["seconds"],
                         record.get("hvps", 0), writers_lib.summary(record))
        return record

    def fail(self, step: int, reason: str, fingerprints: dict | None = None) -> dict:
        """Writes a failure record for ``step`` (retried by the next run unless
        ``retry_failed=False``)."""
        record = dict(step=int(step), status="failed", reason=reason, **self.record_fields)
        if fingerprints is not None:
            record["fingerprints"] = fingerprints
        self.store.write_settings(self.settings)
        record = self.store.write_step(step, record, {})
        logging.warning("step %d: failed: %s", step, reason)
        return record

    def _make_operator(self, params, bound_loss, bind):
        def make(curvature_name=None, *, block="default", output_fn=None, output_loss=None):
            name = curvature_name or self.curvature
            block = self.block if block == "default" else checks.check_block(block)
            if name == "hessian":
                op = curvature.dataset_hvp(bound_loss, params, self.batches,
                                           precision=self.precision, cache=self.hvp_cache,
                                           cache_budget=self.cache_budget)
            elif name == "ggn":
                output_fn = output_fn or self.output_fn
                output_loss = output_loss or self.output_loss
                if output_fn is None:
                    raise ValueError("the Gauss-Newton matrix needs `output_fn` and "
                                     "`output_loss` (give them to the Analyzer or to ggn())")
                op = gauss_newton.dataset_ggn(bind(output_fn), curvature.as_loss_pytree(
                    output_loss), params, self.batches, precision=self.precision,
                    cache=self.hvp_cache, cache_budget=self.cache_budget)
            else:
                raise ValueError(f"`curvature` must be one of {CURVATURES}, got {name!r}")
            return op if block is None else hs.restrict(op, list(block))
        return make

    def _chain_state(self, step: int, templates: dict) -> tuple[dict, dict]:
        """The chain's state after the last successful checkpoint before ``step`` (loaded by
        name from the store, or kept from the checkpoint just analysed), and what the record
        says it started from (``state_from``: that step and its state's content)."""
        before = [s for s in self.store.steps("ok") if s < step]
        values = any(t.init is not None and t.state_affects_values
                     for t in self.chain.transforms)
        if not before:
            return templates, dict(step=None, content=None, values=values)
        last = before[-1]
        source = dict(step=last, content=self.store.content(store_lib.STATE, last),
                      values=values)
        if self._state is not None and self._state[0] == last:
            return self._state[1], source
        # A record lists its state file whenever the state has arrays (and the store checked
        # every listed file when it was opened): none listed is an empty state.
        saved = self.store.state(last)
        return state_lib.rebuild(saved or {}, templates), source

    def _compute(self, step: int, params: PyTree, state: PyTree, extras=None):
        params = self._place(params)
        if state is not None:
            state = jax.tree_util.tree_map(self._cast, state)
            if self.mesh is not None:
                state = jax.device_put(state, sharding_lib.replicated(self.mesh))
        bind = context_lib.default_bind(state)
        bound_loss = bind(self.loss_fn)
        make_operator = self._make_operator(params, bound_loss, bind)
        operator = make_operator()
        entries = dict(
            params=params, state=state, loss_fn=bound_loss, data=self.data,
            test_data=self.test_data, batches=self.batches, test_batches=self.test_batches,
            batch_size=self.batch_size, operator=operator, extras=dict(extras or {}),
            dtype=self.dtype, precision=self.precision, seed=self.seed,
            output_fn=None if self.output_fn is None else bind(self.output_fn),
            output_loss=None if self.output_loss is None else curvature.as_loss_pytree(
                self.output_loss))
        ctx = context_lib.Context(step, entries, seed=self.seed, make_operator=make_operator,
                                  bind=bind)
        templates = self.chain.init(ctx)
        states, source = self._chain_state(step, templates)
        record: dict[str, Any] = dict(
            step=step, status="ok", dtype=self.dtype, processes=jax.process_count(),
            precision=dict(hvp_matmul=self.precision or "default", lanczos=self.dtype,
                           inner_products="highest"),
            versions=fp.versions(), **self.record_fields)
        record.update(hessian=operator.describe(), curvature=self.curvature)
        if self.block is not None:
            record["block"] = dict(prefixes=list(self.block), leaves=list(operator.leaf_names),
                                   num_params=operator.dim)
        result = step_lib.apply(self.chain, ctx, states, taken=record)
        record.update(result.record)
        record["state_from"] = source
        leaves = state_lib.named(result.state, templates)
        return record, result.stored, result.state, leaves

    # ---- streams ---------------------------------------------------------------------------

    def run(self, source: Any, *, steps: Iterable[int] | None = None, watch: bool = False,
            poll_seconds: float = 2.0, timeout_seconds: float = 600.0,
            final_step: int | None = None, allow_failures: bool = False) -> list[dict]:
        """Analyses the checkpoints of ``source`` in step order, reusing the records that match
        them: :func:`hessian_subspace.analysis.drivers.run` (arguments, errors)."""
        from hessian_subspace.analysis import drivers

        return drivers.run(self, source, steps=steps, watch=watch, poll_seconds=poll_seconds,
                           timeout_seconds=timeout_seconds, final_step=final_step,
                           allow_failures=allow_failures)

    def _write_scalars(self, step: int, record: dict) -> None:
        """The transforms' numbers to the writers (bookkeeping stays in the record)."""
        if not self.writers:
            return
        bookkeeping = set(RESERVED_KEYS) | set(self.record_fields)
        scalars = writers_lib.scalars_of({k: v for k, v in record.items()
                                          if k not in bookkeeping})
        for w in self.writers:
            w.write(step, scalars)


def _name(fn) -> str | None:
    if fn is None:
        return None
    fn = getattr(fn, "func", fn)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
