"""Spectra of the curvature operator as transforms: the SLQ density (the paper's Fig. 5), the
trace and diagonal (Hutchinson), each optionally deflated by the top eigenpairs the chain has
already computed, and the dense spectrum of small models (Fig. 4), stored in ``spectra/``. All
are costly: run them at a few checkpoints with :func:`hessian_subspace.analysis.at_steps` (or
``every``)."""

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


def _converged_pairs(eig) -> tuple[np.ndarray, np.ndarray] | None:
    """The converged pairs of an eigensolve (values, vectors), or None if there are none."""
    ok = np.asarray(eig.converged, bool)
    if not ok.any():
        return None
    return np.asarray(eig.eigenvalues)[ok], np.asarray(eig.eigenvectors)[ok]


def slq(*, num_probes: int = 10, num_steps: int = 80, deflate: bool = False,
        of: str = "eigenpairs", name: str = "slq") -> Transform:
    """The spectral density by stochastic Lanczos quadrature (Fig. 5) at every checkpoint it
    runs at (``analysis.at_steps(slq(), steps)`` for a few): nodes and weights stored as
    ``slq_nodes``, ``slq_weights`` in ``spectra/``; record ``slq`` (probes, Lanczos steps,
    ``deflated``: pairs placed exactly).

    With ``deflate``, the converged pairs of the ``of`` transform's eigensolve are placed
    exactly (weight 1/p each, the last nodes of every probe) and the probes run on the rest of
    the spectrum (:func:`hessian_subspace.spectral_density`): the outliers at their Ritz values
    instead of smeared by a few probes. Unconverged pairs are not used (a misplaced outlier
    would look exact); with none converged, the density is plain SLQ and ``deflated`` is 0."""
    num_probes = _tree.check_int("num_probes", num_probes, 1)
    num_steps = _tree.check_int("num_steps", num_steps, 1)

    def update(ctx, state):
        op = ctx["operator"]
        pairs = _converged_pairs(ctx[of]) if deflate else None
        dim = op.dim - (0 if pairs is None else len(pairs[0]))
        steps = min(num_steps, dim)
        nodes, weights = hs.slq_quadrature(op, ctx.rng(7), num_probes=num_probes,
                                           num_steps=steps, probe_batch=1, deflate=pairs)
        ctx.count_hvps(num_probes * steps)
        return {"slq": dict(probes=num_probes, lanczos_steps=steps,
                            deflated=0 if pairs is None else len(pairs[0])),
                "spectra": Stored(slq_nodes=np.asarray(nodes),
                                  slq_weights=np.asarray(weights))}, state

    return Transform(name=name, update=update, provides=("slq",),
                     requires=(of,) if deflate else (),
                     config=dict(num_probes=num_probes, num_steps=num_steps, deflate=deflate,
                                 of=of if deflate else None),
                     records=("slq",))


TRACE_ESTIMATORS = ("hutchinson", "xtrace")


def trace(*, num_probes: int = 50, deflate: bool = True, diagonal: bool = False,
          estimator: str = "hutchinson", of: str = "eigenpairs", name: str = "trace"
          ) -> Transform:
    r"""Tr H by Hutchinson's estimator (or XTrace: ``estimator``) with its standard error,
    deflated by the ``of`` transform's eigenpairs (Hutch++-style: their part
    :math:`\sum_i \lambda_i` exactly, the probes only see the rest; unbiased whatever their
    accuracy,
    :func:`hessian_subspace.hutchinson_trace`). Record ``trace``: ``estimate``,
    ``standard_error``, ``probes``, ``deflated`` (pairs), ``top_part`` (their
    :math:`\sum_i\lambda_i\|v_i\|^2`), ``top_fraction`` (of the estimate).

    With ``diagonal``, the same probes also give the Hessian's diagonal with a standard error
    per entry (:func:`hessian_subspace.hutchinson_diagonal`), stored as ``hessian_diagonal``
    and ``hessian_diagonal_se`` in ``spectra/`` (``ravel_pytree`` order), summarised in the
    record (``diagonal``: min, max, median relative standard error).

    ``estimator="xtrace"`` spends the ``num_probes`` products (even, >= 4) on XTrace / XDiag
    instead (:func:`hessian_subspace.xtrace`): each probe also sketches H's top directions,
    so without ``deflate`` it does what the eigenpairs do for Hutchinson (BUILD_NOTES, issue
    21: trace error ÷ 2.2-3.5 against plain Hutchinson at equal products on the FC net).
    The record says which (``estimator``)."""
    num_probes = _tree.check_int("num_probes", num_probes, 2)
    if estimator not in TRACE_ESTIMATORS:
        raise ValueError(f"`estimator` must be one of {TRACE_ESTIMATORS}, got {estimator!r}")
    if estimator == "xtrace" and (num_probes < 4 or num_probes % 2):
        raise ValueError(f"`num_probes` must be even and >= 4 with estimator='xtrace' (half "
                         f"sketch, half its products), got {num_probes}")
    xtrace = estimator == "xtrace"

    def update(ctx, state):
        op = ctx["operator"]
        eig = ctx[of] if deflate else None
        pairs = None if eig is None else (np.asarray(eig.eigenvalues),
                                          np.asarray(eig.eigenvectors))
        out: dict = {}
        if diagonal:
            d = (hs.xdiag(op, ctx.rng(8), num_matvecs=num_probes, deflate=pairs) if xtrace else
                 hs.hutchinson_diagonal(op, ctx.rng(8), num_probes=num_probes, deflate=pairs))
            estimate, se = float(d.trace), float(d.trace_standard_error)
            diag = np.asarray(flatten_util.ravel_pytree(d.diagonal)[0])
            diag_se = np.asarray(flatten_util.ravel_pytree(d.standard_error)[0])
            if not (np.all(np.isfinite(diag)) and np.all(np.isfinite(diag_se))):
                raise FloatingPointError(f"{name}: non-finite Hessian diagonal estimate")
            rel = diag_se / np.maximum(np.abs(diag), np.finfo(np.float32).tiny)
            out["spectra"] = Stored(hessian_diagonal=diag, hessian_diagonal_se=diag_se)
            summary = dict(min=float(diag.min()), max=float(diag.max()),
                           median_relative_se=float(np.median(rel)))
        else:
            t = (hs.xtrace(op, ctx.rng(8), num_matvecs=num_probes, deflate=pairs) if xtrace else
                 hs.hutchinson_trace(op, ctx.rng(8), num_probes=num_probes, deflate=pairs))
            estimate, se = float(t.estimate), float(t.standard_error)
        if not (np.isfinite(estimate) and np.isfinite(se)):
            raise FloatingPointError(f"{name}: non-finite trace estimate")
        ctx.count_hvps(num_probes)
        top = 0.0 if pairs is None else float(np.sum(pairs[0] * np.sum(pairs[1]**2, axis=1)))
        record = dict(estimate=estimate, standard_error=se, probes=num_probes,
                      estimator=estimator,
                      deflated=0 if pairs is None else len(pairs[0]), top_part=top,
                      top_fraction=top / estimate if estimate else None)
        if diagonal:
            record["diagonal"] = summary
        out["trace"] = record
        return out, state

    return Transform(name=name, update=update, provides=("trace",),
                     requires=(of,) if deflate else (),
                     config=dict(num_probes=num_probes, deflate=deflate, diagonal=diagonal,
                                 estimator=estimator, of=of if deflate else None),
                     records=("trace",))


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
