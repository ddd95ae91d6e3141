"""Spectra of the curvature operator as transforms: the SLQ density (the paper's Fig. 5) and the
dense spectrum of small models (Fig. 4), stored in ``spectra/``. Both are costly: run them at a
few checkpoints with :func:`hessian_subspace.analysis.at_steps` (or ``every``)."""

from __future__ import annotations

import time
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import flatten_util

import hessian_subspace as hs
from hessian_subspace import _tree
from hessian_subspace.analysis.transforms import Stored, Transform


def slq(*, num_probes: int = 10, num_steps: int = 80, name: str = "slq") -> Transform:
    """The spectral density by stochastic Lanczos quadrature (Fig. 5) at every checkpoint it
    runs at (``analysis.at_steps(slq(), steps)`` for a few): nodes and weights stored as
    ``slq_nodes``, ``slq_weights`` in ``spectra/``; record ``slq`` (probes, Lanczos steps)."""
    num_probes = _tree.check_int("num_probes", num_probes, 1)
    num_steps = _tree.check_int("num_steps", num_steps, 1)

    def update(ctx, state):
        op = ctx["operator"]
        nodes, weights = hs.slq_quadrature(op, ctx.rng(7), num_probes=num_probes,
                                           num_steps=min(num_steps, op.dim), probe_batch=1)
        ctx.count_hvps(num_probes * num_steps)
        return {"slq": dict(probes=num_probes, lanczos_steps=num_steps),
                "spectra": Stored(slq_nodes=np.asarray(nodes),
                                  slq_weights=np.asarray(weights))}, state

    return Transform(name=name, update=update, provides=("slq",),
                     config=dict(num_probes=num_probes, num_steps=num_steps),
                     records=("slq",))


def dense_spectrum(*, max_params: int = 5000, block_size: int = 256,
                   name: str = "dense_spectrum") -> Transform:
    """Every eigenvalue of the curvature operator (Fig. 4; ``analysis.at_steps(dense_spectrum(),
    steps)`` for a few checkpoints): :func:`dense_float64`
    (p products, ``block_size`` at a time, into a float64 matrix), then LAPACK's
    eigenvalue-only symmetric solver (``numpy.linalg.eigvalsh``: no eigenvectors, about a
    third of ``eigh``'s time). Stored as ``dense_eigenvalues`` in ``spectra/``; record
    ``dense_spectrum`` (count, max, min, seconds of each stage). Skipped (with a note in the
    record) above ``max_params`` parameters: 16 p² bytes of memory at the peak, p³ time."""
    max_params = _tree.check_int("max_params", max_params, 1)
    block_size = _tree.check_int("block_size", block_size, 1)

    def update(ctx, state):
        op = ctx["operator"]
        if op.dim > max_params:
            return {"dense_spectrum": f"skipped: {op.dim} parameters > "
                                      f"max_params={max_params}"}, state
        start = time.perf_counter()
        h = dense_float64(op, op.like, block_size=block_size)
        built = time.perf_counter() - start
        ctx.count_hvps(op.dim)
        start = time.perf_counter()
        lam = np.linalg.eigvalsh(h)
        solved = time.perf_counter() - start
        del h
        logging.info("dense spectrum of %d parameters: matrix %.1f s, eigvalsh %.1f s",
                     lam.size, built, solved)
        return {"dense_spectrum": dict(num=int(lam.size), max=float(lam[-1]), min=float(lam[0]),
                                       matrix_seconds=round(built, 2),
                                       eigvalsh_seconds=round(solved, 2)),
                "spectra": Stored(dense_eigenvalues=lam)}, state

    return Transform(name=name, update=update, provides=("dense_spectrum",),
                     config=dict(max_params=max_params),
                     records=("dense_spectrum",))


def dense_float64(matvec, like, *, block_size: int = 256) -> np.ndarray:
    """The operator as a symmetric float64 ``(p, p)`` numpy matrix, built ``block_size``
    columns at a time (one vmapped product per block, compiled once) and symmetrised in place
    block by block: the matrix is the only p² allocation (8 p² bytes), where a jitted
    :func:`hessian_subspace.dense_matrix` holds its identity, its output and their transposes.
    Logs its progress."""
    mv, like_flat = _tree.flat_matvec(matvec, like, flatten_util.ravel_pytree(like)[0].dtype)
    p = int(like_flat.size)
    block_size = min(block_size, p)

    @jax.jit
    def columns(start):
        eye = jax.nn.one_hot(start + jnp.arange(block_size), p, dtype=like_flat.dtype)
        return jax.vmap(mv)(eye)

    h = np.empty((p, p), np.float64)
    last = time.monotonic()
    for start in range(0, p, block_size):
        first = min(start, p - block_size)  # the last block overlaps the one before
        h[first:first + block_size] = np.asarray(columns(first), np.float64)
        if time.monotonic() - last > 30:
            logging.info("dense matrix: %d of %d columns", first + block_size, p)
            last = time.monotonic()
    for start in range(0, p, block_size):  # H = (H + H^T) / 2, in place, by row blocks
        rows = slice(start, min(start + block_size, p))
        mean = 0.5 * (h[rows, :rows.stop] + h[:rows.stop, rows].T)
        h[rows, :rows.stop] = mean
        h[:rows.stop, rows] = mean.T
    return h
