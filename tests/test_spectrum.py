"""Stochastic Lanczos quadrature and Hutchinson's trace on operators with known spectra."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import hessian_subspace as hs

from _helpers import matrix_with_spectrum


def test_slq_quadrature_reproduces_spectral_moments():
    # Gauss quadrature with m nodes is exact for polynomials of degree < 2m, so
    # sum_j tau_j theta_j^r = v^T A^r v exactly; averaged over probes, ~ tr(A^r)/p.
    lam = np.r_[np.linspace(0.0, 1.0, 190), 5.0 + np.arange(10)]
    with jax.enable_x64(True):
        a, _ = matrix_with_spectrum(lam, seed=0)
        aj = jnp.asarray(a)
        sd = hs.spectral_density(lambda v: aj @ v, jax.random.key(0), num_probes=64,
                                 num_steps=12, grid=jnp.linspace(-1, 16, 400), sigma=0.05,
                                 like=jnp.zeros(200))
        nodes, weights = np.asarray(sd.nodes), np.asarray(sd.weights)
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-12)
        for r in (1, 2, 3):
            est = np.mean(np.sum(weights * nodes**r, axis=1))
            want = np.mean(lam**r)
            assert abs(est - want) < 0.15 * want, (r, est, want)
        # The smoothed density integrates to one over a wide grid.
        grid = np.asarray(sd.grid)
        np.testing.assert_allclose(np.trapezoid(np.asarray(sd.density), grid), 1.0, rtol=1e-3)
        # Mass above 4 is the fraction of outliers, 10 / 200.
        high = np.mean(np.sum(np.where(nodes > 4, weights, 0.0), axis=1))
        assert abs(high - 0.05) < 0.03


def test_slq_padding_after_breakdown_has_zero_weight():
    # A two-valued spectrum: Lanczos breaks down after 2 steps; the padded 8 nodes carry no mass.
    lam = np.r_[np.ones(30), 3 * np.ones(10)]
    with jax.enable_x64(True):
        a, _ = matrix_with_spectrum(lam, seed=1)
        aj = jnp.asarray(a)
        sd = hs.spectral_density(lambda v: aj @ v, jax.random.key(1), num_probes=16,
                                 num_steps=10, grid=jnp.array([1.0, 3.0]), sigma=0.01,
                                 like=jnp.zeros(40))
        w = np.asarray(sd.weights)
        assert np.all(np.sum(w > 1e-12, axis=1) <= 2)
        mass_at_3 = np.mean(np.sum(np.where(np.abs(np.asarray(sd.nodes) - 3) < 1e-8, w, 0), 1))
        assert abs(mass_at_3 - 0.25) < 0.1


def test_hutchinson_trace_is_unbiased_and_exact_for_diagonal_operators():
    d = jnp.arange(1.0, 21.0)
    est, err = hs.hutchinson_trace(lambda v: d * v, jax.random.key(0), num_probes=8,
                                   like=jnp.zeros(20))
    # Rademacher probes: z^T D z = tr D exactly for diagonal D.
    np.testing.assert_allclose(float(est), float(d.sum()), rtol=1e-6)
    assert float(err) < 1e-4
    with jax.enable_x64(True):
        a, _ = matrix_with_spectrum(np.linspace(0, 2, 50), seed=2)
        aj = jnp.asarray(a)
        est, err = hs.hutchinson_trace(lambda v: aj @ v, jax.random.key(1), num_probes=400,
                                       like=jnp.zeros(50))
        assert abs(float(est) - 50.0) < 4 * float(err) + 1e-9


def test_spectral_density_uses_the_operator_template_and_validates_input():
    loss = lambda w, batch: 0.5 * jnp.mean((batch["x"] @ w) ** 2)  # noqa: E731
    x = jnp.asarray(np.random.default_rng(0).normal(size=(50, 6)), jnp.float32)
    op = hs.dataset_hvp(loss, jnp.zeros(6), {"x": x}, batch_size=16)
    sd = hs.spectral_density(op, jax.random.key(0), num_probes=4, num_steps=6,
                             grid=jnp.linspace(0, 5, 50), sigma=0.1)
    want = np.linalg.eigvalsh(np.asarray(x.T @ x) / 50)
    np.testing.assert_allclose(np.sort(np.asarray(sd.nodes[0])), want, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="`like`"):
        hs.spectral_density(lambda v: v, jax.random.key(0), num_probes=2, num_steps=2,
                            grid=jnp.ones(3), sigma=0.1)
    with pytest.raises(ValueError, match="`sigma`"):
        hs.spectral_density(op, jax.random.key(0), num_probes=2, num_steps=2,
                            grid=jnp.ones(3), sigma=0.0)
    with pytest.raises(ValueError, match="`num_steps`"):
        hs.spectral_density(op, jax.random.key(0), num_probes=2, num_steps=7,
                            grid=jnp.ones(3), sigma=0.1)


def test_dense_float64_in_blocks_equals_the_dense_hessian():
    from hessian_subspace.analysis import spectra

    rng = np.random.default_rng(3)
    data = {"x": jnp.asarray(rng.normal(size=(40, 6))), "y": jnp.asarray(rng.normal(size=40))}
    params = {"w": jnp.asarray(rng.normal(size=(6, 5))), "v": jnp.asarray(rng.normal(size=5))}

    def loss(p, b):
        return jnp.mean((jnp.tanh(b["x"] @ p["w"]) @ p["v"] - b["y"]) ** 2)

    with jax.enable_x64(True):
        params64 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params)
        data64 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), data)
        flat, unravel = jax.flatten_util.ravel_pytree(params64)
        ref = np.asarray(jax.hessian(lambda f: loss(unravel(f), data64))(flat))
        op = hs.dataset_hvp(loss, params64, data64, batch_size=16)
        for block in (1, 7, 35, 64):  # 35 parameters: ragged, exact and oversized blocks
            h = spectra.dense_float64(op, op.like, block_size=block)
            np.testing.assert_allclose(h, ref, rtol=1e-10, atol=1e-12)
            assert np.array_equal(h, h.T)
        np.testing.assert_allclose(np.linalg.eigvalsh(h), np.linalg.eigvalsh(ref), atol=1e-11)
