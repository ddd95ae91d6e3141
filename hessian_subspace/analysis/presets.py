"""The paper's measurement set from flat settings (command-line flags, experiment configs).

:class:`Settings` holds what ``launch/analyze.py`` and the experiment configs set;
:func:`paper_chain` turns it into a :func:`~hessian_subspace.analysis.chain` of built-ins and
:func:`analyzer_options` into the analyzer's keyword arguments. Library users compose the
built-ins directly instead.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

from hessian_subspace import _tree
from hessian_subspace.analysis import builtins as b
from hessian_subspace.analysis import spectra, views
from hessian_subspace.analysis.transforms import Chain, Transform, at_steps, chain

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
    "f_top_curve",  # f_top for every k up to 2k, at `f_top_ks`, and where it saturates
    "block_spectra",  # top eigenvalues and SLQ density of each parameter block
    "adam",  # the Hessian through Adam's preconditioner (optimizer state from the checkpoint)
)
DEFAULT_TRANSFORMS = TRANSFORMS[:8]


@dataclasses.dataclass(frozen=True)
class Settings:
    """The paper's analysis as flat settings (validated on construction; the fields are the
    flags of ``launch/analyze.py``, so an error naming `k` is about ``--k``)."""

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
    # Bytes per device for a Krylov basis; a solve that would exceed it is thick-restarted.
    memory_budget: float | None = None
    # Linearise the product once per solve ("auto": when it fits; hs.dataset_hvp's `cache`).
    hvp_cache: bool | str = "auto"
    f_top_ks: tuple[int, ...] = ()  # f_top_curve's ks (each <= 2k); () : k and 2k
    block_spectra_steps: tuple[int, ...] = ()  # () with "block_spectra": every checkpoint
    block_k: int = 4
    block_slq_probes: int = 4
    block_slq_steps: int = 30
    adam_k: int = 10
    adam_b2: float = 0.999
    adam_eps: float = 1e-8

    def __post_init__(self):
        for name in ("transforms", "reference_steps", "slq_steps", "dense_steps", "f_top_ks",
                     "block_spectra_steps"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (tuple, list)):
                raise ValueError(f"`{name}` must be a sequence, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        unknown = [t for t in self.transforms if t not in TRANSFORMS]
        if unknown:
            raise ValueError(f"unknown transforms {unknown}; choose from {TRANSFORMS}")
        for name in ("k", "lanczos_steps"):
            if getattr(self, name) is not None:
                _tree.check_int(name, getattr(self, name), 1)
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"`dtype` must be 'float32' or 'float64', got {self.dtype!r}")
        if self.curvature not in ("hessian", "ggn"):
            raise ValueError(f"`curvature` must be 'hessian' or 'ggn', got {self.curvature!r}")
        if self.also_ggn and (self.curvature != "hessian" or "eigenpairs" not in self.transforms):
            raise ValueError("`also_ggn` needs curvature='hessian' and 'eigenpairs' in "
                             "`transforms`")
        if isinstance(self.block, list):
            object.__setattr__(self, "block", tuple(self.block))
        # Everything else (ranges, precision, requirements between transforms) is checked by
        # the transforms, the chain and the analyzer, all before anything is written; here
        # with the smallest k that the f_top_ks allow when k comes from the model.
        paper_chain(self, k=self.k or max([2, *((x + 1) // 2 for x in self.f_top_ks)]))

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def paper_chain(settings: Settings, *, k: int, metrics_fn: Callable | None = None,
                blocks: dict | None = None) -> Chain:
    """The chain of the paper's measurements that ``settings.transforms`` names, in the order
    of :data:`TRANSFORMS` (the GGN beside the Hessian, ``also_ggn``, after ``f_top``).

    Args:
      settings: the analysis settings.
      k: size of the top subspace (``settings.k`` or the number of classes); eigenpairs are
        computed for 2k (2k + 1 with ``next_bound``).
      metrics_fn: for "loss": ``metrics(params, batch[, state])`` with loss and accuracy.
      blocks: for "block_spectra": ``{name: leaf prefix}`` (None: top-level keys).
    """
    s = settings
    todo = set(s.transforms)
    parts: list[Any] = []
    if "loss" in todo:
        parts.append(b.loss(metrics_fn))
    if "gradient" in todo:
        parts.append(b.gradient())
    if "eigenpairs" in todo:
        parts.append(b.eigenpairs(2 * k + int(s.next_bound), tol=s.tol,
                                  num_steps=s.lanczos_steps, block_size=s.block_size,
                                  warm_start=s.warm_start, tracker=s.tracker,
                                  tracker_blocks=s.tracker_blocks))
    if "f_top" in todo:
        parts.append(b.f_top(k, num_minibatches=s.num_minibatches,
                             minibatch_size=s.minibatch_size))
    if "c2" in todo:
        parts.append(b.c2(2 * k))
    if s.also_ggn:
        parts.append(b.ggn(k, tol=s.tol, num_steps=s.lanczos_steps, block_size=s.block_size))
    if "overlap_g_hg" in todo:
        parts.append(b.overlap_g_hg())
    if "layers" in todo:
        parts.append(b.layers())
    if "subspace_overlap" in todo:
        # Fig. 3: the overlap as a function of the dimension d = 1 ... 2k.
        parts.append(b.subspace_overlap(k, reference_steps=s.reference_steps,
                                        dims=range(1, 2 * k + 1)))
    if "slq" in todo:
        parts.append(_at(spectra.slq(num_probes=s.slq_probes, num_steps=s.slq_lanczos_steps),
                         s.slq_steps))
    if "dense_spectrum" in todo:
        parts.append(_at(spectra.dense_spectrum(max_params=s.dense_max_params), s.dense_steps))
    if "f_top_curve" in todo:
        parts.append(views.f_top_curve(s.f_top_ks or (k, 2 * k)))
    if "block_spectra" in todo:
        parts.append(_at(views.block_spectra(blocks, k=s.block_k, tol=s.tol,
                                             slq_probes=s.block_slq_probes,
                                             slq_steps=s.block_slq_steps),
                         s.block_spectra_steps or None))
    if "adam" in todo:
        parts.append(views.adam_preconditioned(s.adam_k, b2=s.adam_b2, eps=s.adam_eps,
                                               tol=s.tol))
    return chain(*parts)


def _at(t: Transform, steps) -> Transform:
    """``t`` at ``steps`` (None: at every checkpoint)."""
    return t if steps is None else at_steps(t, steps)


def analyzer_options(settings: Settings) -> dict:
    """The :class:`~hessian_subspace.analysis.Analyzer` keyword arguments of ``settings``."""
    return dict(batch_size=settings.batch_size, dtype=settings.dtype,
                precision=settings.precision, seed=settings.seed, curvature=settings.curvature,
                block=settings.block, memory_budget=settings.memory_budget,
                hvp_cache=settings.hvp_cache)
