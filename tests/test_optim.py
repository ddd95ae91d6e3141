"""hessian_subspace.training.optim: Dom/Bulk projections and low-rank Newton as optax transforms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import count_compilations, matrix_with_spectrum, projector, top_subspace
from jax import flatten_util

import hessian_subspace as hs
from hessian_subspace.paper import data as data_lib
from hessian_subspace.paper import models
from hessian_subspace.training import batches, optim, tasks

F32_TOL = 1e-5  # relative round-off allowance for float32 projections (p <= 100)


def _flat(tree):
    return np.asarray(flatten_util.ravel_pytree(tree)[0], dtype=np.float64)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _like(p_w=(4, 5), p_b=6):
    return {"w": jnp.zeros(p_w, jnp.float32), "b": jnp.zeros((p_b,), jnp.float32)}


def _random_tree(key, like):
    flat, unravel = flatten_util.ravel_pytree(like)
    return unravel(jax.random.normal(key, flat.shape, flat.dtype))


def matrix_hessian_fn(params, matrix):
    """hessian_fn for a constant Hessian given as curvature data: v -> matrix @ v on pytrees."""
    unravel = flatten_util.ravel_pytree(params)[1]
    return lambda v: unravel(matrix @ flatten_util.ravel_pytree(v)[0])


def quadratic_loss(params, batch):
    """Mean over the batch of 0.5 (θ - θ*)ᵀ A (θ - θ*); batch = {"a": (n, p, p), "t": (n, p)}."""
    theta = flatten_util.ravel_pytree(params)[0]
    d = theta[None] - batch["t"]
    return 0.5 * jnp.mean(jnp.einsum("ni,nij,nj->n", d, batch["a"], d))


def dataset_hessian_fn(params, data):
    return hs.dataset_hvp(quadratic_loss, params, data, batch_size=1)


# --------------------------------------------------------------------------------------------
# Dom / Bulk projections.


def test_dominant_and_bulk_split_the_update():
    like = _like()
    p = 26
    spectrum = np.concatenate([[10.0, 8.0, 6.0, 4.0], np.linspace(0.0, 0.5, p - 4)])
    a, _ = matrix_with_spectrum(spectrum, seed=1)
    k = 4
    make = lambda mode: optim.project_onto_subspace(  # noqa: E731
        mode, k, 5, hessian_fn=matrix_hessian_fn, key=jax.random.key(3), tol=1e-4)
    u = _random_tree(jax.random.key(7), like)
    a32 = jnp.asarray(a, jnp.float32)
    txs = [make("dominant"), make("bulk")]

    @jax.jit  # one program for both modes: one compilation
    def both(u, a):
        return [tx.update(u, tx.init(like), like, curvature_data=a) for tx in txs]

    (dom, s_dom), (bulk, s_bulk) = both(u, a32)

    # Same key and schedule: the same basis.
    np.testing.assert_array_equal(np.asarray(s_dom.basis), np.asarray(s_bulk.basis))
    assert jax.tree_util.tree_structure(dom) == jax.tree_util.tree_structure(u)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves((dom, bulk)))
    basis = np.asarray(s_dom.basis, np.float64)
    assert basis.shape == (k, p)
    np.testing.assert_allclose(basis @ basis.T, np.eye(k), atol=F32_TOL)
    # The basis is the true top-k subspace (reference: float64 eigh), to the solver's tol:
    # angle <~ residual / gap = 1e-4 * 10 / 3.5.
    _, ref = top_subspace(a, k)
    np.testing.assert_allclose(projector(basis), projector(ref), atol=1e-3)
    np.testing.assert_allclose(np.asarray(s_dom.eigenvalues), [10, 8, 6, 4], rtol=1e-4)
    assert bool(np.all(s_dom.converged))

    u_f, dom_f, bulk_f = _flat(u), _flat(dom), _flat(bulk)
    assert _rel(dom_f + bulk_f, u_f) < F32_TOL
    # Dom lies in the span; Bulk is orthogonal to it.
    assert np.linalg.norm(dom_f - basis.T @ (basis @ dom_f)) / np.linalg.norm(dom_f) < F32_TOL
    assert np.linalg.norm(basis @ bulk_f) / np.linalg.norm(u_f) < F32_TOL
    # Removed fractions: the other part's share of ||u||².
    uu = u_f @ u_f
    np.testing.assert_allclose(float(s_dom.removed_fraction), bulk_f @ bulk_f / uu, rtol=1e-4)
    np.testing.assert_allclose(float(s_bulk.removed_fraction), dom_f @ dom_f / uu, rtol=1e-4)
    for s in (s_dom, s_bulk):
        assert int(s.count) == 1 and s.key.dtype == jnp.uint32
        assert 0 < int(s.hvps) <= p + k


def test_adam_chain_projects_adams_output():
    """chain(scale_by_adam(), project, scale(-lr)) == -lr P (Adam's update), compiled once."""
    like = _like(p_w=(3, 3), p_b=3)
    a, _ = matrix_with_spectrum(np.concatenate([[5.0, 3.0], np.linspace(0.1, 1.0, 10)]), seed=2)
    a32 = jnp.asarray(a, jnp.float32)
    lr = 0.05
    project = optim.project_onto_subspace(
        "dominant", 2, 2, hessian_fn=matrix_hessian_fn, key=jax.random.PRNGKey(0))  # raw key
    tx = optax.chain(optax.scale_by_adam(), project, optax.scale(-lr))
    adam = optax.scale_by_adam()
    adam_update = jax.jit(adam.update)

    @jax.jit
    def step(grads, state, params, data):
        return tx.update(grads, state, params, curvature_data=data, unrelated_extra_arg=1.0)

    state, adam_state = tx.init(like), adam.init(like)
    keys = jax.random.split(jax.random.key(1), 3)
    with count_compilations() as compiles:
        for i, key in enumerate(keys):
            g = _random_tree(key, like)
            u, state = step(g, state, like, a32)
            adam_u, adam_state = adam_update(g, adam_state, like)
            basis = np.asarray(state[1].basis, np.float64)
            expected = -lr * basis.T @ (basis @ _flat(adam_u))
            assert _rel(_flat(u), expected) < F32_TOL
            assert int(state[1].count) == i + 1
            if i == 0:
                first = compiles[0]
    assert compiles[0] == first  # steps 2 and 3 reuse the compiled step
    assert step._cache_size() == 1
    # refresh_every=2: refreshes at updates 0 and 2 only.
    assert int(state[1].hvps) > 0
    # Default tol (3.5e-3 relative residual) bounds the angle by ~ 3.5e-3 * 5 / 2.
    np.testing.assert_allclose(projector(state[1].basis), projector(top_subspace(a, 2)[1]),
                               atol=1e-2)


# --------------------------------------------------------------------------------------------
# Low-rank Newton on a quadratic.


def _quadratic(spectrum, seed):
    a, _ = matrix_with_spectrum(spectrum, seed=seed)
    like = {"u": jnp.zeros((5,), jnp.float32), "v": jnp.zeros((len(spectrum) - 5,), jnp.float32)}
    rng = np.random.default_rng(seed)
    theta = jnp.asarray(rng.normal(size=len(spectrum)), jnp.float32)
    target = rng.normal(size=len(spectrum))
    data = {"a": jnp.asarray(a[None], jnp.float32), "t": jnp.asarray(target[None], jnp.float32)}
    params = flatten_util.ravel_pytree(like)[1](theta)
    return a, target, params, data


def test_low_rank_newton_full_rank_lands_on_minimum():
    spectrum = np.linspace(1.0, 10.0, 8)
    a, target, params, data = _quadratic(spectrum, seed=4)
    tx = optim.low_rank_newton(8, 0.0, hessian_fn=dataset_hessian_fn, key=jax.random.key(0))
    g = jax.grad(quadratic_loss)(params, data)
    u, state = jax.jit(tx.update)(g, tx.init(params), params, curvature_data=data)
    new = _flat(optax.apply_updates(params, u))
    np.testing.assert_allclose(new, target, atol=1e-4 * np.linalg.norm(target))
    np.testing.assert_allclose(np.asarray(state.eigenvalues), spectrum[::-1], rtol=1e-5)
    assert int(state.hvps) == 8  # k == p: dense matrix from p HVPs
    assert float(state.removed_fraction) < 1e-6


def test_low_rank_newton_top_subspace_only():
    spectrum = np.concatenate([[9.0, 7.0, 5.0], np.linspace(0.2, 1.0, 7)])
    a, target, params, data = _quadratic(spectrum, seed=5)
    k = 3
    configs = [(0.0, 1.0), (0.5, 0.3)]  # (damping, step_size)
    txs = [optim.low_rank_newton(k, damping, hessian_fn=dataset_hessian_fn, key=jax.random.key(1),
                                 step_size=step_size) for damping, step_size in configs]
    g = jax.grad(quadratic_loss)(params, data)

    @jax.jit  # one program for both configurations: one compilation
    def run(g, params, data):
        return [tx.update(g, tx.init(params), params, curvature_data=data) for tx in txs]

    theta, g_f = _flat(params), _flat(g)
    lam, vecs = top_subspace(a, k)
    p_top = projector(vecs)
    bulk = g_f - p_top @ g_f
    for (damping, step_size), (u, state) in zip(configs, run(g, params, data), strict=True):
        new = _flat(optax.apply_updates(params, u))
        # Reference: -η Σ (v·g)/(|λ| + δ) v in float64.
        expected = -step_size * vecs.T @ ((vecs @ g_f) / (np.abs(lam) + damping))
        np.testing.assert_allclose(new - theta, expected, atol=1e-5 * np.linalg.norm(expected))
        if damping == 0 and step_size == 1:
            # Exact inside the top subspace; the bulk component is left unchanged.
            scale = np.linalg.norm(theta - target)
            assert np.linalg.norm(p_top @ (new - target)) < 1e-4 * scale
            assert np.linalg.norm(new - theta - p_top @ (new - theta)) < 1e-5 * scale
        np.testing.assert_allclose(float(state.removed_fraction), bulk @ bulk / (g_f @ g_f),
                                   rtol=1e-3)


def test_low_rank_newton_negative_and_zero_eigenvalues():
    """|λ| + δ (saddle-free): a descent direction along negative curvature; with δ = 0 the
    null directions get no step (pseudo-inverse) and count as removed."""
    a, _ = matrix_with_spectrum([4.0, 2.0, -1.0, -3.0], seed=6)
    like = jnp.zeros(4)
    g = jnp.asarray([1.0, -2.0, 0.5, 1.5])
    g_f = np.asarray(g, np.float64)
    tx = optim.low_rank_newton(4, 0.5, hessian_fn=matrix_hessian_fn, key=jax.random.key(2))
    u, _ = jax.jit(tx.update)(g, tx.init(like), like, curvature_data=jnp.asarray(a, jnp.float32))
    lam, vecs = np.linalg.eigh(a)
    expected = -vecs @ ((vecs.T @ g_f) / (np.abs(lam) + 0.5))
    np.testing.assert_allclose(np.asarray(u), expected, atol=1e-5)
    assert float(jnp.dot(u, g)) < 0  # a descent direction

    b, q = matrix_with_spectrum([3.0, 1.0, 0.0, 0.0], seed=7)
    tx0 = optim.low_rank_newton(4, 0.0, hessian_fn=matrix_hessian_fn, key=jax.random.key(2))
    u0, s0 = jax.jit(tx0.update)(g, tx0.init(like), like,
                                 curvature_data=jnp.asarray(b, jnp.float32))
    assert bool(jnp.all(jnp.isfinite(u0)))
    expected = -q[:, :2] @ ((q[:, :2].T @ g_f) / np.array([3.0, 1.0]))
    np.testing.assert_allclose(np.asarray(u0), expected, atol=1e-5)
    null = q[:, 2:] @ (q[:, 2:].T @ g_f)
    np.testing.assert_allclose(float(s0.removed_fraction), null @ null / (g_f @ g_f), rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Training a tiny MLP with chain(sgd with momentum, Bulk projection) under jit.


def test_training_loop_refreshes_on_schedule_and_compiles_once():
    ds = data_lib.gaussian_mixture(num_classes=3, dim=6, num_examples=48, sigma=0.3, seed=0)
    model = models.build_model("fc", num_outputs=3, hidden=(6,))
    params, model_state = tasks.init_variables(model, jax.random.key(0), ds["x"][:1])
    loss_fn = hs.curvature.bind_state(tasks.inference_loss(model, "classification"), model_state)
    curvature_data = {"x": jnp.asarray(ds["x"]), "y": jnp.asarray(ds["y"])}
    p, k, refresh_every, num_updates = models.param_count(params), 3, 3, 7

    hessian_fn = lambda prm, d: hs.dataset_hvp(loss_fn, prm, d, batch_size=16)  # noqa: E731
    project = optim.project_onto_subspace("bulk", k, refresh_every, hessian_fn=hessian_fn,
                                          key=jax.random.key(1))
    tx = optax.chain(optax.sgd(0.5, momentum=0.9), project)

    @jax.jit
    def step(params, opt_state, batch, curvature_data):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params, curvature_data=curvature_data)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    history, losses = [], []
    with count_compilations() as compiles:
        for t in range(num_updates):
            idx = batches.batch_indices(48, 16, t, 0)
            batch = {"x": curvature_data["x"][idx], "y": curvature_data["y"][idx]}
            if t == 1:
                compiled_after_first = compiles[0]
            at = params
            params, opt_state, loss = step(params, opt_state, batch, curvature_data)
            history.append((at, jax.device_get(opt_state[1])))
            losses.append(float(loss))
    assert compiles[0] == compiled_after_first  # only the first call compiled
    assert step._cache_size() == 1
    # The curvature data enter as an argument: nothing is baked into the step as a constant.
    assert not step.trace(params, opt_state, batch, curvature_data).jaxpr.consts
    assert np.all(np.isfinite(losses))

    dense_hessian = jax.jit(hs.dense_hessian)  # eager jax.hessian compiles op by op (~10 s)
    previous_hvps, previous_basis = 0, np.zeros((k, p))
    for t, (at, s) in enumerate(history):
        assert int(s.count) == t + 1
        assert s.basis.shape == (k, p) and s.eigenvalues.shape == (k,)
        assert 0.0 <= float(s.removed_fraction) <= 1.0
        refreshed = t % refresh_every == 0
        assert (int(s.hvps) > previous_hvps) == refreshed
        assert (not np.array_equal(s.basis, previous_basis)) == refreshed
        if refreshed:  # the basis is the top-k subspace of the Hessian at θ_t
            h = np.asarray(dense_hessian(loss_fn, at, curvature_data), np.float64)
            lam, vecs = top_subspace(h, k)
            np.testing.assert_allclose(np.asarray(s.eigenvalues), lam,
                                       rtol=1e-2, atol=1e-3 * abs(lam[0]))
            assert float(hs.subspace_overlap(s.basis, vecs.astype(np.float32))) > 0.99
        previous_hvps, previous_basis = int(s.hvps), np.asarray(s.basis)


# --------------------------------------------------------------------------------------------
# Validation.


_GOOD = dict(hessian_fn=matrix_hessian_fn, key=jax.random.key(0))


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="top", k=2, refresh_every=1), "`mode`"),
    (dict(mode="bulk", k=0, refresh_every=1), "`k`"),
    (dict(mode="bulk", k=2.0, refresh_every=1), "`k`"),
    (dict(mode="bulk", k=2, refresh_every=0), "`refresh_every`"),
    (dict(mode="bulk", k=2, refresh_every=1, num_steps=1), "`num_steps`"),
    (dict(mode="bulk", k=2, refresh_every=1, tol=0.0), "`tol`"),
    (dict(mode="bulk", k=2, refresh_every=1, block_size=0), "`block_size`"),
    (dict(mode="bulk", k=2, refresh_every=1, hessian_fn=None), "`hessian_fn`"),
    (dict(mode="bulk", k=2, refresh_every=1, key=None), "`key`"),
    (dict(mode="bulk", k=2, refresh_every=1, key=jnp.zeros(2)), "`key`"),
])
def test_project_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.project_onto_subspace(**{**_GOOD, **kwargs})


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0, damping=0.1), "`k`"),
    (dict(k=2, damping=-0.1), "`damping`"),
    (dict(k=2, damping=float("nan")), "`damping`"),
    (dict(k=2, damping="big"), "`damping`"),
    (dict(k=2, damping=0.1, refresh_every=0), "`refresh_every`"),
    (dict(k=2, damping=0.1, step_size=0.0), "`step_size`"),
    (dict(k=2, damping=0.1, num_steps=1), "`num_steps`"),
    (dict(k=2, damping=0.1, hessian_fn="hvp"), "`hessian_fn`"),
])
def test_newton_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.low_rank_newton(**{**_GOOD, **kwargs})


@pytest.mark.parametrize("make", [
    lambda: optim.project_onto_subspace("dominant", 2, 1, **_GOOD),
    lambda: optim.low_rank_newton(2, 0.1, **_GOOD),
])
def test_update_needs_params_and_data(make):
    tx = make()
    like = jnp.zeros(4)
    state = tx.init(like)
    with pytest.raises(ValueError, match="`params`"):
        tx.update(like, state, curvature_data=jnp.eye(4))
    with pytest.raises(ValueError, match="`curvature_data`"):
        tx.update(like, state, like)
    with pytest.raises(ValueError, match="structure"):
        tx.update({"a": like}, state, like, curvature_data=jnp.eye(4))
    with pytest.raises(ValueError, match="`k` = 2 exceeds"):
        tx.init(jnp.zeros(1))
