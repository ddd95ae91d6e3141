r"""Other views of the curvature, for models where the paper's k = number of classes has no
analogue (language models): f_top as a function of k, per-block spectra, and the Hessian seen
through Adam's preconditioner.

============================  ======================  ==========================================
factory                       requires                record keys
============================  ======================  ==========================================
:func:`f_top_curve`           gradient, eigenpairs    ``f_top_at`` (k -> f_top), ``f_top_curve``,
                                                      ``k_saturation``
:func:`block_spectra`         —                       ``block_spectra`` (per block: top
                                                      eigenvalues; SLQ nodes in ``block_slq/``)
:func:`adam_preconditioned`   —                       ``adam_eigenvalues``, ``adam_f_top``, …
============================  ======================  ==========================================

References:
  Y. Zhang et al., "Why Transformers Need Adam: A Hessian Perspective", NeurIPS 2024 (block
  spectra). J. Cohen et al., "Adaptive gradient methods at the edge of stability", 2022 (the
  preconditioned sharpness).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np

import hessian_subspace as hs
from hessian_subspace import _tree
from hessian_subspace.analysis.builtins import gradient_fractions
from hessian_subspace.analysis.sources import conform
from hessian_subspace.analysis.transforms import Stored, Transform

PyTree = Any


def f_top_curve(ks: Sequence[int] = (10, 50), *, saturation: float = 0.95,
                of: str = "eigenpairs", name: str = "f_top_curve") -> Transform:
    r"""f_top of the top-k subspace for every k up to the number of eigenpairs:
    ``f_top_curve`` (the cumulative :math:`\sum_{i\le k} c_i^2`), ``f_top_at[str(k)]`` for
    ``ks``, and ``k_saturation``, the smallest k whose f_top reaches ``saturation`` times the
    largest computed (where adding directions stops paying). Every k of ``ks`` needs k
    eigenvectors: the chain refuses more than ``eigenpairs`` computes."""
    ks = tuple(_tree.check_int("ks entries", k, 1) for k in ks)
    if not 0 < float(saturation) <= 1:
        raise ValueError(f"`saturation` must be in (0, 1], got {saturation!r}")

    def update(ctx, state):
        g = _tree.as_flat(ctx["gradient"])
        c2 = np.asarray(gradient_fractions(g, ctx[of].eigenvectors, 0)["c2"], np.float64)
        curve = np.cumsum(c2)
        out = dict(f_top_curve=curve, f_top_at={str(k): float(curve[k - 1]) for k in ks})
        out["k_saturation"] = int(np.argmax(curve >= saturation * curve[-1]) + 1)
        return out, state

    return Transform(name=name, update=update, requires=("gradient", of),
                     provides=("f_top_curve",),
                     config=dict(ks=ks, saturation=saturation, of=of),
                     records=("f_top_curve", "f_top_at", "k_saturation"),
                     needs={of: max(ks)} if ks else None)


def block_spectra(blocks: Mapping[str, Any] | None = None, *, k: int = 4, tol: float = 1e-3,
                  slq_probes: int = 4, slq_steps: int = 30,
                  curvature_name: str | None = None, name: str = "block_spectra") -> Transform:
    """The spectrum of each diagonal block of the curvature operator (embeddings, each layer's
    attention projections, MLPs, LayerNorms ...): its top-k eigenvalues (cold-started
    Lanczos) and an SLQ density (nodes and weights stored in ``block_slq/`` as
    ``NAME.nodes``, ``NAME.weights``); ``analysis.at_steps`` runs it at a few checkpoints.

    Args:
      blocks: ``{block name: leaf-path prefix or prefixes}``; None: one block per top-level
        key of the parameters.
      k: eigenvalues per block (fewer for blocks with fewer parameters).
      tol: relative residual tolerance.
      slq_probes, slq_steps: the SLQ density of each block (0 probes: none).
      curvature_name: "hessian" or "ggn" (None: the analyzer's).
      name: the transform's name.
    """
    k = _tree.check_int("k", k, 1)
    slq_probes = _tree.check_int("slq_probes", slq_probes, 0)
    slq_steps = _tree.check_int("slq_steps", slq_steps, 1)

    def update(ctx, state):
        groups = dict(blocks) if blocks is not None else {
            key: key for key in dict.fromkeys(n.split("/")[0] for n, _, _ in
                                              _tree.leaf_slices(ctx["params"]))}
        record, arrays = {}, {}
        for i, (label, prefixes) in enumerate(groups.items()):
            op = ctx.operator(curvature_name, block=prefixes if isinstance(prefixes, str)
                              else tuple(prefixes))
            entry: dict[str, Any] = dict(num_params=int(op.dim))
            key = jax.random.fold_in(ctx.rng(13), i)
            if op.dim >= 2:
                num = min(k, op.dim - 1)
                eig = hs.top_eigenpairs(op, hs.random_start_vector(key, op.like), num, tol=tol,
                                        key=key)
                ctx.count_hvps(int(eig.num_matvecs))
                entry.update(eigenvalues=np.asarray(eig.eigenvalues, np.float64),
                             converged=bool(np.all(eig.converged)))
            if slq_probes and op.dim >= 2:
                nodes, weights = hs.slq_quadrature(op, jax.random.fold_in(key, 1),
                                                   num_probes=slq_probes,
                                                   num_steps=min(slq_steps, op.dim))
                ctx.count_hvps(slq_probes * min(slq_steps, op.dim))
                arrays[f"{label}.nodes"] = np.asarray(nodes)
                arrays[f"{label}.weights"] = np.asarray(weights)
            record[label] = entry
        out: dict[str, Any] = {"block_spectra": record}
        if arrays:
            out["block_slq"] = Stored(arrays)
        return out, state

    return Transform(name=name, update=update, provides=("block_spectra",),
                     config=dict(blocks=blocks, k=k, tol=tol, slq_probes=slq_probes,
                                 slq_steps=slq_steps, curvature=curvature_name),
                     records=("block_spectra",))


def find_adam_state(opt_state: PyTree) -> tuple[PyTree, Any]:
    """``(nu, count)`` of the first Adam-like state in an optimizer state: optax's
    ``ScaleByAdamState``, or its restored form (a dict with ``nu`` and ``count``)."""
    if hasattr(opt_state, "nu") and hasattr(opt_state, "count"):
        return opt_state.nu, opt_state.count
    if isinstance(opt_state, Mapping):
        if "nu" in opt_state and "count" in opt_state:
            return opt_state["nu"], opt_state["count"]
        children = opt_state.values()
    elif isinstance(opt_state, (list, tuple)):
        children = opt_state
    else:
        children = ()
    for child in children:
        found = find_adam_state(child)
        if found is not None:
            return found
    return None


def adam_preconditioned(k: int = 10, *, b2: float = 0.999, eps: float = 1e-8,
                        tol: float = 1e-3, extras_key: str = "optimizer",
                        name: str = "adam") -> Transform:
    r"""The Hessian through Adam's preconditioner, :math:`D^{-1/2} H D^{-1/2}` with
    :math:`D = \sqrt{\hat v} + \epsilon` from the optimizer state in ``ctx["extras"]``
    (:func:`hessian_subspace.precondition`, :func:`hessian_subspace.adam_scale`): its top-k
    eigenvalues (``adam_eigenvalues``; the first is the preconditioned sharpness), and, when
    the context has the gradient, ``adam_f_top``: the fraction of the preconditioned gradient
    :math:`D^{-1/2}g` in their span — the paper's question asked in Adam's geometry.

    The optimizer state comes from the checkpoints
    (``checkpoints.run_checkpoints(..., optimizer=True)``) or the training loop
    (``analyzer(step, params, extras={"optimizer": opt_state})``).
    """
    k = _tree.check_int("k", k, 1)

    def update(ctx, state):
        opt_state = ctx["extras"].get(extras_key)
        found = None if opt_state is None else find_adam_state(opt_state)
        if found is None:
            raise ValueError(
                f"transform {name!r} needs Adam's state in ctx['extras'][{extras_key!r}]: "
                "run_checkpoints(..., optimizer=True), or analyzer(step, params, "
                "extras={'optimizer': opt_state})")
        nu, count = found
        count = int(np.asarray(_tree.to_host(count)))
        if count == 0:  # before the first update the second moment is zero: D = eps
            return {"adam_skipped": "no second moment before Adam's first update"}, state
        params = ctx["params"]
        nu = conform(nu, params, "Adam's second moment")
        nu = jax.tree_util.tree_map(lambda v, p: jax.numpy.asarray(v, p.dtype), nu, params)
        scale = hs.adam_scale(nu, count, b2=b2, eps=eps)
        op = hs.precondition(ctx.operator(block=None), scale)
        key = ctx.rng(11)
        num = min(k, op.dim - 1)
        eig = hs.top_eigenpairs(op, hs.random_start_vector(key, op.like), num, tol=tol, key=key)
        ctx.count_hvps(int(eig.num_matvecs))
        out = dict(adam_eigenvalues=np.asarray(eig.eigenvalues, np.float64),
                   adam_residuals=np.asarray(eig.residuals),
                   adam_all_converged=bool(np.all(eig.converged)), adam_count=count)
        if "gradient" in ctx and not hasattr(ctx["operator"], "select"):
            g = jax.tree_util.tree_map(lambda s, x: s * x, scale, ctx["gradient"])
            fractions = gradient_fractions(_tree.as_flat(g), eig.eigenvectors, num)
            out["adam_f_top"] = float(fractions["f_top"])
        return out, state

    return Transform(name=name, update=update, provides=("adam_eigenvalues",),
                     config=dict(k=k, b2=b2, eps=eps, tol=tol, extras_key=extras_key),
                     records=("adam_eigenvalues", "adam_residuals", "adam_all_converged",
                              "adam_count", "adam_f_top", "adam_skipped"))
