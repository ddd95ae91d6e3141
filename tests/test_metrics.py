"""The paper's metrics against direct numpy formulas; invariances of the subspace overlap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import hessian_subspace as hs
from hessian_subspace import metrics


def _orthonormal_rows(k, p, seed):
    return np.linalg.qr(np.random.default_rng(seed).normal(size=(p, k)))[0].T


def test_gradient_fraction_and_overlaps_match_numpy():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        v = _orthonormal_rows(4, 30, 1)
        g = rng.normal(size=30)
        c2 = (v @ g) ** 2 / (g @ g)
        np.testing.assert_allclose(hs.eigenvector_overlaps(g, v), c2, rtol=1e-13)
        proj = v.T @ (v @ g)
        np.testing.assert_allclose(hs.gradient_fraction(g, v), proj @ proj / (g @ g), rtol=1e-13)
        # Over a complete orthonormal basis the c_i^2 sum to one.
        full = _orthonormal_rows(30, 30, 2)
        np.testing.assert_allclose(float(jnp.sum(hs.eigenvector_overlaps(g, full))), 1.0,
                                   rtol=1e-13)
        a = rng.normal(size=(30, 30))
        h = a + a.T
        want = g @ h @ g / (np.linalg.norm(g) * np.linalg.norm(h @ g))
        np.testing.assert_allclose(hs.hessian_gradient_overlap(g, h @ g), want, rtol=1e-13)


def test_metrics_accept_pytrees_and_stacked_pytree_bases():
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        like = {"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)}
        v = _orthonormal_rows(3, 10, 4)
        g = rng.normal(size=10)
        g_tree = hs.as_pytrees(g[None], like)
        g_tree = jax.tree_util.tree_map(lambda x: x[0], g_tree)
        v_tree = hs.as_pytrees(jnp.asarray(v), like)
        np.testing.assert_allclose(hs.gradient_fraction(g_tree, v_tree),
                                   hs.gradient_fraction(g, v), rtol=1e-13)
        np.testing.assert_allclose(hs.subspace_overlap(v_tree, v), 1.0, rtol=1e-13)


def test_subspace_overlap_identities_and_invariance():
    with jax.enable_x64(True):
        a = _orthonormal_rows(5, 40, 5)
        np.testing.assert_allclose(hs.subspace_overlap(a, a), 1.0, rtol=1e-13)
        # A rotated, reordered, sign-flipped basis of the same subspace.
        rot = np.linalg.qr(np.random.default_rng(6).normal(size=(5, 5)))[0]
        b = (rot @ a)[::-1] * np.array([1, -1, 1, -1, -1])[:, None]
        np.testing.assert_allclose(hs.subspace_overlap(a, b), 1.0, rtol=1e-13)
        # Orthogonal subspaces.
        q = _orthonormal_rows(10, 40, 7)
        np.testing.assert_allclose(hs.subspace_overlap(q[:5], q[5:]), 0.0, atol=1e-14)
        # Tr(P_a P_b) / sqrt(k_a k_b) from dense projectors, with k_a != k_b.
        c = _orthonormal_rows(3, 40, 8)
        want = np.trace((a.T @ a) @ (c.T @ c)) / np.sqrt(5 * 3)
        np.testing.assert_allclose(hs.subspace_overlap(a, c), want, rtol=1e-12)
        # eq. 5's second form: (1/k) sum_i ||P_a v_i||^2 over the rows v_i of b (k_a = k_b).
        d = _orthonormal_rows(5, 40, 9)
        want = np.mean([np.sum((a @ d[i]) ** 2) for i in range(5)])
        np.testing.assert_allclose(hs.subspace_overlap(a, d), want, rtol=1e-12)


@pytest.mark.parametrize("ka,kb", [(4, 4), (6, 3), (2, 5)])
def test_principal_angles_match_scipy(ka, kb):
    with jax.enable_x64(True):
        a, b = _orthonormal_rows(ka, 25, 10), _orthonormal_rows(kb, 25, 11)
        want = np.sort(scipy.linalg.subspace_angles(a.T, b.T))
        np.testing.assert_allclose(hs.principal_angles(a, b), want, rtol=1e-10, atol=1e-12)


def test_principal_angles_keep_small_angles_accurate():
    with jax.enable_x64(True):
        q = _orthonormal_rows(4, 20, 12)
        angle = 1e-9
        b = q[:2].copy()
        b[0] = np.cos(angle) * q[0] + np.sin(angle) * q[2]
        got = np.asarray(hs.principal_angles(q[:2], b))
        np.testing.assert_allclose(got, [0.0, angle], rtol=1e-6, atol=1e-15)


def test_random_vertex_overlap_formula():
    lam = np.arange(1.0, 11.0)
    want = lam.sum() / np.sqrt(10 * np.sum(lam**2))
    np.testing.assert_allclose(metrics.random_vertex_overlap(jnp.asarray(lam)), want, rtol=1e-6)


def test_metrics_jit():
    g = jnp.ones(6)
    v = jnp.eye(6)[:2]
    out = jax.jit(hs.gradient_fraction)(g, v)
    np.testing.assert_allclose(out, 2 / 6, rtol=1e-6)
