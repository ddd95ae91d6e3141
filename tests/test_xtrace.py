"""XTrace and XDiag (exchangeable trace and diagonal estimators) against a direct float64
implementation of their definition (an explicit QR of the sketch without each probe), exact on
low-rank matrices, unbiased with a calibrated standard error under repetition, and against
Hutchinson at equal products."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hessian_subspace as hs

from _helpers import matrix_with_spectrum
from test_estimators import _outlier_matrix, _repeat, mlp_problem_float64


def _by_definition(a, omega):
    """Every leave-one-out estimate t_i and d_i, from Q_(i) = orth(A Ω_{-i}) computed anew."""
    s, p = omega.shape
    y = omega @ a
    ts, ds = [], []
    for i in range(s):
        qi, _ = np.linalg.qr(np.delete(y, i, 0).T)
        proj = np.eye(p) - qi @ qi.T
        w = omega[i]
        ts.append(np.trace(qi.T @ a @ qi) + w @ proj @ a @ proj @ w)
        ds.append(np.diag(qi @ qi.T @ a) + w * (proj @ a @ w))
    return np.array(ts), np.array(ds)


@pytest.mark.parametrize("deflated", [False, True])
def test_xtrace_and_xdiag_equal_their_definition_float64(deflated):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        p, m = 60, 12
        lam = np.concatenate([np.linspace(50, 20, 5), rng.uniform(-1, 1, p - 5)])
        a, q = matrix_with_spectrum(lam, seed=0)
        key = jax.random.key(3)
        deflate = None
        rest = a
        if deflated:  # any pairs: two true eigenvectors with perturbed values.
            values, vectors = lam[:2] * 0.9, q[:, :2].T
            deflate = (jnp.asarray(values), jnp.asarray(vectors))
            rest = a - (vectors.T * values) @ vectors
        mv = lambda v: jnp.asarray(a) @ v  # noqa: E731
        est = hs.xtrace(mv, key, num_matvecs=m, like=jnp.zeros(p), deflate=deflate)
        d = hs.xdiag(mv, key, num_matvecs=m, like=jnp.zeros(p), deflate=deflate)
        # The same Rademacher probes the estimators draw.
        omega = np.asarray(jax.vmap(lambda k: jax.random.rademacher(k, (p,), jnp.float64))(
            jax.random.split(key, m // 2)))
        ts, ds = _by_definition(rest, omega)
        exact = np.trace(a - rest)
        np.testing.assert_allclose(float(est.estimate), exact + ts.mean(), rtol=1e-10)
        np.testing.assert_allclose(float(est.standard_error), ts.std(ddof=1) / np.sqrt(m // 2),
                                   rtol=1e-8)
        np.testing.assert_allclose(np.asarray(d.diagonal), np.diag(a - rest) + ds.mean(0),
                                   atol=1e-10)
        np.testing.assert_allclose(np.asarray(d.standard_error),
                                   ds.std(0, ddof=1) / np.sqrt(m // 2), atol=1e-10)
        # XDiag's trace is XTrace's from the same products.
        np.testing.assert_allclose(float(d.trace), float(est.estimate), rtol=1e-12)
        np.testing.assert_allclose(float(d.trace_standard_error), float(est.standard_error),
                                   rtol=1e-12)


def test_exact_on_a_matrix_of_rank_below_the_sketch():
    # Rank 4 with 6 sketch vectors: every leave-one-out sketch spans the range.
    lam = np.concatenate([[9.0, 7.0, -3.0, 2.0], np.zeros(46)])
    a, _ = matrix_with_spectrum(lam, seed=4)
    a32 = jnp.asarray(a, jnp.float32)
    est = hs.xtrace(lambda v: a32 @ v, jax.random.key(0), num_matvecs=12, like=jnp.zeros(50))
    assert abs(float(est.estimate) - 15.0) < 1e-4 * 21  # float32 round-off of ||A|| sums
    assert float(est.standard_error) < 1e-4 * 21
    d = hs.xdiag(lambda v: a32 @ v, jax.random.key(0), num_matvecs=12, like=jnp.zeros(50))
    np.testing.assert_allclose(np.asarray(d.diagonal), np.diag(a), atol=1e-4 * 21)


def test_xtrace_is_unbiased_its_error_calibrated_and_far_below_hutchinson():
    a, _, _ = _outlier_matrix()  # 5 outliers over a bulk, p = 200
    a32 = jnp.asarray(a, jnp.float32)
    mv = lambda v: a32 @ v  # noqa: E731
    reps = 200
    x = _repeat(lambda k: hs.xtrace(mv, k, num_matvecs=20, like=jnp.zeros(200)), reps)
    h = _repeat(lambda k: hs.hutchinson_trace(mv, k, num_probes=20, like=jnp.zeros(200)), reps)
    spread = float(np.std(x.estimate, ddof=1))
    stated = float(np.sqrt(np.mean(x.standard_error**2)))
    assert 0.7 < spread / stated < 1.4, (spread, stated)  # measured 1.00
    assert abs(np.mean(x.estimate) - np.trace(a)) < 4 * spread / np.sqrt(reps)
    # Equal products: the sketch takes the outliers out of every probe (measured ÷ 13.8).
    assert np.std(h.estimate, ddof=1) / spread > 5


def test_xdiag_is_unbiased_per_entry_with_calibrated_errors():
    a, _, _ = _outlier_matrix(p=120, k=4, seed=1)
    a32 = jnp.asarray(a, jnp.float32)
    mv = lambda v: a32 @ v  # noqa: E731
    reps = 60
    x = _repeat(lambda k: hs.xdiag(mv, k, num_matvecs=20, like=jnp.zeros(120)), reps)
    h = _repeat(lambda k: hs.hutchinson_diagonal(mv, k, num_probes=20, like=jnp.zeros(120)),
                reps)
    spread = np.std(x.diagonal, axis=0, ddof=1)
    stated = np.sqrt(np.mean(x.standard_error**2, axis=0))
    assert 0.7 < np.median(spread / stated) < 1.4, np.median(spread / stated)
    z = (np.mean(x.diagonal, axis=0) - np.diag(a)) / (spread / np.sqrt(reps))
    assert np.mean(z**2) < 1.5
    rmse_x = np.sqrt(np.mean((x.diagonal - np.diag(a)) ** 2, axis=0))
    rmse_h = np.sqrt(np.mean((h.diagonal - np.diag(a)) ** 2, axis=0))
    assert np.median(rmse_h / rmse_x) > 3


def test_on_a_network_hessian_float64():
    with jax.enable_x64(True):
        _, op, h = mlp_problem_float64()
        tr = hs.xtrace(op, jax.random.key(1), num_matvecs=60)
        assert abs(float(tr.estimate) - np.trace(h)) < 4 * float(tr.standard_error)
        d = hs.xdiag(op, jax.random.key(2), num_matvecs=60)
        flat = np.asarray(jax.flatten_util.ravel_pytree(d.diagonal)[0])
        se = np.asarray(jax.flatten_util.ravel_pytree(d.standard_error)[0])
        z = (flat - np.diag(h)) / np.maximum(se, 1e-12)
        assert np.mean(z**2) < 3.0


def test_bad_arguments_are_refused_before_any_product():
    calls = []

    def mv(v):
        calls.append(1)
        return v

    like = jnp.zeros(10)
    for bad, word in ((5, "even"), (2, "num_matvecs"), (22, "dimension"), (4.0, "num_matvecs")):
        with pytest.raises((ValueError, TypeError), match=word):
            hs.xtrace(mv, jax.random.key(0), num_matvecs=bad, like=like)
    with pytest.raises(ValueError, match="deflate"):
        hs.xdiag(mv, jax.random.key(0), num_matvecs=4, like=like, deflate="top")
    with pytest.raises((ValueError, TypeError), match="probe_batch"):
        hs.xtrace(mv, jax.random.key(0), num_matvecs=4, like=like, probe_batch=0)
    with pytest.raises((ValueError, TypeError), match="key"):
        hs.xtrace(mv, 0, num_matvecs=4, like=like)
    with pytest.raises((ValueError, TypeError), match="like"):
        hs.xtrace(mv, jax.random.key(0), num_matvecs=4, like=jnp.zeros(10, jnp.int32))
    assert not calls

    nan = lambda v: v * jnp.nan  # noqa: E731
    with pytest.raises(FloatingPointError):
        hs.xtrace(nan, jax.random.key(0), num_matvecs=4, like=like)
    with pytest.raises(FloatingPointError):
        hs.xdiag(nan, jax.random.key(0), num_matvecs=4, like=like)


def test_a_bfloat16_operator_is_estimated_in_float32():
    values = np.array([3.0, 2.0, 1.0] + [0.0] * 13)
    a = jnp.diag(jnp.asarray(values)).astype(jnp.bfloat16)
    like = jnp.zeros(16, jnp.bfloat16)
    est = hs.xtrace(lambda v: a @ v, jax.random.key(0), num_matvecs=12, like=like)
    assert est.estimate.dtype == jnp.float32
    assert abs(float(est.estimate) - 6.0) < 0.05  # s = 6 > rank 3: exact to bfloat16 products
    d = hs.xdiag(lambda v: a @ v, jax.random.key(0), num_matvecs=12, like=like)
    np.testing.assert_allclose(np.asarray(d.diagonal, np.float32), values, atol=0.05)
