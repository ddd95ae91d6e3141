"""Trace, diagonal and density estimators, plain and deflated by the top eigenpairs, against
dense float64 references; their stated standard errors checked by repetition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hessian_subspace as hs

from _helpers import loss_of, matrix_with_spectrum, mlp


def _outlier_matrix(p=200, k=5, seed=0):
    # k outliers far above a bulk: the top part carries most of the off-diagonal mass.
    rng = np.random.default_rng(seed)
    lam = np.concatenate([np.linspace(100.0, 60.0, k), rng.uniform(-0.5, 1.5, p - k)])
    a, q = matrix_with_spectrum(lam, seed=seed)
    return a, lam, q[:, :k].T  # rows: the top-k eigenvectors


def _repeat(fn, reps):
    keys = jax.random.split(jax.random.key(42), reps)
    out = [fn(k) for k in keys]
    return jax.tree_util.tree_map(lambda *x: np.stack([np.asarray(v) for v in x]), *out)


@pytest.mark.parametrize("deflated", [False, True])
def test_trace_is_unbiased_and_its_standard_error_holds_under_repetition(deflated):
    a, lam, top = _outlier_matrix()
    a32 = jnp.asarray(a, jnp.float32)
    deflate = (lam[:5], top) if deflated else None
    reps = 300
    mv = lambda v: a32 @ v  # noqa: E731  (one function: compiled once for every repetition)
    est = _repeat(lambda key: hs.hutchinson_trace(mv, key, num_probes=10,
                                                   like=jnp.zeros(200), deflate=deflate), reps)
    true = float(np.trace(a))
    spread = float(np.std(est.estimate, ddof=1))
    stated = float(np.sqrt(np.mean(est.standard_error**2)))
    assert 0.8 < spread / stated < 1.25, (spread, stated)
    # Unbiased: the mean of 300 estimates within 4 of its standard errors of the truth.
    assert abs(np.mean(est.estimate) - true) < 4 * spread / np.sqrt(reps)


def test_deflation_divides_the_trace_error_on_an_outlier_dominated_spectrum():
    a, lam, top = _outlier_matrix()
    a32 = jnp.asarray(a, jnp.float32)
    # Plain Hutchinson gets the deflated run's probes plus 50 more (an eigensolve's worth).
    plain = hs.hutchinson_trace(lambda v: a32 @ v, jax.random.key(0), num_probes=60,
                                like=jnp.zeros(200))
    deflated = hs.hutchinson_trace(lambda v: a32 @ v, jax.random.key(0), num_probes=10,
                                   like=jnp.zeros(200), deflate=(lam[:5], top))
    assert float(plain.standard_error) / float(deflated.standard_error) > 5
    assert abs(float(deflated.estimate) - np.trace(a)) < 4 * float(deflated.standard_error)


@pytest.mark.parametrize("deflated", [False, True])
def test_diagonal_against_dense_with_per_entry_standard_errors(deflated):
    a, lam, top = _outlier_matrix(p=120, k=4, seed=1)
    a32 = jnp.asarray(a, jnp.float32)
    deflate = (lam[:4], top) if deflated else None
    mv = lambda v: a32 @ v  # noqa: E731
    est = _repeat(lambda key: hs.hutchinson_diagonal(
        mv, key, num_probes=30, like=jnp.zeros(120), deflate=deflate,
        probe_batch=7), 60)
    true = np.diag(a)
    spread = np.std(est.diagonal, axis=0, ddof=1)  # per entry, over repetitions
    stated = np.sqrt(np.mean(est.standard_error**2, axis=0))
    ratio = np.median(spread / stated)
    assert 0.85 < ratio < 1.15, ratio
    z = (np.mean(est.diagonal, axis=0) - true) / (spread / np.sqrt(60))
    assert np.mean(z**2) < 1.5  # unbiased: z-scores of the mean are standard
    # The trace from the same probes is the diagonal's sum.
    np.testing.assert_allclose(est.trace, est.diagonal.sum(axis=1), rtol=1e-5)


def test_deflated_diagonal_has_smaller_errors_and_batching_does_not_change_the_probes():
    a, lam, top = _outlier_matrix(p=120, k=4, seed=1)
    a32 = jnp.asarray(a, jnp.float32)
    mv = lambda v: a32 @ v  # noqa: E731
    plain = hs.hutchinson_diagonal(mv, jax.random.key(3), num_probes=40, like=jnp.zeros(120))
    defl = hs.hutchinson_diagonal(mv, jax.random.key(3), num_probes=40, like=jnp.zeros(120),
                                  deflate=(lam[:4], top))
    assert np.median(np.asarray(plain.standard_error) / np.asarray(defl.standard_error)) > 3
    for batch in (1, 6, 40):
        again = hs.hutchinson_diagonal(mv, jax.random.key(3), num_probes=40,
                                       like=jnp.zeros(120), deflate=(lam[:4], top),
                                       probe_batch=batch)
        np.testing.assert_allclose(again.diagonal, defl.diagonal, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(again.standard_error, defl.standard_error, rtol=1e-3)


def mlp_problem_float64():
    """A small MLP's data-set Hessian operator in float64 and its dense matrix (call inside
    ``jax.enable_x64``): ``(params, op, h)``."""
    params, outputs = mlp((10, 12, 3), seed=2)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params)
    rng = np.random.default_rng(0)
    data = {"x": jnp.asarray(rng.normal(size=(80, 10))), "y": jnp.asarray(
        rng.integers(0, 3, size=80))}
    loss = loss_of(outputs)
    h = np.asarray(hs.dense_hessian(loss, params, data))
    return params, hs.dataset_hvp(loss, params, data, batch_size=80), h


def test_mlp_hessian_trace_and_diagonal_with_eigensolver_pairs_float64():
    with jax.enable_x64(True):
        params, op, h = mlp_problem_float64()
        eig = hs.top_eigenpairs(op, hs.random_start_vector(jax.random.key(0), params), 4,
                                tol=1e-8, num_steps=100)
        assert bool(np.all(eig.converged))
        tr = hs.hutchinson_trace(op, jax.random.key(1), num_probes=200, deflate=eig)
        assert abs(float(tr.estimate) - np.trace(h)) < 4 * float(tr.standard_error)
        d = hs.hutchinson_diagonal(op, jax.random.key(2), num_probes=200, deflate=eig)
        flat = jax.flatten_util.ravel_pytree(d.diagonal)[0]
        se = jax.flatten_util.ravel_pytree(d.standard_error)[0]
        z = (np.asarray(flat) - np.diag(h)) / np.maximum(np.asarray(se), 1e-12)
        assert np.mean(z**2) < 2.0 and np.max(np.abs(z)) < 6


def test_deflated_density_places_the_outliers_exactly_and_the_bulk_in_the_complement():
    a, lam, top = _outlier_matrix(p=150, k=5, seed=2)
    a32 = jnp.asarray(a, jnp.float32)
    mv = lambda v: a32 @ v  # noqa: E731
    eig = hs.top_eigenpairs(mv, jnp.ones(150), 5, num_steps=60)
    assert bool(np.all(eig.converged))
    grid = jnp.linspace(-2.0, 105.0, 400)
    sd = hs.spectral_density(mv, jax.random.key(0), num_probes=6, num_steps=30, grid=grid,
                             sigma=0.3, like=jnp.zeros(150), deflate=eig)
    nodes, weights = np.asarray(sd.nodes), np.asarray(sd.weights)
    assert nodes.shape == (6, 35)
    np.testing.assert_array_equal(nodes[:, 30:], np.broadcast_to(eig.eigenvalues, (6, 5)))
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(weights[:, 30:], 1 / 150)
    # The complement's nodes stay in the bulk: no ghost of an outlier.
    bulk = nodes[:, :30][weights[:, :30] > 1e-6]
    assert bulk.max() < lam[5:].max() + 0.05 and bulk.min() > lam[5:].min() - 0.05
    # Mass above the bulk edge is exactly k/p (plain SLQ only approximates it).
    above = np.sum(np.where(nodes > 5.0, weights, 0.0), axis=1)
    np.testing.assert_allclose(above, 5 / 150, rtol=1e-5)
    plain = hs.slq_quadrature(mv, jax.random.key(0), num_probes=6, num_steps=30,
                              like=jnp.zeros(150))
    plain_above = np.sum(np.where(plain.nodes > 5.0, plain.weights, 0.0), axis=1)
    assert np.std(plain_above) > 1e-3  # per probe it varies; the deflated one does not


def test_deflate_argument_errors_name_it():
    mv = lambda v: 2.0 * v  # noqa: E731
    like = jnp.zeros(10)
    with pytest.raises(ValueError, match="deflate"):
        hs.hutchinson_trace(mv, jax.random.key(0), num_probes=4, like=like,
                            deflate=(jnp.ones(2), jnp.ones((2, 9))))
    with pytest.raises(ValueError, match="deflate"):
        hs.hutchinson_diagonal(mv, jax.random.key(0), num_probes=4, like=like, deflate="top")
    with pytest.raises(ValueError, match="deflate"):
        hs.hutchinson_trace(mv, jax.random.key(0), num_probes=4, like=like,
                            deflate=(jnp.array([1.0, jnp.nan]), jnp.eye(10)[:2]))
    with pytest.raises(ValueError, match="orthonormal"):
        hs.slq_quadrature(mv, jax.random.key(0), num_probes=2, num_steps=4, like=like,
                          deflate=(jnp.ones(2), jnp.ones((2, 10))))


def test_a_non_finite_product_is_reported_not_returned():
    def bad(v):
        return jnp.where(v[0] > 0, jnp.nan, 1.0) * v

    for fn in (hs.hutchinson_trace, hs.hutchinson_diagonal):
        with pytest.raises(FloatingPointError, match="non-finite"):
            fn(bad, jax.random.key(0), num_probes=8, like=jnp.zeros(6))
