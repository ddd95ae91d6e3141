"""Shared test helpers: reference constructions and a compilation counter (no mocks)."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import jax.monitoring
import numpy as np

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compilations():
    """Counts XLA backend compilations inside the block: ``with count_compilations() as n: ...``
    then ``n[0]``."""
    count = [0]

    def listener(event, duration, **kwargs):
        del duration, kwargs
        if event == _COMPILE_EVENT:
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def matrix_with_spectrum(eigenvalues, seed=0):
    """A dense symmetric float64 numpy matrix Q diag(λ) Q^T with a random orthogonal Q, and Q."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(lam.size, lam.size)))
    return (q * lam) @ q.T, q


def projector(rows):
    rows = np.asarray(rows, dtype=np.float64)
    return rows.T @ rows


def top_subspace(matrix, k, which="LA"):
    """Reference (eigenvalues, eigenvector rows) of a dense symmetric matrix by numpy eigh."""
    w, v = np.linalg.eigh(np.asarray(matrix, dtype=np.float64))
    order = {"LA": np.argsort(-w), "SA": np.argsort(w), "LM": np.argsort(-np.abs(w))}[which]
    return w[order[:k]], v[:, order[:k]].T


def eps(dtype):
    return float(jnp.finfo(dtype).eps)
