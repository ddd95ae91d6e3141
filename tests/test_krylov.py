"""Lanczos and top-k eigenpairs against numpy eigh and matrices with known spectra."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import flatten_util

import hessian_subspace as hs
from hessian_subspace import krylov

from _helpers import (count_compilations, loss_of, matrix_with_spectrum, mlp, projector,
                      top_subspace)

RTOL64 = 1e-9  # relative eigenvalue accuracy asked of float64 solves


def _dense_op(a):
    a = jnp.asarray(a)
    return lambda v: a @ v


def _start(n, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=n))


# ---------------------------------------------------------------------------------------------
# lanczos


def test_lanczos_relation_and_orthonormal_basis_float64():
    with jax.enable_x64(True):
        a, _ = matrix_with_spectrum(np.linspace(-1.0, 3.0, 60))
        res = hs.lanczos(_dense_op(a), _start(60), 25)
        assert int(res.num_valid) == 25
        q = np.asarray(res.basis)
        t = np.asarray(krylov.tridiagonal_matrix(res))
        np.testing.assert_allclose(q @ q.T, np.eye(25), atol=1e-13)
        lhs = a @ q.T
        rhs = q.T @ t + np.outer(np.asarray(res.residual), np.eye(25)[-1])
        np.testing.assert_allclose(lhs, rhs, atol=1e-12)
        assert np.isclose(np.linalg.norm(res.residual), float(res.betas[-1]))


def test_lanczos_full_dimension_recovers_every_eigenvalue():
    with jax.enable_x64(True):
        lam = np.linspace(1.0, 2.0, 30) ** 2
        a, _ = matrix_with_spectrum(lam, seed=1)
        res = hs.lanczos(_dense_op(a), _start(30), 30)
        theta, valid = hs.ritz_values(res)
        assert bool(valid.all())
        np.testing.assert_allclose(np.sort(np.asarray(theta)), lam, rtol=RTOL64)


@pytest.mark.parametrize("spectrum,distinct", [
    (np.r_[np.ones(25), 2 * np.ones(25)], [1.0, 2.0]),  # two-valued: Krylov dimension 2
    (np.r_[3.0, 2.0, 1.0, np.zeros(47)], [0.0, 1.0, 2.0, 3.0]),  # rank 3 (+ the null space)
])
def test_lanczos_breakdown_stops_and_padding_gives_no_fake_eigenvalues(spectrum, distinct):
    with jax.enable_x64(True):
        a, _ = matrix_with_spectrum(spectrum, seed=2)
        res = hs.lanczos(_dense_op(a), _start(50), 20)
        assert int(res.num_valid) == len(distinct)
        theta, valid = hs.ritz_values(res)
        assert int(valid.sum()) == len(distinct)
        np.testing.assert_allclose(np.sort(np.asarray(theta)[np.asarray(valid)]), distinct,
                                   atol=1e-12)
        assert np.all(np.asarray(res.basis)[len(distinct):] == 0)


def test_lanczos_zero_matrix_breaks_down_at_once():
    res = hs.lanczos(lambda v: jnp.zeros_like(v), jnp.ones(10), 5)
    assert int(res.num_valid) == 1
    theta, valid = hs.ritz_values(res)
    assert int(valid.sum()) == 1 and float(theta[np.asarray(valid)][0]) == 0.0


def test_lanczos_is_vmappable_over_start_vectors():
    with jax.enable_x64(True):
        a, _ = matrix_with_spectrum(np.linspace(0, 1, 40), seed=3)
        v0s = jnp.asarray(np.random.default_rng(0).normal(size=(3, 40)))
        batched = jax.vmap(lambda v: hs.lanczos(_dense_op(a), v, 12))(v0s)
        for i in range(3):
            single = hs.lanczos(_dense_op(a), v0s[i], 12)
            np.testing.assert_allclose(batched.alphas[i], single.alphas, rtol=1e-12)
            np.testing.assert_allclose(batched.basis[i], single.basis, atol=1e-12)


def test_loop_program_size_does_not_grow_with_num_steps():
    a = jnp.asarray(matrix_with_spectrum(np.linspace(0, 1, 100))[0], jnp.float32)
    mv = _dense_op(a)

    def size(fn):
        return len(str(jax.make_jaxpr(fn)(jnp.ones(100))))

    short = size(lambda v: hs.lanczos(mv, v, 20))
    long = size(lambda v: hs.lanczos(mv, v, 80))
    assert abs(long - short) < 0.02 * short
    short = size(lambda v: hs.top_eigenpairs(mv, v, 4, num_steps=20))
    long = size(lambda v: hs.top_eigenpairs(mv, v, 4, num_steps=80))
    assert abs(long - short) < 0.02 * short


def test_ghost_eigenvalues_without_reorthogonalization_are_detected():
    # A well-separated top eigenvalue converges early; without reorthogonalisation the plain
    # recurrence then loses orthogonality and converges to it again (a ghost copy).
    with jax.enable_x64(True):
        lam = np.r_[10.0, 9.0, np.linspace(0.0, 1.0, 98)]
        a, _ = matrix_with_spectrum(lam, seed=4)
        v0 = _start(100)
        plain = hs.lanczos(_dense_op(a), v0, 80, reorthogonalize=0)
        theta, valid = hs.ritz_values(plain)
        theta = np.asarray(theta)[np.asarray(valid)]
        assert np.sum(np.abs(theta - 10.0) < 1e-8) >= 2  # a ghost of lambda = 10
        q = np.asarray(plain.basis)
        assert np.abs(q @ q.T - np.eye(80)).max() > 0.1  # orthogonality lost
        full = hs.lanczos(_dense_op(a), v0, 80)
        theta, valid = hs.ritz_values(full)
        assert np.sum(np.abs(np.asarray(theta)[np.asarray(valid)] - 10.0) < 1e-8) == 1

        ghosts = hs.top_eigenpairs(_dense_op(a), v0, 3, num_steps=80, reorthogonalize=0,
                                   check_every=100)
        assert not bool(ghosts.converged.all())  # the twin fails the orthogonality test
        good = hs.top_eigenpairs(_dense_op(a), v0, 3, num_steps=80, tol=1e-8)
        assert bool(good.converged.all())
        np.testing.assert_allclose(good.eigenvalues, np.sort(lam)[::-1][:3], rtol=RTOL64)


# ---------------------------------------------------------------------------------------------
# top_eigenpairs on matrices with known spectra


def _check_top(a, k, res, which="LA", rtol=RTOL64, proj_tol=1e-7):
    want_vals, want_vecs = top_subspace(a, k, which)
    got = np.asarray(res.eigenvalues)
    scale = np.max(np.abs(np.linalg.eigvalsh(a)))
    np.testing.assert_allclose(got, want_vals, rtol=rtol, atol=rtol * scale)
    # Subspaces through projectors: valid whatever the signs and the order within clusters.
    assert np.linalg.norm(projector(res.eigenvectors) - projector(want_vecs)) < proj_tol
    assert bool(np.all(res.converged))


KNOWN_SPECTRA = {
    # name: (eigenvalues, k, block_size, which); 150 x 150 matrices, 120 Krylov vectors.
    "cluster_of_k": (np.r_[np.full(6, 2.0), np.linspace(0.0, 1.0, 144)], 6, 6, "LA"),
    "cluster_of_k_minus_1": (np.r_[np.full(5, 2.0), 1.5, np.linspace(0.0, 1.0, 144)], 6, 6, "LA"),
    "two_valued": (np.r_[np.full(6, 1.0), np.zeros(144)], 6, 1, "LA"),
    "indefinite_LA": (np.r_[-5.0, np.linspace(-1.0, 3.0, 149) ** 3 / 9], 4, 1, "LA"),
    "indefinite_SA": (np.r_[-5.0, np.linspace(-1.0, 3.0, 149) ** 3 / 9], 4, 1, "SA"),
    "indefinite_LM": (np.r_[-5.0, np.linspace(-1.0, 3.0, 149) ** 3 / 9], 4, 1, "LM"),
}


@pytest.mark.parametrize("name", sorted(KNOWN_SPECTRA))
def test_top_eigenpairs_known_spectra_float64(name):
    lam, k, block, which = KNOWN_SPECTRA[name]
    with jax.enable_x64(True):
        a, _ = matrix_with_spectrum(lam, seed=5)
        res = hs.top_eigenpairs(_dense_op(a), _start(lam.size), k, which=which, tol=1e-9,
                                block_size=block, num_steps=120)
        _check_top(a, k, res, which)


def test_single_vector_lanczos_misses_copies_of_a_cluster_that_a_block_finds():
    # Documented limitation: one start vector sees one direction of an exactly repeated
    # eigenvalue; a block of k start vectors sees all k.
    lam = np.r_[np.full(6, 2.0), np.linspace(0.0, 1.0, 194)]
    with jax.enable_x64(True):
        a, _ = matrix_with_spectrum(lam, seed=6)
        single = hs.top_eigenpairs(_dense_op(a), _start(200), 6, num_steps=30, tol=1e-9)
        assert np.sum(np.abs(np.asarray(single.eigenvalues) - 2.0) < 1e-6) < 6
        block = hs.top_eigenpairs(_dense_op(a), _start(200), 6, num_steps=120, tol=1e-9,
                                  block_size=6)
        _check_top(a, 6, block)


def test_laplacian_1d_extremes():
    n = 60
    lap = 2 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)
    exact = 2 - 2 * np.cos(np.pi * np.arange(1, n + 1) / (n + 1))
    with jax.enable_x64(True):
        for which, want in (("LA", np.sort(exact)[::-1][:3]), ("SA", np.sort(exact)[:3])):
            res = hs.top_eigenpairs(_dense_op(lap), _start(n), 3, which=which, num_steps=n,
                                    tol=1e-9)
            np.testing.assert_allclose(res.eigenvalues, want, rtol=RTOL64)
            _check_top(lap, 3, res, which)


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_zero_and_identity_give_k_orthonormal_eigenpairs(scale):
    with jax.enable_x64(True):
        res = hs.top_eigenpairs(lambda v: scale * v, _start(30), 5, num_steps=12)
        np.testing.assert_allclose(res.eigenvalues, np.full(5, scale), atol=1e-14)
        v = np.asarray(res.eigenvectors)
        np.testing.assert_allclose(v @ v.T, np.eye(5), atol=1e-13)
        assert bool(res.converged.all())
        np.testing.assert_allclose(res.residuals, 0.0, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# top_eigenpairs on a real Hessian


@functools.lru_cache(maxsize=1)
def _mlp_dense_hessian():
    """float64 dense Hessian of `_mlp_hessian_problem` by `jax.hessian` (computed once)."""
    with jax.enable_x64(True):
        loss, params, data = _mlp_hessian_problem()
        return np.asarray(hs.dense_hessian(loss, params, data))


def _mlp_hessian_problem():
    # ~2k parameters: 20 -> 40 -> 20 -> 5.
    params, outputs = mlp((20, 40, 20, 5), activation="softplus")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 20))
    y = rng.integers(0, 5, 200)
    # float64 inside a `jax.enable_x64` scope, float32 outside.
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, dtype), params)
    data = {"x": jnp.asarray(x, dtype), "y": jnp.asarray(y)}
    return loss_of(outputs), params, data


def test_top_eigenpairs_of_mlp_hessian_match_dense_eigh_float64():
    with jax.enable_x64(True):
        loss, params, data = _mlp_hessian_problem()
        assert 1500 < hs.curvature._tree.tree_size(params) < 2500
        h = _mlp_dense_hessian()
        op = hs.dataset_hvp(loss, params, data, batch_size=64)
        v0 = hs.random_start_vector(jax.random.key(0), params)
        res = hs.top_eigenpairs(op, v0, 5, tol=1e-10, num_steps=400)
        _check_top(h, 5, res, proj_tol=1e-6)
        # Pytree operator and flat dense matrix give the same answer.
        flat = hs.top_eigenpairs(_dense_op(h), flatten_util.ravel_pytree(v0)[0], 5, tol=1e-10,
                                 num_steps=400)
        np.testing.assert_allclose(flat.eigenvalues, res.eigenvalues, rtol=RTOL64)
        # Eigenvectors back as pytrees, per layer.
        trees = hs.as_pytrees(res.eigenvectors, params)
        assert trees["dense_0"]["kernel"].shape == (5, 20, 40)
        first = flatten_util.ravel_pytree(jax.tree_util.tree_map(lambda x: x[0], trees))[0]
        np.testing.assert_allclose(first, res.eigenvectors[0], rtol=1e-15)


def test_float64_recurrence_over_float32_hessian_without_touching_global_config():
    loss, params32, data32 = _mlp_hessian_problem()
    op = hs.dataset_hvp(loss, params32, data32, batch_size=100)
    v0 = hs.random_start_vector(jax.random.key(0), params32)
    assert not jax.config.jax_enable_x64
    res = hs.top_eigenpairs(op, v0, 5, dtype=jnp.float64, num_steps=120, tol=1e-4)
    assert not jax.config.jax_enable_x64
    assert res.eigenvalues.dtype == np.float64 and res.eigenvectors.dtype == np.float64
    want, _ = top_subspace(_mlp_dense_hessian(), 5)
    # A float32 HVP limits accuracy to ~sqrt(eps32) in residual, ~eps32 * ||H|| in eigenvalue.
    np.testing.assert_allclose(np.asarray(res.eigenvalues), want, rtol=1e-4)
    assert bool(res.converged.all())


def test_top_eigenpairs_compiles_once_for_new_parameter_values():
    loss, params, data = _mlp_hessian_problem()
    v0 = hs.random_start_vector(jax.random.key(0), params)
    hs.top_eigenpairs(hs.dataset_hvp(loss, params, data, batch_size=50), v0, 3, num_steps=20)
    moved = jax.tree_util.tree_map(lambda p: p * 1.01, params)
    with count_compilations() as n:
        res = hs.top_eigenpairs(hs.dataset_hvp(loss, moved, data, batch_size=50), v0, 3,
                                num_steps=20)
        jax.block_until_ready(res)
    assert n[0] == 0


def test_top_eigenpairs_is_vmappable_over_start_vectors():
    a = jnp.asarray(matrix_with_spectrum(np.r_[5.0, 4.0, 3.0, np.linspace(0, 1, 37)])[0],
                    jnp.float32)
    v0s = jax.random.normal(jax.random.key(0), (3, 40))
    out = jax.vmap(lambda v: hs.top_eigenpairs(_dense_op(a), v, 3, num_steps=30))(v0s)
    np.testing.assert_allclose(out.eigenvalues, np.tile([5.0, 4.0, 3.0], (3, 1)), rtol=1e-4)
    assert bool(out.converged.all())


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_arguments_raise_value_errors_before_tracing():
    a = jnp.eye(10)
    mv = _dense_op(a)
    v0 = jnp.ones(10)
    cases = [
        (dict(k=0), "`k`"), (dict(k=10), "`k`"), (dict(k=3, num_steps=2), "`num_steps`"),
        (dict(k=3, num_steps=11), "`num_steps`"), (dict(k=3, which="BE"), "`which`"),
        (dict(k=3, tol=0.0), "`tol`"), (dict(k=3, block_size=0), "`block_size`"),
        (dict(k=2.0), "`k`"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            hs.top_eigenpairs(mv, v0, **kwargs)
    with pytest.raises(ValueError, match="`v0`.*zero"):
        hs.top_eigenpairs(mv, jnp.zeros(10), 2)
    with pytest.raises(ValueError, match="`v0`.*non-finite"):
        hs.top_eigenpairs(mv, v0.at[3].set(jnp.inf), 2)
    with pytest.raises(ValueError, match="`v0`"):
        hs.lanczos(mv, jnp.arange(10), 3)  # integer start vector
    with pytest.raises(ValueError, match="`num_steps`"):
        hs.lanczos(mv, v0, 0)
    with pytest.raises(ValueError, match="`num_steps`"):
        hs.lanczos(mv, v0, 11)
    with pytest.raises(ValueError, match="`matvec`"):
        hs.lanczos("not a function", v0, 3)


def test_non_finite_matvec_is_reported_not_propagated():
    def bad(v):
        return jnp.where(jnp.arange(v.shape[0]) == 0, jnp.nan, v)

    with pytest.raises(FloatingPointError, match="non-finite"):
        hs.top_eigenpairs(bad, jnp.ones(10), 2)
    inside = jax.jit(lambda v: hs.top_eigenpairs(bad, v, 2))(jnp.ones(10))
    assert not bool(inside.converged.any()) and bool(jnp.isnan(inside.eigenvalues).all())
    res = hs.lanczos(bad, jnp.ones(10), 4)
    assert bool(jnp.isnan(res.alphas).all())


# ---------------------------------------------------------------------------------------------
# Thick restart: the same eigenpairs with a bounded basis.


_RESTART_CASES = {
    # name: (spectrum, k, which, block size, basis cap)
    "decaying": (np.r_[10.0, 8.0, 7.0, 6.5, 6.0, np.linspace(0.0, 5.0, 295)], 5, "LA", 1, 9),
    "clustered": (np.r_[[5.0] * 4, np.linspace(0.0, 4.5, 196)], 4, "LA", 4, 16),
    "negative": (np.r_[np.linspace(-3.0, 1.0, 150), 2.0, 2.5], 3, "SA", 1, 12),
    "magnitude": (np.r_[-9.0, 8.0, np.linspace(-2.0, 2.0, 120)], 2, "LM", 1, 6),
    "low_rank": (np.r_[[3.0, 2.0, 1.0], np.zeros(97)], 3, "LA", 1, 7),
}


@pytest.mark.parametrize("name", sorted(_RESTART_CASES))
def test_restarted_solver_matches_dense_eigh_and_the_unrestarted_one(name):
    lam, k, which, b, cap = _RESTART_CASES[name]
    with jax.enable_x64(True):
        a, _ = matrix_with_spectrum(lam, seed=3)
        a = jnp.asarray(a)
        w, v = top_subspace(a, k, which)
        v0 = hs.random_start_vector(jax.random.key(0), jnp.zeros(lam.size))
        full = hs.top_eigenpairs(lambda x: a @ x, v0, k, which=which, tol=1e-9, block_size=b,
                                 num_steps=min(lam.size, 200))
        capped = hs.top_eigenpairs(lambda x: a @ x, v0, k, which=which, tol=1e-9, block_size=b,
                                   max_basis=cap, num_steps=3000)
    for res in (full, capped):
        assert bool(res.converged.all()), name
        np.testing.assert_allclose(res.eigenvalues, w, rtol=1e-9, atol=1e-9)
        assert np.max(np.abs(projector(res.eigenvectors) - projector(v))) < 1e-6
    # A basis of `cap` vectors instead of up to 200, for more matvecs (reported honestly).
    assert int(capped.num_matvecs) > 0 and int(full.num_matvecs) > 0


def test_restarted_solver_on_an_mlp_hessian_and_its_argument_checks():
    params, outputs = mlp((5, 8, 3))
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(64, 5)), "y": rng.integers(0, 3, 64)}
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params)
        loss = loss_of(outputs)
        op = hs.dataset_hvp(loss, params, data, batch_size=16)
        h = np.asarray(hs.dense_hessian(loss, params, data))
        v0 = hs.random_start_vector(jax.random.key(1), params)
        res = hs.top_eigenpairs(op, v0, 6, tol=1e-8, max_basis=14, num_steps=2000)
    w, v = top_subspace(h, 6)
    assert bool(res.converged.all())
    np.testing.assert_allclose(res.eigenvalues, w, rtol=1e-8)
    with pytest.raises(ValueError, match="max_basis"):
        hs.top_eigenpairs(op, v0, 6, max_basis=7)  # needs k + 2 block sizes
    with pytest.raises(ValueError, match="num_steps"):
        hs.top_eigenpairs(op, v0, 6, max_basis=14, num_steps=10)  # budget below the basis
