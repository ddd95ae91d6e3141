"""Shared test helpers: reference constructions and a compilation counter (no mocks)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

import jax
import jax.numpy as jnp
import jax.monitoring
import numpy as np

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Process:
    """A subprocess in the repository root whose output goes to a file (a pipe nobody reads
    would block it)."""

    def __init__(self, cmd, log_path):
        self.log_path = str(log_path)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)

    def finish(self, timeout=600):
        self.proc.wait(timeout=timeout)
        self._log.close()
        return self.proc.returncode, open(self.log_path).read()

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._log.close()


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
