"""Tracking the top subspace of a slowly changing operator (block Krylov seeded with the
previous basis) against cold Lanczos."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import hessian_subspace as hs

from _helpers import projector, top_subspace


def _rotating_operators(num, p=120, k=6, angle=0.005, seed=0):
    """A(t) = Q(t) diag(λ) Q(t)^T with Q(t) = exp(t S) Q0, S antisymmetric: a known spectrum
    (k outliers over a bulk) whose eigenvectors rotate slowly."""
    rng = np.random.default_rng(seed)
    lam = np.r_[np.linspace(10.0, 5.0, k), np.linspace(0.0, 1.0, p - k)]
    q0 = np.linalg.qr(rng.normal(size=(p, p)))[0]
    s = rng.normal(size=(p, p))
    s = (s - s.T) / np.sqrt(p)
    rot = scipy.linalg.expm(angle * s)
    mats, q = [], q0
    for _ in range(num):
        mats.append((q * lam) @ q.T)
        q = rot @ q
    return mats, lam, k


def test_tracking_needs_fewer_matvecs_than_cold_lanczos_and_agrees():
    mats, lam, k = _rotating_operators(6)
    with jax.enable_x64(True):
        previous = None
        savings = []
        for a in mats:
            aj = jnp.asarray(a)
            mv = lambda v, aj=aj: aj @ v  # noqa: E731
            v0 = jnp.asarray(np.random.default_rng(1).normal(size=a.shape[0]))
            cold = hs.top_eigenpairs(mv, v0, k + 2, tol=1e-6, num_steps=100)
            assert bool(cold.converged.all())
            if previous is not None:
                warm = hs.track_eigenpairs(mv, previous, k, like=v0, tol=1e-6, max_blocks=10)
                assert bool(warm.converged.all())
                # Residuals <= 1e-6 |λ|, gap >= 4: eigenvalue errors ~ r²/gap, vectors ~ r/gap.
                np.testing.assert_allclose(warm.eigenvalues, cold.eigenvalues[:k], rtol=1e-10)
                want_vals, want_vecs = top_subspace(a, k)
                np.testing.assert_allclose(warm.eigenvalues, want_vals, rtol=1e-10)
                assert np.linalg.norm(projector(warm.eigenvectors) - projector(want_vecs)) < 1e-5
                # Residuals are explicit: recompute them with fresh matvecs.
                v = np.asarray(warm.eigenvectors)
                r = np.linalg.norm(v @ a - np.asarray(warm.eigenvalues)[:, None] * v, axis=1)
                np.testing.assert_allclose(np.asarray(warm.residuals), r, rtol=1e-6,
                                           atol=1e-12)
                savings.append(int(warm.num_matvecs) / int(cold.num_matvecs))
            previous = np.asarray(cold.eigenvectors)  # top k + 2 guard vectors
        assert max(savings) < 1.0
        assert np.mean(savings) < 0.6, savings


def test_tracking_from_an_unrelated_start_still_converges():
    mats, lam, k = _rotating_operators(1, p=80, k=4)
    with jax.enable_x64(True):
        a = jnp.asarray(mats[0])
        start = np.random.default_rng(3).normal(size=(6, 80))
        res = hs.track_eigenpairs(lambda v: a @ v, start, 4, like=jnp.zeros(80), tol=1e-8,
                                  max_blocks=13)
        assert bool(res.converged.all())
        np.testing.assert_allclose(res.eigenvalues, np.sort(lam)[::-1][:4], rtol=1e-9)


def test_tracking_validates_its_input():
    mv = lambda v: v  # noqa: E731
    with pytest.raises(ValueError, match="`start`"):
        hs.track_eigenpairs(mv, jnp.ones((3, 7)), 2, like=jnp.zeros(8))
    with pytest.raises(ValueError, match="at least k"):
        hs.track_eigenpairs(mv, jnp.ones((1, 8)), 2, like=jnp.zeros(8))
    with pytest.raises(ValueError, match="`start`.*non-finite"):
        hs.track_eigenpairs(mv, jnp.full((3, 8), jnp.nan), 2, like=jnp.zeros(8))
