"""The paper's metrics against direct numpy formulas; invariances of the subspace overlap."""

import re

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


# ---------------------------------------------------------------------------------------------
# Error bars from Ritz residuals: true bounds, and tight in an easy case.


def _ritz_pairs(h, basis, rayleigh_ritz):
    """Orthonormal vectors spanning `basis` (p, m), their values and residual norms, largest
    value first: Rayleigh-Ritz pairs, or (rayleigh_ritz=False) the vectors as they are with
    their Rayleigh quotients."""
    w = np.linalg.qr(basis)[0]
    if rayleigh_ritz:
        mu, s = np.linalg.eigh(w.T @ h @ w)
        w = w @ s
    mu = np.einsum("pi,pq,qi->i", w, h, w)
    order = np.argsort(-mu)
    w, mu = w[:, order], mu[order]
    return w.T, mu, np.linalg.norm(h @ w - w * mu, axis=0)


def _random_matrix(rng, p, lam=None):
    """Q diag(lam) Q^T with random Q; lam standard normal (indefinite) by default."""
    lam = rng.normal(size=p) if lam is None else np.asarray(lam, float)
    q = np.linalg.qr(rng.normal(size=(p, p)))[0]
    return (q * lam) @ q.T


def _perturbed_problem(rng, h, k, eps, rayleigh_ritz=True):
    """k + 1 computed pairs of h from its top k + 1 eigenvectors plus eps noise."""
    lam, q = np.linalg.eigh(h)
    lam, q = lam[::-1], q[:, ::-1]
    vecs, mu, res = _ritz_pairs(h, q[:, :k + 1] + eps * rng.normal(size=(h.shape[0], k + 1)),
                                rayleigh_ritz)
    # The bounds' assumption: lambda_{k+1} <= mu_{k+1} + rho (no top eigenvalue missed).
    rho = np.sqrt(np.sum(res**2))
    return dict(exact=q[:, :k].T, vecs=vecs, mu=mu, res=res, assumption=lam[k] <= mu[k] + rho)


def _projector_errors(vecs, exact):
    e = vecs.T @ vecs - exact.T @ exact
    sines = np.linalg.svd(vecs - (vecs @ exact.T) @ exact, compute_uv=False)
    return np.linalg.norm(e, 2), np.linalg.norm(e, "fro"), np.sum(sines), e


_error_bound = jax.jit(metrics.subspace_error_bound)


def _bound(prob, k):
    return _error_bound(prob["res"][:k], prob["mu"][:k], prob["mu"][k], prob["res"][k])


def _fraction(g, rows):  # f_top and eq. 5 in numpy (fast; the metrics are tested above)
    return np.sum((rows @ g) ** 2) / (g @ g)


def _overlap(a, b):
    return np.sum((a @ b.T) ** 2) / np.sqrt(a.shape[0] * b.shape[0])


def _close_to_or_below(value, bound):
    return value <= float(bound) * (1 + 1e-9) + 1e-13


_overlap_bound = jax.jit(metrics.subspace_overlap_bound)


def test_error_bounds_are_never_violated_on_random_matrices():
    # 200 random symmetric 25 x 25 matrices (a third with a tight cluster at the top), top-k
    # pairs from eigenvectors perturbed by 1e-5 .. 0.5, Rayleigh-Ritz or raw vectors. The
    # bounds hold whenever their assumption does (no top eigenvalue missed: it fails in a few
    # trials with the largest perturbations, whose bounds are inf anyway).
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        finite = checked = 0
        for trial in range(200):
            k, kb = (int(x) for x in rng.integers(1, 6, size=2))
            lam = None
            if trial % 3 == 0:
                lam = np.concatenate([5 + 0.01 * rng.normal(size=k), [4.9],
                                      rng.uniform(-1, 4.8, 24 - k)])
            h = _random_matrix(rng, 25, lam)
            a = _perturbed_problem(rng, h, k, 10 ** rng.uniform(-5, -0.3), trial % 2 == 0)
            hb = h + 0.3 * _random_matrix(rng, 25)  # eq. 5 against the top kb of a nearby H.
            b = _perturbed_problem(rng, hb, kb, 10 ** rng.uniform(-5, -0.3))
            if not (a["assumption"] and b["assumption"]):
                continue
            checked += 1
            bound = _bound(a, k)
            finite += bool(np.isfinite(bound.spectral))
            spectral, frob, sine_sum, e = _projector_errors(a["vecs"][:k], a["exact"])
            assert _close_to_or_below(spectral, bound.spectral)
            assert _close_to_or_below(frob, bound.frobenius)
            assert _close_to_or_below(sine_sum, bound.sine_sum)
            # f_top: random gradients and the worst one (top eigenvector of P^ - P).
            f_bound = bound.spectral  # gradient_fraction_bound (tested to be that below)
            for g in np.concatenate([rng.normal(size=(5, 25)), np.linalg.eigh(e)[1][:, -1:].T]):
                err = _fraction(g, a["vecs"][:k]) - _fraction(g, a["exact"])
                assert _close_to_or_below(abs(err), f_bound)
            err = _overlap(a["vecs"][:k], b["vecs"][:kb]) - _overlap(a["exact"], b["exact"])
            assert _close_to_or_below(abs(err), _overlap_bound(bound, _bound(b, kb)))
        assert checked >= 190 and finite >= 100


def test_error_bounds_are_tight_when_the_gap_is_clear():
    # Top 3 eigenvalues in [9, 10], the rest in [0.5, 1]; eigenvectors perturbed by 1e-4. Then
    # ||R||_F / delta overestimates ||sin Theta||_F by at most (10 - 0.5) / (9 - 1) ~ 1.2.
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        k = 3
        h = _random_matrix(rng, 30, np.concatenate([[10.0, 9.5, 9.0], rng.uniform(0.5, 1, 27)]))
        a = _perturbed_problem(rng, h, k, 1e-4)
        bound = _bound(a, k)
        spectral, frob, sine_sum, e = _projector_errors(a["vecs"][:k], a["exact"])
        assert 1.0 <= float(bound.frobenius) / frob <= 1.25
        assert 1.0 <= float(bound.spectral) / spectral <= 1.25 * np.sqrt(k)
        # f_top: the worst gradient attains ||P^ - P||_2.
        g = np.linalg.eigh(e)[1][:, -1]
        err = float(hs.gradient_fraction(g, a["vecs"][:k]) - hs.gradient_fraction(g, a["exact"]))
        f_bound = metrics.gradient_fraction_bound(a["res"][:k], a["mu"][:k], a["mu"][k],
                                                  a["res"][k])
        assert float(f_bound) == float(bound.spectral)
        assert 1.0 <= float(f_bound) / abs(err) <= 1.25 * np.sqrt(k)
        # eq. 5 against the exact subspace of the directions P^ rotated towards: first order.
        w, v = np.linalg.eigh(e)
        toward = v[:, w > 1e-12].T  # k directions, eigenvalues sin(theta_i)
        assert toward.shape[0] == k
        exact_b = metrics.subspace_error_bound(np.zeros(k), np.full(k, 2.0), 1.0, 0.0)
        err = float(hs.subspace_overlap(a["vecs"][:k], toward)
                    - hs.subspace_overlap(a["exact"], toward))
        ratio = float(metrics.subspace_overlap_bound(bound, exact_b)) / abs(err)
        assert 1.0 <= ratio <= 1.25 * np.sqrt(k)


def test_error_bounds_rest_on_no_missed_eigenvalue():
    # The documented assumption: an eigenvector orthogonal to everything Lanczos saw is
    # invisible to residuals. Here the computed top-1 is the exact 2nd eigenvector: zero
    # residuals, a zero bound, and the true error is total.
    with jax.enable_x64(True):
        bound = metrics.subspace_error_bound(np.zeros(1), np.array([2.0]), 1.0, 0.0)
        assert float(bound.spectral) == 0.0
        assert float(hs.subspace_overlap(np.eye(4)[1:2], np.eye(4)[:1])) == 0.0


def test_error_bounds_vectorised_over_leading_blocks_and_jit():
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        mu = np.sort(rng.normal(size=6))[::-1]
        res = 1e-3 * rng.uniform(size=6)
        many = jax.jit(metrics.subspace_error_bounds)(res, mu)
        assert many.spectral.shape == (5,)
        for d in range(1, 6):
            one = metrics.subspace_error_bound(res[:d], mu[:d], mu[d], res[d])
            for field in ("spectral", "frobenius", "sine_sum", "gap"):
                np.testing.assert_allclose(getattr(many, field)[d - 1], getattr(one, field),
                                           rtol=1e-14)
        # No positive gap: inf, never a negative or NaN bound.
        flat = metrics.subspace_error_bound(np.array([0.1]), np.array([1.0]), 1.0, 0.0)
        assert float(flat.spectral) == np.inf and float(flat.gap) < 0


# Issue 12, bad input: every shape mismatch in the metrics is a ValueError naming the argument,
# raised from static shapes (before any tracing, under jit too), not a dot_general traceback.
_P = 6
_G = np.arange(1.0, _P + 1)
_BASIS = np.eye(_P)[:2]
_BAD_METRIC_INPUTS = [
    ("gradient_fraction, basis of another p", hs.gradient_fraction, (_G, np.eye(5)[:2]),
     "`eigenvectors` has dimension p = 5 but `g` has p = 6"),
    ("gradient_fraction, 1-D basis", hs.gradient_fraction, (_G, _G), "x[None]"),
    ("gradient_fraction, transposed basis", hs.gradient_fraction, (_G, _BASIS.T), "`.T`"),
    ("eigenvector_overlaps, 3-D basis", hs.eigenvector_overlaps, (_G, _BASIS[None]),
     "`eigenvectors` must be a (k, p) array"),
    ("hessian_gradient_overlap, mismatched p", hs.hessian_gradient_overlap, (_G, _G[:5]),
     "`hg` has dimension p = 5"),
    ("subspace_overlap, mismatched p", hs.subspace_overlap, (_BASIS, np.eye(5)[:2]),
     "`basis_a` has dimension p = 6 but `basis_b` has p = 5"),
    ("subspace_overlap, 1-D basis", hs.subspace_overlap, (_G, _BASIS), "`basis_a` must be"),
    ("principal_angles, transposed", hs.principal_angles, (_BASIS, _BASIS.T), "`.T`"),
    ("nested_subspace_overlaps, mismatched p", hs.nested_subspace_overlaps,
     (_BASIS, np.eye(7)[:2]), "`basis_b` has p = 7"),
]


@pytest.mark.parametrize("case, fn, args, message", _BAD_METRIC_INPUTS,
                         ids=[c[0] for c in _BAD_METRIC_INPUTS])
def test_metric_shape_errors_name_the_argument(case, fn, args, message):
    del case
    with pytest.raises(ValueError, match=re.escape(message)):
        fn(*args)
    with pytest.raises(ValueError, match=re.escape(message)):  # the same under jit
        jax.jit(fn)(*(jnp.asarray(a) for a in args))
