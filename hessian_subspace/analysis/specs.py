"""The :class:`~hessian_subspace.analysis.Analyzer`'s options, grouped into small specs: what
operator every curvature transform measures (:class:`Operator`), where the work runs
(:class:`Placement`), when a live analyzer analyses (:class:`Schedule`), and what becomes of
the records (:class:`Results`). Each is a frozen dataclass checked on construction: a bad
value is a ``ValueError``/``TypeError`` naming the field, before anything is traced or written.

Example:
  >>> from hessian_subspace import analysis
  >>> analysis.Operator(dtype="float64", block="dense_1").block
  ('dense_1',)
  >>> analysis.Schedule(every_steps=100, on_steps=(5,)).due(200), analysis.Schedule().due(7)
  (True, True)
  >>> analysis.Operator(dtype="float16")
  Traceback (most recent call last):
  ...
  ValueError: `dtype` must be 'float32' or 'float64', got 'float16'
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax

from hessian_subspace import _tree
from hessian_subspace import sharding as sharding_lib
from hessian_subspace.analysis import checks
from hessian_subspace.analysis import writers as writers_lib

CURVATURES = ("hessian", "ggn")
PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")


def _set(spec, name: str, value: Any) -> None:
    object.__setattr__(spec, name, value)


@dataclasses.dataclass(frozen=True)
class Operator:
    """What every curvature transform measures.

    Args:
      curvature: "hessian" or "ggn" (the Gauss-Newton matrix of ``output_fn`` and
        ``output_loss``).
      output_fn: ``outputs(params, batch[, state]) -> (n, m)``, with ``output_loss(outputs,
        batch) -> mean loss``: the split that defines the Gauss-Newton matrix (for
        ``curvature="ggn"`` and :func:`~hessian_subspace.analysis.ggn`).
      output_loss: see ``output_fn``.
      block: restrict the analysis to the diagonal block of these parameter leaves ("/"-joined
        path prefixes such as "dense_1", or a sequence of them); the gradient is restricted too.
      dtype: "float32" or "float64" (the analysis runs under a scoped ``jax.enable_x64``; global
        JAX config is never changed).
      precision: matmul precision of the curvature products (None: JAX's default); recorded.
      hvp_cache: whether the solvers linearise the product once per solve and apply the stored
        linear map at every step (True, False, or "auto": when it fits ``cache_budget``); see
        :func:`hessian_subspace.dataset_hvp`. Recorded per operator in ``pipeline.json``.
      cache_budget: bytes per device for that linearisation (default
        :func:`hessian_subspace.linearization.default_cache_budget`).
    """

    curvature: str = "hessian"
    output_fn: Callable | None = None
    output_loss: Callable | None = None
    block: str | Sequence[str] | None = None
    dtype: str = "float32"
    precision: str | None = None
    hvp_cache: bool | str = "auto"
    cache_budget: float | None = None

    def __post_init__(self):
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"`dtype` must be 'float32' or 'float64', got {self.dtype!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"`precision` must be one of {PRECISIONS} or None, got "
                             f"{self.precision!r}")
        if self.curvature not in CURVATURES:
            raise ValueError(f"`curvature` must be one of {CURVATURES}, got {self.curvature!r}")
        if (self.output_fn is None) != (self.output_loss is None):
            raise ValueError("give both `output_fn` and `output_loss`, or neither")
        for label in ("output_fn", "output_loss"):
            fn = getattr(self, label)
            if fn is not None and not callable(fn):
                raise TypeError(f"`{label}` must be callable, got {type(fn).__name__}")
        if self.curvature == "ggn" and self.output_fn is None:
            raise ValueError("curvature='ggn' needs `output_fn` and `output_loss` (the model "
                             "outputs and the loss of the outputs)")
        _set(self, "block", checks.check_block(self.block))
        if self.hvp_cache not in ("auto", True, False):
            raise ValueError(f"`hvp_cache` must be True, False or 'auto', got "
                             f"{self.hvp_cache!r}")
        if self.cache_budget is not None and (isinstance(self.cache_budget, bool)
                                              or not float(self.cache_budget) > 0):
            raise ValueError(f"`cache_budget` must be > 0 bytes, got {self.cache_budget!r}")
        if self.cache_budget is not None:
            _set(self, "cache_budget", float(self.cache_budget))


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the work runs.

    Args:
      mesh: a device mesh (:func:`hessian_subspace.sharding.parse_mesh`; None: the default
        device). The analysis set is laid out over its ``data_axes``
        (:func:`hessian_subspace.batch_data`: each device computes on its own examples), and
        the Krylov bases are split over all its devices.
      data_axes: the mesh axes that split examples.
      param_sharding: where the parameters go on the mesh: a function ``params -> shardings``
        (e.g. ``functools.partial(sharding.fsdp_shardings, mesh=mesh)``) or None: parameters
        that already live on the mesh keep their sharding, others are replicated.

    The Krylov memory budget is the eigensolve's own setting:
    ``analysis.eigenpairs(k, memory_budget=...)`` (bytes per device).
    """

    mesh: jax.sharding.Mesh | None = None
    data_axes: Sequence[str] | str = ("data",)
    param_sharding: Callable | None = None

    def __post_init__(self):
        if self.mesh is not None and not isinstance(self.mesh, jax.sharding.Mesh):
            raise TypeError(f"`mesh` must be a jax.sharding.Mesh (see "
                            f"hessian_subspace.sharding.parse_mesh), got "
                            f"{type(self.mesh).__name__}")
        axes = self.data_axes
        _set(self, "data_axes", sharding_lib.data_axes(self.mesh, axes) if self.mesh is not None
             else tuple([axes] if isinstance(axes, str) else axes))
        if self.param_sharding is not None and not callable(self.param_sharding):
            raise TypeError("`param_sharding` must be a function params -> shardings")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When a live analyzer analyses (clu's ``PeriodicAction`` shape): ``analyzer(step, ...)``
    and :meth:`~hessian_subspace.analysis.Analyzer.run` analyse the multiples of
    ``every_steps`` and the steps in ``on_steps``; with neither, every step."""

    every_steps: int | None = None
    on_steps: Iterable[int] = ()

    def __post_init__(self):
        if self.every_steps is not None:
            _set(self, "every_steps", _tree.check_int("every_steps", self.every_steps, 1))
        _set(self, "on_steps", frozenset(int(s) for s in self.on_steps))

    def due(self, step: int) -> bool:
        """Whether ``step`` is analysed."""
        if self.every_steps is None and not self.on_steps:
            return True
        return (self.every_steps is not None and step % self.every_steps == 0) \
            or step in self.on_steps


@dataclasses.dataclass(frozen=True)
class Results:
    """What becomes of the records.

    Args:
      directory: where records and arrays go (:mod:`~hessian_subspace.analysis.store`); None
        keeps them in memory (``analyzer.records``).
      overwrite: a finished record of other inputs (another checkpoint content, loss, data or
        settings: its ``fingerprints``) is moved to ``replaced/`` in the directory and computed
        again; by default it is refused with a
        :class:`~hessian_subspace.analysis.StaleResultsError` naming the step and what changed.
      retry_failed: checkpoints whose record says "failed" are analysed again (default); False
        skips them like finished ones.
      record_fields: JSON-able fields copied into every record (e.g. the run's config).
      writers: scalar writers called after each record with ``(step, {name: value})``: any
        ``write(step, scalars)`` callable, or an object with clu's ``write_scalars`` (e.g.
        :class:`~hessian_subspace.analysis.CSVWriter`, :class:`TensorBoardWriter`).
      progress: log a line per checkpoint and show a progress bar in ``run``.
    """

    directory: str | os.PathLike | None = None
    overwrite: bool = False
    retry_failed: bool = True
    record_fields: Mapping[str, Any] | None = None
    writers: Sequence[Any] = ()
    progress: bool = True

    def __post_init__(self):
        if self.directory is not None and not isinstance(self.directory, (str, os.PathLike)):
            raise TypeError(f"`results` directory must be a path, got "
                            f"{type(self.directory).__name__}")
        _set(self, "writers", tuple(writers_lib.as_writer(w) for w in self.writers))
        for name in ("overwrite", "retry_failed", "progress"):
            _set(self, name, bool(getattr(self, name)))


def as_results(results: Results | str | os.PathLike | None) -> Results:
    """``results`` as :class:`Results` (a path: its ``directory``)."""
    if isinstance(results, Results):
        return results
    if results is None or isinstance(results, (str, os.PathLike)):
        return Results(directory=results)
    raise TypeError(f"`results` must be a directory or analysis.Results(...), got "
                    f"{type(results).__name__}")


def as_spec(name: str, value: Any, kind: type) -> Any:
    """``value`` if it is a ``kind`` (None: ``kind()``); otherwise a ``TypeError`` naming
    the argument."""
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise TypeError(f"`{name}` must be analysis.{kind.__name__}(...), got "
                        f"{type(value).__name__}")
    return value
