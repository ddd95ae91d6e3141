"""top_eigenpairs' residual check from the Arnoldi relation plus one confirming product
(``verify="relation"``, the default) against the k explicit products (``verify="explicit"``):
the same residuals to rounding and the same ``converged`` flags, on spectra that make it hard
(a tight cluster, a near-degenerate MLP Hessian, thick restarts, blocks), and operators that
break the relation (not linear, not symmetric) refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hessian_subspace as hs

from _helpers import loss_of, matrix_with_spectrum, mlp


def _both(matvec, v0, k, **kw):
    rel = hs.top_eigenpairs(matvec, v0, k, verify="relation", **kw)
    exp = hs.top_eigenpairs(matvec, v0, k, verify="explicit", **kw)
    return rel, exp


def _relative(res):
    lam = np.asarray(res.eigenvalues, np.float64)
    norm = np.max(np.abs(lam))
    eps = np.finfo(np.asarray(res.eigenvalues).dtype).eps
    return np.asarray(res.residuals, np.float64) / np.maximum(np.abs(lam), np.sqrt(eps) * norm)


def _check_same(rel, exp, tol, norm, eps, k):
    # The Krylov part is the same program: identical Ritz values and vectors.
    np.testing.assert_array_equal(np.asarray(rel.eigenvalues), np.asarray(exp.eigenvalues))
    assert int(exp.num_matvecs) - int(rel.num_matvecs) == k - 1
    # The two residuals differ by rounding of the relation, O(eps ||H||) per pair.
    diff = np.abs(np.asarray(rel.residuals, np.float64) - np.asarray(exp.residuals, np.float64))
    assert np.all(diff <= 50 * eps * norm), (diff, eps * norm)
    # Same verdict, except for a pair whose residual sits within that rounding of the threshold.
    differ = np.asarray(rel.converged) != np.asarray(exp.converged)
    at_edge = np.abs(_relative(exp) - tol) <= 0.01 * tol
    assert np.all(~differ | at_edge), (rel.converged, exp.converged, _relative(exp))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tight_cluster_same_residuals_and_converged_at_every_depth(dtype):
    n, k = 120, 6
    # Four eigenvalues within 1e-5 of each other at the top, then a slowly decaying bulk.
    lam = np.concatenate([10.0 - 1e-5 * np.arange(4), 6.0 * 0.97 ** np.arange(n - 4)])
    a, _ = matrix_with_spectrum(lam, seed=3)
    with jax.enable_x64(dtype == np.float64):
        a = jnp.asarray(a, dtype)
        v0 = jnp.asarray(np.random.default_rng(0).normal(size=n), dtype)
        tol = float(hs.krylov.default_tol(dtype))
        eps = float(np.finfo(dtype).eps)
        verdicts = []
        for steps in (8, 14, 20, 30, 45, 70):
            rel, exp = _both(lambda v: a @ v, v0, k, num_steps=steps, tol=tol, check_every=1000)
            _check_same(rel, exp, tol, 10.0, eps, k)
            verdicts.append(bool(np.all(exp.converged)))
        assert not verdicts[0] and verdicts[-1]  # the sweep crosses from unconverged to converged


@pytest.mark.parametrize("block_size", [1, 3])
def test_near_degenerate_mlp_hessian_and_thick_restart(block_size):
    # An MLP at initialisation: a few outliers, then a bulk of near-zero (near-degenerate)
    # eigenvalues that k = 12 reaches into.
    params, outputs = mlp((12, 16, 3), seed=1)
    rng = np.random.default_rng(0)
    data = {"x": jnp.asarray(rng.normal(size=(64, 12)), jnp.float32),
            "y": jnp.asarray(rng.integers(0, 3, size=64))}
    op = hs.dataset_hvp(loss_of(outputs), params, data, batch_size=64)
    norm = float(hs.top_eigenpairs(op, hs.random_start_vector(jax.random.key(1), params), 1,
                                   num_steps=60).eigenvalues[0])
    eps = float(np.finfo(np.float32).eps)
    v0 = hs.random_start_vector(jax.random.key(0), params)
    for kw in (dict(num_steps=24), dict(num_steps=96), dict(max_basis=30, num_steps=300)):
        rel, exp = _both(op, v0, 12, block_size=block_size, tol=1e-3, **kw)
        _check_same(rel, exp, 1e-3, norm, eps, 12)


def test_relation_residuals_are_the_true_residuals_of_returned_vectors_float64():
    n, k = 80, 5
    a, _ = matrix_with_spectrum(np.linspace(1.0, 20.0, n) ** 2, seed=5)
    with jax.enable_x64(True):
        v0 = jnp.asarray(np.random.default_rng(2).normal(size=n))
        res = hs.top_eigenpairs(lambda v: jnp.asarray(a) @ v, v0, k, num_steps=18,
                                check_every=1000)
        v = np.asarray(res.eigenvectors)
        true = np.linalg.norm(v @ a - np.asarray(res.eigenvalues)[:, None] * v, axis=1)
    # Not converged at this depth: residuals well above rounding, and the relation's agree.
    assert np.all(true > 1e-3)
    np.testing.assert_allclose(np.asarray(res.residuals), true, rtol=1e-8)


def test_operators_that_break_the_relation_are_not_converged():
    n, k = 60, 4
    a, _ = matrix_with_spectrum(np.linspace(0.1, 5.0, n), seed=7)
    a = jnp.asarray(a, jnp.float32)
    v0 = jnp.asarray(np.random.default_rng(1).normal(size=n), jnp.float32)
    good = hs.top_eigenpairs(lambda v: a @ v, v0, k, num_steps=n)
    assert bool(np.all(good.converged))

    # Not linear: an elementwise square, which the basis products cannot show in the product
    # of a combination of them.
    def nonlinear(v):
        return a @ v + 0.5 * np.sqrt(n) * v * v

    for verify in ("relation", "explicit"):
        res = hs.top_eigenpairs(nonlinear, v0, k, num_steps=n, verify=verify)
        assert not bool(np.any(res.converged)), verify
    # Not symmetric: the Arnoldi relation no longer matches the symmetrised projection.
    skew = jnp.asarray(np.triu(np.random.default_rng(3).normal(size=(n, n)), 1), jnp.float32)
    res = hs.top_eigenpairs(lambda v: a @ v + 0.05 * (skew @ v), v0, k, num_steps=n)
    assert not bool(np.any(res.converged))


def test_verify_argument_is_checked():
    with pytest.raises(ValueError, match="verify"):
        hs.top_eigenpairs(lambda v: v, jnp.ones(5), 2, verify="none")
