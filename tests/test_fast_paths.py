"""The fast paths give the slow paths' numbers: the cached linearisation of a data-set operator,
the host-driven eigensolver, batched probes, the unlooped single batch. Speed itself lives in
benchmarks/peers.py; here only equality, the automatic choices and bad settings."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hessian_subspace as hs
from hessian_subspace import _xla, curvature, krylov, linearization

from _helpers import convnet, count_compilations, loss_of
from jax import flatten_util


def _mlp_problem(dtype=jnp.float64, n=37):
    rng = np.random.default_rng(0)
    data = {"x": jnp.asarray(rng.normal(size=(n, 6)), dtype),
            "y": jnp.asarray(rng.integers(0, 3, n), jnp.int32)}
    params = {"w1": jnp.asarray(rng.normal(size=(6, 5)) / 2, dtype),
              "b1": jnp.asarray(rng.normal(size=(5,)) / 4, dtype),
              "w2": jnp.asarray(rng.normal(size=(5, 3)) / 2, dtype)}

    def logits(p, batch):
        return jnp.tanh(batch["x"] @ p["w1"] + p["b1"]) @ p["w2"]

    def output_loss(out, batch):
        return jnp.mean(jax.nn.logsumexp(out, -1)
                        - jnp.take_along_axis(out, batch["y"][:, None], 1)[:, 0])

    def loss(p, batch):
        return output_loss(logits(p, batch), batch)

    return loss, logits, output_loss, params, data


def _conv_problem(n=24):
    rng = np.random.default_rng(1)
    data = {"x": jnp.asarray(rng.normal(size=(n, 8, 8, 1)), jnp.float32),
            "y": jnp.asarray(rng.integers(0, 3, n), jnp.int32)}
    params, outputs = convnet((2, 3), 3, (8, 8, 1))
    return loss_of(outputs), params, data


def _apply_prepared(op, v):
    return jax.jit(lambda o, v: o.prepared()(v))(op, v)


def _flat(tree):
    return np.asarray(flatten_util.ravel_pytree(tree)[0], np.float64)


@pytest.mark.parametrize("kind", ["hessian", "ggn", "restricted", "preconditioned"])
def test_cached_product_equals_uncached_float64(kind):
    with jax.enable_x64(True):
        loss, logits, output_loss, params, data = _mlp_problem()

        def build(cache):
            if kind == "ggn":
                return hs.dataset_ggn(logits, output_loss, params, data, batch_size=8,
                                      cache=cache)
            op = hs.dataset_hvp(loss, params, data, batch_size=8, cache=cache)
            if kind == "restricted":
                return hs.restrict(op, ["w1"])
            if kind == "preconditioned":
                scale = jax.tree_util.tree_map(lambda x: 1.0 + jnp.abs(x), params)
                return hs.precondition(op, scale)
            return op

        slow, fast = build(False), build(True)
        v = hs.random_start_vector(jax.random.key(3), slow.like)
        expected = _flat(slow(v))
        got = _flat(_apply_prepared(fast, v))
        assert np.max(np.abs(got - expected)) <= 1e-12 * np.max(np.abs(expected))
        # The solvers take the cached path by themselves and agree with the uncached one.
        a = hs.top_eigenpairs(slow, v, 3, tol=1e-10)
        b = hs.top_eigenpairs(fast, v, 3, tol=1e-10)
        np.testing.assert_allclose(b.eigenvalues, a.eigenvalues, rtol=1e-10)


def test_cached_product_equals_uncached_float32_and_dense():
    loss, params, data = _conv_problem()
    slow = hs.dataset_hvp(loss, params, data, batch_size=10, cache=False)
    fast = hs.dataset_hvp(loss, params, data, batch_size=10, cache=True)
    v = hs.random_start_vector(jax.random.key(0), params)
    expected, got = _flat(slow(v)), _flat(_apply_prepared(fast, v))
    assert np.linalg.norm(got - expected) <= 1e-5 * np.linalg.norm(expected)
    # Against the dense float64 Hessian of the same loss.
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params)
        d64 = {"x": jnp.asarray(data["x"], jnp.float64), "y": data["y"]}
        dense = np.asarray(curvature.dense_hessian(loss, p64, d64))
    assert np.linalg.norm(got - dense @ _flat(v)) <= 1e-5 * np.linalg.norm(dense @ _flat(v))


def test_automatic_cache_follows_the_budget():
    loss, _, _, params, data = _mlp_problem(jnp.float32, n=200)
    size = linearization.linearization_bytes(hs.dataset_hvp(loss, params, data, batch_size=50,
                                                        cache=False))
    # The residuals are activations of the 200 examples (tanh layer: 200 x 5 numbers and its
    # derivative), not copies of the parameters or the data.
    assert 200 * 5 * 4 <= size <= 200 * (6 + 5 + 3) * 4 * 4
    assert hs.dataset_hvp(loss, params, data, batch_size=50, cache_budget=size).cache
    small = hs.dataset_hvp(loss, params, data, batch_size=50, cache_budget=size - 1)
    assert not small.cache and not small.describe()["cached_linearization"]
    assert small.prepared() is small  # falls back to forward-over-reverse
    assert hs.dataset_hvp(loss, params, data, batch_size=50).cache  # default budget: GBs
    assert linearization.default_cache_budget() > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(cache="yes"), "`cache`"),
    (dict(cache_budget=0), "`cache_budget`"),
    (dict(cache_budget=True), "`cache_budget`"),
])
def test_bad_cache_settings(kwargs, match):
    loss, _, _, params, data = _mlp_problem(jnp.float32)
    with pytest.raises(ValueError, match=match):
        hs.dataset_hvp(loss, params, data, batch_size=8, **kwargs)


def test_host_driven_solver_equals_compiled():
    loss, params, data = _conv_problem()
    op = hs.dataset_hvp(loss, params, data, batch_size=10)
    v = hs.random_start_vector(jax.random.key(1), params)
    # On CPU a product with a convolution is host-driven by default; an MLP is not.
    assert krylov._wants_host_driver(op, v) == (jax.default_backend() == "cpu")
    mlp_loss, _, _, mlp_params, mlp_data = _mlp_problem(jnp.float32)
    mlp = hs.dataset_hvp(mlp_loss, mlp_params, mlp_data, batch_size=8)
    assert not krylov._wants_host_driver(mlp, mlp_params)
    for kwargs in (dict(), dict(max_basis=8, block_size=2)):
        a = hs.top_eigenpairs(op, v, 3, driver="compiled", **kwargs)
        b = hs.top_eigenpairs(op, v, 3, driver="host", **kwargs)
        assert int(a.num_matvecs) == int(b.num_matvecs)
        np.testing.assert_allclose(b.eigenvalues, a.eigenvalues, rtol=2e-5)
        overlap = np.abs(np.sum(np.asarray(a.eigenvectors) * np.asarray(b.eigenvectors), 1))
        np.testing.assert_allclose(overlap, 1.0, atol=1e-3)
        assert bool(np.all(b.converged))
    # The same compiled step serves the next checkpoint (new parameter values).
    params2 = jax.tree_util.tree_map(lambda x: 1.01 * x, params)
    op2 = hs.dataset_hvp(loss, params2, data, batch_size=10)
    hs.top_eigenpairs(op2, v, 3, driver="host")
    with count_compilations() as n:
        hs.top_eigenpairs(dataclasses.replace(op2, params=params), v, 3, driver="host")
    assert n[0] == 0


def test_host_driver_refuses_a_trace_and_bad_names():
    loss, params, data = _conv_problem()
    op = hs.dataset_hvp(loss, params, data, batch_size=10)
    v = hs.random_start_vector(jax.random.key(1), params)
    with pytest.raises(ValueError, match="`driver`"):
        hs.top_eigenpairs(op, v, 3, driver="python")
    with pytest.raises(ValueError, match="driver='compiled'"):
        jax.jit(lambda o, v: hs.top_eigenpairs(o, v, 3, driver="host").eigenvalues)(op, v)
    # Under jit "auto" compiles the loop and still works.
    out = jax.jit(lambda o, v: hs.top_eigenpairs(o, v, 3).eigenvalues)(op, v)
    np.testing.assert_allclose(out, hs.top_eigenpairs(op, v, 3).eigenvalues, rtol=2e-5)


def test_single_batch_and_unrolled_products_have_no_loop():
    loss, params, data = _conv_problem(n=20)
    v = hs.random_start_vector(jax.random.key(1), params)
    one = hs.dataset_hvp(loss, params, data, batch_size=20, cache=False)
    auto = hs.dataset_hvp(loss, params, data, batch_size=5, cache=False)
    looped = dataclasses.replace(auto, unroll=False)
    hlo = lambda op: curvature.apply_operator.lower(op, v).as_text()  # noqa: E731
    assert "while" not in hlo(one)
    assert "while" in hlo(looped)
    unrolled = dataclasses.replace(looped, unroll=True)
    assert "while" not in hlo(unrolled)
    # By default a convolution's batch loop is written out on CPU only.
    assert ("while" in hlo(auto)) == (jax.default_backend() != "cpu")
    np.testing.assert_allclose(_flat(unrolled(v)), _flat(looped(v)), rtol=1e-5, atol=1e-6)
    assert looped.data_batches == 4 and one.data_batches == 1
    ragged = hs.dataset_hvp(loss, params, data, batch_size=6)
    assert ragged.data_batches == 4  # 3 full batches + the ragged one


def test_data_set_means_write_out_convolution_loops_on_cpu():
    """dataset_mean's default: the batch loop of a convolution is written out on CPU (XLA:CPU
    runs it ~10x slower in a loop body); an MLP's stays a loop; the values agree."""
    loss, params, data = _conv_problem(n=20)

    def program(unroll, loss=loss, params=params, data=data):
        fn = lambda p, d: curvature.dataset_mean(  # noqa: E731
            lambda b: jax.value_and_grad(loss)(p, b), d, batch_size=5, unroll=unroll)
        return jax.jit(fn).lower(params, data).as_text(), jax.jit(fn)(params, data)

    (auto, a), (looped, b) = program(None), program(False)
    assert ("while" in auto) == (jax.default_backend() != "cpu") and "while" in looped
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    np.testing.assert_allclose(_flat(a[1]), _flat(b[1]), rtol=1e-5, atol=1e-7)
    mlp_loss, _, _, mlp_params, mlp_data = _mlp_problem(jnp.float32)
    mlp = lambda p, d: curvature.dataset_mean(  # noqa: E731
        lambda b: mlp_loss(p, b), d, batch_size=8)
    assert "while" in jax.jit(mlp).lower(mlp_params, mlp_data).as_text()
    # More batches than MAX_UNROLLED_BATCHES stay a loop.
    many = jax.tree_util.tree_map(
        lambda x: jnp.concatenate([x] * 2), data)  # 40 examples, batch 1: 40 batches
    fn = lambda p, d: curvature.dataset_mean(lambda b: loss(p, b), d, batch_size=1)  # noqa: E731
    assert _xla.MAX_UNROLLED_BATCHES < 40
    assert "while" in jax.jit(fn).lower(params, many).as_text()


def test_batched_probes_equal_sequential_ones():
    with jax.enable_x64(True):
        loss, _, _, params, data = _mlp_problem()
        op = hs.dataset_hvp(loss, params, data, batch_size=8)
        key = jax.random.key(5)
        seq = hs.spectrum.slq_quadrature(op, key, num_probes=6, num_steps=8, probe_batch=1)
        default = hs.spectrum.slq_quadrature(op, key, num_probes=6, num_steps=8)
        np.testing.assert_allclose(default[0], seq[0], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(default[1], seq[1], rtol=1e-9, atol=1e-12)
        t_seq = hs.hutchinson_trace(op, key, num_probes=6, probe_batch=1)
        t_default = hs.hutchinson_trace(op, key, num_probes=6)
        np.testing.assert_allclose(t_default, t_seq, rtol=1e-10)
        # The default block is the memory-aware one: all 6 probes fit easily here, 1 does
        # when the budget holds a single probe.
        like = op.like
        assert hs.spectrum.default_probe_batch(op, like, 6, 8) == 6
        assert hs.spectrum.default_probe_batch(op, like, 6, 8, budget=1.0) == 1
