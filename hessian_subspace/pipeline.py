"""The metric pipeline: train-state checkpoints stream through composable metric transforms into
result files.

(Not an input pipeline.) A :class:`Pipeline` is built for one model and a fixed analysis set.
``process(step, params, model_state)`` runs the selected transforms on one checkpoint and writes
its record; ``run(checkpoint_dir, ...)`` streams the finalised checkpoints of a finished run, or
follows a live one (``watch=True``); :class:`Callback` calls it from inside a training loop.

Results directory (every file written atomically: temporary file, fsync, rename):

- ``records/step_00000123.json``: one record per checkpoint: step, every scalar metric,
  eigenvalues, residuals, converged flags, error bars (``f_top_bound``, ``f_next_bound``,
  ``subspace_overlap[t]["top{d}_bound"]``), the curvature used, precision, dtype, versions,
  config, timings, HVPs; or ``status: "failed"`` with the reason.
  ``hessian`` holds the operator's ``describe()``, whose ``curvature`` says which it is.
- ``bases/step_00000123.npz``: the top-2k eigenvectors (rows, ``ravel_pytree`` order),
  eigenvalues and residuals, so any pair of steps can be compared (with error bars) afterwards
  without recomputing.
- ``spectra/step_00000123.npz``: SLQ nodes/weights and dense spectra where asked for.
- ``results.jsonl``: all records in step order (rebuilt after each checkpoint).
- ``pipeline.json``: the analysis settings; a restart with other settings is refused.

A killed analysis restarted with the same arguments skips every step that has a record and
recomputes nothing it finished. Nothing is written or read with pickle.

The curvature operator is the Hessian by default; ``Settings.curvature="ggn"`` measures every
curvature quantity (eigenpairs, f_top, c_i², overlap(g, Hg), layers, subspace overlaps, SLQ,
dense spectra) with the Gauss-Newton matrix instead, ``Settings.also_ggn`` adds the GGN's top-k
and f_top next to the Hessian's, and ``Settings.block`` restricts the analysis to the diagonal
block of some parameter leaves (and the gradient to those leaves). Error bars come from the
Ritz residuals (:func:`hessian_subspace.metrics.subspace_error_bound`); they assume that
Lanczos missed none of the top eigenvalues.

Warm start (default on): Lanczos starts from a random combination of the previous checkpoint's
eigenvectors. ``Settings.tracker`` instead runs :func:`hessian_subspace.track_eigenpairs` from
the previous basis and falls back to Lanczos when it does not converge in ``tracker_blocks``
blocks (records: ``tracker_hvps``, ``tracker_converged``); it pays only when checkpoints are
close together.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import flatten_util

import hessian_subspace as hs
from hessian_subspace import checkpoint as ckpt_lib
from hessian_subspace import models, spectrum, transforms

PyTree = Any

TRANSFORMS = (
    "loss",  # full-data loss and accuracy (train; test too if a test set is given)
    "gradient",  # full-data gradient g, its norm
    "eigenpairs",  # top-2k eigenpairs (top k and "next k"), residuals, converged
    "f_top",  # f_top, f_next of the full gradient; f_top of fixed mini-batch gradients
    "overlap_g_hg",  # g^T H g / (|g| |Hg|)  (Table 1)
    "c2",  # c_i^2, i = 1..2k (Fig. 11)
    "layers",  # lambda_max and the top eigenvector's mass per layer (Fig. 6-8)
    "subspace_overlap",  # eq. 5 against reference steps and the previous step, d = 2..2k
    "slq",  # spectral density by SLQ, at `slq_steps` (Fig. 5)
    "dense_spectrum",  # all eigenvalues, at `dense_steps`, small models only (Fig. 4)
)
DEFAULT_TRANSFORMS = TRANSFORMS[:8]
_REQUIRES = {
    "gradient": ("loss",), "f_top": ("gradient", "eigenpairs"),
    "overlap_g_hg": ("gradient",), "c2": ("gradient", "eigenpairs"),
    "layers": ("eigenpairs",), "subspace_overlap": ("eigenpairs",),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Analysis settings (everything that changes the numbers is recorded in each result)."""

    transforms: tuple[str, ...] = DEFAULT_TRANSFORMS
    k: int | None = None  # top-k size; None: the number of classes (model outputs)
    lanczos_steps: int | None = None  # Krylov cap for 2k pairs (None: library default)
    tol: float = 1e-3  # relative residual of the eigenpairs
    block_size: int = 1
    dtype: str = "float32"  # analysis dtype: "float32" or "float64" (scoped enable_x64)
    precision: str | None = None  # HVP matmul precision (None: JAX default)
    batch_size: int = 1000  # examples per HVP / gradient batch
    num_minibatches: int = 4  # fixed mini-batches for mini-batch f_top
    minibatch_size: int = 64
    reference_steps: tuple[int, ...] = (0, 10, 50, 100, 200, 500, 1000, 2000, 5000)
    warm_start: bool = True  # Lanczos start vector from the previous checkpoint's subspace
    slq_steps: tuple[int, ...] = ()
    slq_probes: int = 10
    slq_lanczos_steps: int = 80
    dense_steps: tuple[int, ...] = ()
    dense_max_params: int = 5000
    seed: int = 0
    curvature: str = "hessian"  # "hessian" or "ggn": the operator of every curvature transform
    also_ggn: bool = False  # with the Hessian, also GGN top-k eigenvalues, f_top_ggn
    block: str | tuple[str, ...] | None = None  # analyse only these parameter leaves (prefixes)
    next_bound: bool = False  # one more Ritz pair (2k + 1) for f_next and next-k error bars
    # Warm start by hs.track_eigenpairs (block Krylov from the previous basis, at most
    # tracker_blocks blocks); cold-started Lanczos when it does not converge. Off by default:
    # on FC-net Hessians it needed more HVPs than a warm-started Lanczos (BUILD_NOTES, issue 6).
    tracker: bool = False
    tracker_blocks: int = 4

    def __post_init__(self):
        unknown = [t for t in self.transforms if t not in TRANSFORMS]
        if unknown:
            raise ValueError(f"unknown transforms {unknown}; choose from {TRANSFORMS}")
        for t in self.transforms:
            missing = [r for r in _REQUIRES.get(t, ()) if r not in self.transforms]
            if missing:
                raise ValueError(f"transform {t!r} needs {missing} in `transforms`")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"`dtype` must be 'float32' or 'float64', got {self.dtype!r}")
        if self.curvature not in transforms.CURVATURES:
            raise ValueError(f"`curvature` must be one of {transforms.CURVATURES}, got "
                             f"{self.curvature!r}")
        if self.also_ggn and (self.curvature != "hessian" or "eigenpairs" not in self.transforms):
            raise ValueError("`also_ggn` needs curvature='hessian' and 'eigenpairs' in "
                             "`transforms`")
        if self.tracker and not self.warm_start:
            raise ValueError("`tracker` needs `warm_start`")
        if not (isinstance(self.tracker_blocks, int) and self.tracker_blocks >= 1):
            raise ValueError(f"`tracker_blocks` must be a positive int, got "
                             f"{self.tracker_blocks!r}")
        if isinstance(self.block, list):
            object.__setattr__(self, "block", tuple(self.block))
        if self.block is not None and not (
                isinstance(self.block, str) and self.block
                or isinstance(self.block, tuple) and self.block
                and all(isinstance(b, str) and b for b in self.block)):
            raise ValueError(f"`block` must be a parameter-path prefix or a tuple of them, got "
                             f"{self.block!r}")

    @property
    def block_prefixes(self) -> tuple[str, ...] | None:
        """``block`` as a tuple of prefixes (None: all parameters)."""
        return (self.block,) if isinstance(self.block, str) else self.block

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# --------------------------------------------------------------------------------------------
# Atomic files.


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def write_npz(path: str, **arrays) -> None:
    _atomic_write(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}))


def read_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _step_name(step: int, suffix: str) -> str:
    return f"step_{int(step):08d}.{suffix}"


class ResultStore:
    """Reads and writes a results directory (see the module docstring)."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)

    def record_path(self, step: int) -> str:
        return os.path.join(self.directory, "records", _step_name(step, "json"))

    def basis_path(self, step: int) -> str:
        return os.path.join(self.directory, "bases", _step_name(step, "npz"))

    def spectrum_path(self, step: int) -> str:
        return os.path.join(self.directory, "spectra", _step_name(step, "npz"))

    def done_steps(self) -> list[int]:
        folder = os.path.join(self.directory, "records")
        if not os.path.isdir(folder):
            return []
        return sorted(int(n[5:13]) for n in os.listdir(folder)
                      if n.startswith("step_") and n.endswith(".json"))

    def record(self, step: int) -> dict:
        with open(self.record_path(step)) as f:
            return json.load(f)

    def records(self) -> list[dict]:
        return [self.record(s) for s in self.done_steps()]

    def basis(self, step: int) -> dict[str, np.ndarray] | None:
        path = self.basis_path(step)
        return read_npz(path) if os.path.exists(path) else None

    def spectrum(self, step: int) -> dict[str, np.ndarray] | None:
        path = self.spectrum_path(step)
        return read_npz(path) if os.path.exists(path) else None

    def rebuild_jsonl(self) -> None:
        lines = "".join(json.dumps(r) + "\n" for r in self.records())
        _atomic_write(os.path.join(self.directory, "results.jsonl"),
                      lambda f: f.write(lines.encode()))


def read_results(directory: str) -> list[dict]:
    """All records of a results directory, in step order (for plots and notebooks)."""
    return ResultStore(directory).records()


# --------------------------------------------------------------------------------------------
# The pipeline.


def _dtype_of(tree: PyTree):
    return jnp.result_type(*jax.tree_util.tree_leaves(tree))


def _versions() -> dict:
    import flax
    import optax
    return dict(python=sys.version.split()[0], jax=jax.__version__, flax=flax.__version__,
                optax=optax.__version__, numpy=np.__version__, hessian_subspace=hs.__version__,
                backend=jax.default_backend())


def _to_jsonable(x):
    if isinstance(x, dict):
        return {k: _to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return _to_jsonable(np.asarray(x).tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if np.isfinite(x) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


class Pipeline:
    """Runs metric transforms on checkpoints of one model and writes their records.

    Args:
      model: the flax module (from :mod:`models`).
      task: "classification" or "regression".
      analysis_set: the fixed data set ``{"x", "y"}`` where g and H are measured (numpy).
      results_dir: where records, bases and spectra go.
      settings: :class:`Settings`.
      test_set: optional test set for test loss/accuracy in the "loss" transform.
      num_outputs: number of classes (k's default).
      config: the training run's config (JSON-able), copied into every record.
    """

    def __init__(self, model, task: str, analysis_set: dict, results_dir: str, *,
                 settings: Settings = Settings(), test_set: dict | None = None,
                 num_outputs: int | None = None, config: dict | None = None):
        self.model, self.task, self.settings = model, task, settings
        self.store = ResultStore(results_dir)
        self.config = config or {}
        self.k = settings.k or num_outputs
        if not self.k:
            raise ValueError("`settings.k` or `num_outputs` must be given")
        self._dtype = jnp.float64 if settings.dtype == "float64" else jnp.float32
        self._x64 = settings.dtype == "float64"
        with self._scope():
            self.analysis = self._device(analysis_set)
            self.test = None if test_set is None else self._device(test_set)
            n = int(analysis_set["x"].shape[0])
            rng = np.random.default_rng(settings.seed)
            m, b = settings.num_minibatches, min(settings.minibatch_size, n)
            idx = np.stack([rng.choice(n, b, replace=False) for _ in range(m)]) if m else None
            self.minibatches = None if idx is None else jax.tree_util.tree_map(
                lambda x: jnp.asarray(x[idx]), self.analysis)
        self._previous_basis: np.ndarray | None = None
        self._previous_step: int | None = None
        if settings.block is not None:  # Fail now, not at the first checkpoint.
            hs.restrict(lambda v: v, settings.block_prefixes,
                        like=self.restore_target()["params"])
        self._check_settings_file()

    # ---- plumbing ------------------------------------------------------------------------

    def _scope(self):
        import contextlib
        return jax.enable_x64(True) if self._x64 else contextlib.nullcontext()

    def _device(self, ds: dict) -> dict:
        out = {}
        for key in ("x", "y"):
            x = np.asarray(ds[key])
            if np.issubdtype(x.dtype, np.floating):
                x = x.astype(self._dtype)
            out[key] = jnp.asarray(x)
        return out

    def _cast(self, tree):
        return jax.tree_util.tree_map(
            lambda x: jnp.asarray(x, self._dtype) if jnp.issubdtype(jnp.result_type(x),
                                                                    jnp.floating)
            else jnp.asarray(x), tree)

    def _check_settings_file(self) -> None:
        path = os.path.join(self.store.directory, "pipeline.json")
        current = dict(settings=self.settings.to_json(), k=self.k, task=self.task)
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            # Settings added later take their defaults in directories written before them.
            old["settings"] = dict(Settings().to_json(), **old.get("settings", {}))
            if old != current:
                raise ValueError(
                    f"{self.store.directory} holds results made with other settings "
                    f"({path}); use another results directory.")
        else:
            write_json(path, current)

    # ---- one checkpoint ------------------------------------------------------------------

    def process(self, step: int, params: PyTree, model_state: PyTree) -> dict:
        """Runs every selected transform on one checkpoint and writes its record (atomic).

        Non-finite parameters give a failure record instead of NaN metrics.
        """
        step = int(step)
        start = time.perf_counter()
        leaves = jax.tree_util.tree_leaves((params, model_state))
        bad = [np.size(x) - np.count_nonzero(np.isfinite(np.asarray(x))) for x in leaves
               if np.issubdtype(np.asarray(x).dtype, np.inexact)]
        if sum(bad):
            return self.fail(step, f"{sum(bad)} non-finite values in the parameters or model "
                                   "state")
        try:
            with self._scope():
                record, basis, spectra = self._compute(step, self._cast(params),
                                                       self._cast(model_state))
        except FloatingPointError as e:
            return self.fail(step, f"non-finite values during the analysis: {e}")
        record["seconds"] = round(time.perf_counter() - start, 3)
        if basis is not None:
            write_npz(self.store.basis_path(step), **basis)
            self._previous_basis, self._previous_step = basis["eigenvectors"], step
        if spectra:
            write_npz(self.store.spectrum_path(step), **spectra)
        write_json(self.store.record_path(step), _to_jsonable(record))
        self.store.rebuild_jsonl()
        logging.info("step %d analysed in %.2f s (%d HVPs): %s", step, record["seconds"],
                     record.get("hvps", 0), _summary(record))
        return record

    def fail(self, step: int, reason: str) -> dict:
        """Writes a failure record for ``step`` (the pipeline then goes on)."""
        record = dict(step=int(step), status="failed", reason=reason, config=self.config)
        write_json(self.store.record_path(step), record)
        self.store.rebuild_jsonl()
        logging.warning("step %d: failed: %s", step, reason)
        return record

    def _compute(self, step: int, params: PyTree, model_state: PyTree):
        s, k = self.settings, self.k
        todo = set(s.transforms)
        loss_fn = transforms.analysis_loss(self.model, self.task, model_state)
        metrics_fn = transforms.analysis_metrics(self.model, self.task, model_state)
        record: dict[str, Any] = dict(
            step=step, status="ok", k=k, dtype=s.dtype,
            precision=dict(hvp_matmul=s.precision or "default", lanczos=s.dtype,
                           inner_products="highest"),
            versions=_versions(), config=self.config, settings=s.to_json())
        basis = spectra = None
        hvps = 0
        # The curvature operator: H or G of the mean analysis loss, or its block on s.block.
        op = self._operator(s.curvature, params, model_state)
        record["hessian"] = op.describe()
        record["curvature"] = s.curvature
        if s.block is not None:
            record["block"] = dict(prefixes=list(s.block_prefixes), leaves=list(op.leaf_names),
                                   num_params=op.dim)

        if "loss" in todo:
            m = transforms.data_metrics(metrics_fn, params, self.analysis,
                                        batch_size=s.batch_size)
            record.update({f"train_{name}": float(v) for name, v in m.items()})
            if self.test is not None:
                m = transforms.data_metrics(metrics_fn, params, self.test,
                                            batch_size=s.batch_size)
                record.update({f"test_{name}": float(v) for name, v in m.items()})
        grad = None
        if "gradient" in todo:
            gr = transforms.gradient(loss_fn, params, self.analysis, batch_size=s.batch_size)
            grad = gr.grad
            record["grad_norm"] = float(gr.norm)
            if not np.isfinite(record["grad_norm"]):
                raise FloatingPointError("the full-data gradient is not finite")
            if s.block is not None:  # From here on g is the block's part of the gradient.
                grad = op.select(grad)
                record["block_grad_norm"] = float(
                    jnp.linalg.norm(flatten_util.ravel_pytree(grad)[0]))
        g_flat = None if grad is None else flatten_util.ravel_pytree(grad)[0]
        eig = bounds = None
        if "eigenpairs" in todo:
            key = jax.random.fold_in(jax.random.key(s.seed), step)
            warm = s.warm_start and self._previous_basis is not None
            v0 = transforms.warm_start_vector(
                key, self._previous_basis if warm else None, op.like)
            num = min(2 * k + int(s.next_bound), op.dim - 1)
            eig = None
            if warm and s.tracker and self._previous_basis.shape[0] >= num:
                tracked = hs.track_eigenpairs(
                    op, jnp.asarray(self._previous_basis[:num], _dtype_of(op.like)), num,
                    like=op.like, tol=s.tol, key=key,
                    max_blocks=min(s.tracker_blocks, max(1, op.dim // num)))
                hvps += int(tracked.num_matvecs)
                record.update(tracker_hvps=int(tracked.num_matvecs),
                              tracker_converged=bool(np.all(tracked.converged)))
                if record["tracker_converged"]:
                    eig = tracked
            if eig is None:
                eig = hs.top_eigenpairs(op, v0, num, num_steps=self._lanczos_steps(num, op),
                                        tol=s.tol, block_size=s.block_size, key=key)
                hvps += int(eig.num_matvecs)
            values = np.asarray(eig.eigenvalues, np.float64)
            record.update(
                eigenvalues=values[:k], next_eigenvalues=values[k:2 * k],
                residuals=np.asarray(eig.residuals), converged=np.asarray(eig.converged),
                all_converged=bool(np.all(eig.converged)), lanczos_hvps=int(eig.num_matvecs),
                warm_start=bool(warm))
            basis = dict(eigenvectors=np.asarray(eig.eigenvectors, np.float32),
                         eigenvalues=values, residuals=np.asarray(eig.residuals))
            bounds = transforms.error_bounds(eig.residuals, eig.eigenvalues)
        if g_flat is not None and eig is not None and ("f_top" in todo or "c2" in todo):
            vectors = eig.eigenvectors[:2 * k] if s.next_bound else eig.eigenvectors
            fr = transforms.subspace_fractions(g_flat, vectors, k)
            if "f_top" in todo:
                record.update(f_top=float(fr["f_top"]), f_next=float(fr["f_next"]))
                record.update(transforms.fraction_bounds(bounds, k))
                if self.minibatches is not None:
                    mg = transforms.minibatch_gradients(loss_fn, params, self.minibatches)
                    if s.block is not None:
                        mg = mg[:, op.flat_indices]
                    mb = transforms.minibatch_f_top(mg, eig.eigenvectors, k)
                    record.update(f_top_minibatch=mb, f_top_minibatch_mean=float(np.mean(mb)))
            if "c2" in todo:
                record["c2"] = np.asarray(fr["c2"])
        if s.also_ggn and eig is not None:
            hvps += self._also_ggn(record, step, params, model_state, eig, g_flat)
        if "overlap_g_hg" in todo and grad is not None:
            hg = op(grad)
            hvps += 1
            record["overlap_g_hg"] = float(hs.hessian_gradient_overlap(grad, hg))
        if "layers" in todo and eig is not None:
            record["lambda_max"] = float(eig.eigenvalues[0])
            slices = models.layer_slices(op.like)
            record["top_eigenvector_layer_mass"] = transforms.layer_mass(
                np.asarray(eig.eigenvectors[0]), slices)
            record["layer_slices"] = [list(s) for s in slices]
        if "subspace_overlap" in todo and eig is not None:
            record["subspace_overlap"] = self._overlaps(step, basis["eigenvectors"], bounds)
        if "slq" in todo and step in s.slq_steps:
            nodes, weights = self._slq(op, step)
            hvps += s.slq_probes * s.slq_lanczos_steps
            spectra = dict(slq_nodes=np.asarray(nodes), slq_weights=np.asarray(weights))
            record["slq"] = dict(probes=s.slq_probes, lanczos_steps=s.slq_lanczos_steps)
        if "dense_spectrum" in todo and step in s.dense_steps:
            if op.dim > s.dense_max_params:
                record["dense_spectrum"] = (f"skipped: {op.dim} parameters > "
                                            f"dense_max_params={s.dense_max_params}")
            else:
                lam = transforms.dense_spectrum(op)
                hvps += op.dim
                spectra = dict(spectra or {}, dense_eigenvalues=lam)
                record["dense_spectrum"] = dict(num=int(lam.size), max=float(lam[-1]),
                                                min=float(lam[0]))
        record["hvps"] = hvps
        return record, basis, spectra

    def _operator(self, curvature_name: str, params: PyTree, model_state: PyTree):
        s = self.settings
        return transforms.curvature_operator(
            curvature_name, self.model, self.task, model_state, params, self.analysis,
            batch_size=s.batch_size, precision=s.precision, block=s.block_prefixes)

    def _also_ggn(self, record: dict, step: int, params: PyTree, model_state: PyTree,
                  eig: hs.Eigenpairs, g_flat: jax.Array | None) -> int:
        """GGN top-k (k + 1 pairs, for the error bar), f_top in it, and the overlap (eq. 5) of
        the GGN and Hessian top-k subspaces; started from the Hessian's top k. Returns HVPs."""
        s, k = self.settings, self.k
        ggn = self._operator("ggn", params, model_state)
        key = jax.random.fold_in(jax.random.key(s.seed + 1), step)
        num = min(k + 1, ggn.dim - 1)
        v0 = transforms.warm_start_vector(key, eig.eigenvectors[:k], ggn.like)
        geig = hs.top_eigenpairs(ggn, v0, num, num_steps=self._lanczos_steps(num, ggn),
                                 tol=s.tol, block_size=s.block_size, key=key)
        values = np.asarray(geig.eigenvalues, np.float64)
        record.update(ggn_eigenvalues=values[:k], ggn_residuals=np.asarray(geig.residuals),
                      ggn_all_converged=bool(np.all(geig.converged)),
                      ggn_lanczos_hvps=int(geig.num_matvecs),
                      ggn_hessian_overlap=float(hs.subspace_overlap(eig.eigenvectors[:k],
                                                                    geig.eigenvectors[:k])))
        if g_flat is not None and "f_top" in s.transforms:
            fr = transforms.subspace_fractions(g_flat, geig.eigenvectors, k)
            bounds = transforms.fraction_bounds(
                transforms.error_bounds(geig.residuals, geig.eigenvalues), k)
            record.update(f_top_ggn=float(fr["f_top"]), f_top_ggn_bound=bounds["f_top_bound"])
        return int(geig.num_matvecs)

    def _lanczos_steps(self, num, op) -> int | None:
        if self.settings.lanczos_steps is None:
            return None
        return int(min(max(self.settings.lanczos_steps, num), op.dim))

    def _slq(self, op, step):
        s = self.settings
        return spectrum.slq_quadrature(
            op, jax.random.fold_in(jax.random.key(s.seed + 7), step),
            num_probes=s.slq_probes, num_steps=min(s.slq_lanczos_steps, op.dim),
            probe_batch=1)

    def _overlaps(self, step: int, current: np.ndarray, bounds) -> dict:
        k = self.k
        dims = list(range(2, 2 * k + 1))
        out = {}
        refs = [t for t in self.settings.reference_steps if t < step]
        if self._previous_step is not None and self._previous_step < step:
            refs.append(self._previous_step)
        for t in sorted(set(refs)):
            ref = self.store.basis(t)
            if ref is None:
                continue
            out[str(t)] = transforms.subspace_overlaps(current, ref["eigenvectors"], k, dims)
            if "residuals" in ref and ref["residuals"].shape[0] >= 2:
                ref_bounds = transforms.error_bounds(ref["residuals"], ref["eigenvalues"])
                out[str(t)].update(transforms.subspace_overlap_bounds(bounds, ref_bounds, k, dims))
        if self._previous_step is not None and str(self._previous_step) in out:
            out["previous"] = dict(out[str(self._previous_step)], step=self._previous_step)
        return out

    # ---- streams ---------------------------------------------------------------------------

    def restore_target(self) -> dict:
        """The expected ``{"params", "model_state"}`` tree (shapes/dtypes) of a checkpoint."""
        x = np.asarray(self.analysis["x"][:1])
        shapes = jax.eval_shape(lambda: models.init_variables(self.model, jax.random.key(0), x))
        return {"params": shapes[0], "model_state": shapes[1]}

    def run(self, checkpoint_dir: str, *, steps: Sequence[int] | None = None,
            watch: bool = False, poll_seconds: float = 2.0, timeout_seconds: float = 600.0,
            final_step: int | None = None, progress: bool = True) -> list[dict]:
        """Processes the finalised checkpoints in ``checkpoint_dir`` in step order.

        Args:
          checkpoint_dir: a run's ``checkpoints/`` directory (never modified).
          steps: only these steps (default: all).
          watch: keep following a live run until ``final_step`` (default: the run's
            ``num_steps`` from its config) has been processed, or no new checkpoint appeared
            for ``timeout_seconds``.
          poll_seconds: how often to look for new checkpoints when watching.
          progress: log a line per checkpoint (and a progress bar).

        Returns:
          The records written by this call (failures included).
        """
        from tqdm import tqdm

        wanted = None if steps is None else set(int(s) for s in steps)
        done = set(self.store.done_steps())
        if done:
            last = max(done)
            basis = self.store.basis(last)
            if basis is not None:
                self._previous_basis, self._previous_step = basis["eigenvectors"], last
        target = self.restore_target()
        written = []
        bar = tqdm(desc="analyse", unit="ckpt", disable=not progress)
        for step in _checkpoint_stream(checkpoint_dir, watch=watch, poll_seconds=poll_seconds,
                                       timeout_seconds=timeout_seconds, final_step=final_step,
                                       config=self.config):
            if (wanted is not None and step not in wanted) or step in done:
                continue
            try:
                params, model_state, _ = ckpt_lib.restore_model(checkpoint_dir, step, target)
            except ckpt_lib.CheckpointError as e:
                written.append(self.fail(step, f"checkpoint unreadable: {e}"))
            else:
                written.append(self.process(step, params, model_state))
            done.add(step)
            bar.update(1)
            if wanted is not None and wanted <= done:
                break
        bar.close()
        return written


def _checkpoint_stream(checkpoint_dir: str, *, watch: bool, poll_seconds: float,
                       timeout_seconds: float, final_step: int | None, config: dict
                       ) -> Iterator[int]:
    """Yields finalised checkpoint steps in increasing order; with ``watch``, waits for new ones
    until ``final_step`` is yielded or nothing new appears for ``timeout_seconds``."""
    if final_step is None and config:
        final_step = config.get("num_steps")
    seen: set[int] = set()
    last_new = time.monotonic()
    while True:
        steps = [s for s in ckpt_lib.list_steps(checkpoint_dir) if s not in seen]
        for s in steps:
            seen.add(s)
            yield s
        if steps:
            last_new = time.monotonic()
        if not watch or (final_step is not None and final_step in seen):
            return
        if time.monotonic() - last_new > timeout_seconds:
            logging.warning("no new checkpoint in %s for %.0f s; stopping", checkpoint_dir,
                            timeout_seconds)
            return
        time.sleep(poll_seconds)


def _summary(record: dict) -> str:
    parts = []
    for key in ("train_loss", "f_top", "overlap_g_hg", "lambda_max"):
        if key in record and record[key] is not None:
            parts.append(f"{key} {record[key]:.4g}")
    return "  ".join(parts)


class Callback:
    """Runs a :class:`Pipeline` from inside :func:`train.train` every ``every`` checkpoints.

    Example::

        pipe = pipeline.Pipeline(model, "classification", analysis_set, "results/run")
        train.train(..., callbacks=[pipeline.Callback(pipe)])
    """

    def __init__(self, pipe: Pipeline, every: int = 1):
        self.pipe, self.every, self._count = pipe, every, 0

    def __call__(self, step: int, state) -> None:
        self._count += 1
        if (self._count - 1) % self.every == 0 and step not in self.pipe.store.done_steps():
            self.pipe.process(step, state.params, state.model_state)
