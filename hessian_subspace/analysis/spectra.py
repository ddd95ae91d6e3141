"""Spectra of the curvature operator as transforms: the SLQ density (the paper's Fig. 5) and the
dense spectrum of small models (Fig. 4), stored in ``spectra/`` at chosen steps."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

import hessian_subspace as hs
from hessian_subspace.analysis.builtins import _positive_int, _steps
from hessian_subspace.analysis.transforms import Stored, Transform



def slq(*, steps: Sequence[int] | None = None, num_probes: int = 10, num_steps: int = 80,
        name: str = "slq") -> Transform:
    """The spectral density by stochastic Lanczos quadrature (Fig. 5) at ``steps`` (None: every
    checkpoint): nodes and weights stored as ``slq_nodes``, ``slq_weights`` in ``spectra/``;
    record ``slq`` (probes, Lanczos steps)."""
    steps = _steps("steps", steps)
    num_probes = _positive_int("num_probes", num_probes)
    num_steps = _positive_int("num_steps", num_steps)

    def update(ctx, state):
        if steps is not None and ctx.step not in steps:
            return {}, state
        op = ctx["operator"]
        nodes, weights = hs.slq_quadrature(op, ctx.rng(7), num_probes=num_probes,
                                           num_steps=min(num_steps, op.dim), probe_batch=1)
        ctx.count_hvps(num_probes * num_steps)
        return {"slq": dict(probes=num_probes, lanczos_steps=num_steps),
                "spectra": Stored(slq_nodes=np.asarray(nodes),
                                  slq_weights=np.asarray(weights))}, state

    return Transform(name=name, update=update, provides=("slq",),
                     config=dict(steps=steps, num_probes=num_probes, num_steps=num_steps))


def dense_spectrum(*, steps: Sequence[int] | None = None, max_params: int = 5000,
                   name: str = "dense_spectrum") -> Transform:
    """Every eigenvalue of the curvature operator at ``steps`` (Fig. 4): p products, then a
    float64 ``eigh``; stored as ``dense_eigenvalues`` in ``spectra/``, record
    ``dense_spectrum`` (count, max, min). Skipped (with a note in the record) above
    ``max_params`` parameters: p² memory, p³ time."""
    steps = _steps("steps", steps)
    max_params = _positive_int("max_params", max_params)

    def update(ctx, state):
        if steps is not None and ctx.step not in steps:
            return {}, state
        op = ctx["operator"]
        if op.dim > max_params:
            return {"dense_spectrum": f"skipped: {op.dim} parameters > "
                                      f"max_params={max_params}"}, state
        h = np.asarray(jax.jit(hs.dense_matrix)(op, op.like), np.float64)
        lam = np.linalg.eigvalsh(0.5 * (h + h.T))
        ctx.count_hvps(op.dim)
        return {"dense_spectrum": dict(num=int(lam.size), max=float(lam[-1]), min=float(lam[0])),
                "spectra": Stored(dense_eigenvalues=lam)}, state

    return Transform(name=name, update=update, provides=("dense_spectrum",),
                     config=dict(steps=steps, max_params=max_params))
