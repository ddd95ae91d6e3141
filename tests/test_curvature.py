"""HVPs against dense float64 Hessians; data-set HVPs against full-batch HVPs; sharding."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import flatten_util

import hessian_subspace as hs

from _helpers import convnet, count_compilations, cross_entropy, loss_of, mlp


def _f64(tree):
    """float64 copies inside a `jax.enable_x64` scope; float32 outside (x64 off)."""
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), tree)


def _mlp_problem(n=24, seed=0):
    params, outputs = mlp((4, 6, 5, 3), seed=seed, activation="softplus")
    rng = np.random.default_rng(seed)
    batch = {"x": _f64(rng.normal(size=(n, 4))), "y": jnp.asarray(rng.integers(0, 3, n))}
    return loss_of(outputs), _f64(params), batch


def _conv_problem(n=10, seed=0):
    params, outputs = convnet((2, 3), 3, (8, 8, 1), seed=seed)
    rng = np.random.default_rng(seed)
    batch = {"x": _f64(rng.normal(size=(n, 8, 8, 1))),
             "y": jnp.asarray(rng.integers(0, 3, n))}
    return loss_of(outputs), _f64(params), batch


@pytest.mark.parametrize("problem", [_mlp_problem, _conv_problem], ids=["mlp", "convnet"])
def test_hvp_matches_dense_hessian_float64(problem):
    with jax.enable_x64(True):
        loss, params, batch = problem()
        h = np.asarray(hs.dense_hessian(loss, params, batch))
        assert np.allclose(h, h.T, atol=1e-12)
        v = hs.random_start_vector(jax.random.key(3), params)
        hv = jax.jit(hs.hvp, static_argnums=0)(loss, params, v, batch)
        got = flatten_util.ravel_pytree(hv)[0]
        want = h @ np.asarray(flatten_util.ravel_pytree(v)[0])
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch_size", [1, 5, 7, 24, 100])
def test_dataset_hvp_equals_full_batch_hvp(batch_size):
    # 24 examples: batch sizes 5 and 7 leave ragged last batches of 4 and 3.
    with jax.enable_x64(True):
        loss, params, data = _mlp_problem(n=24)
        v = hs.random_start_vector(jax.random.key(1), params)
        want = flatten_util.ravel_pytree(hs.hvp(loss, params, v, data))[0]
        op = hs.dataset_hvp(loss, params, data, batch_size=batch_size)
        got = flatten_util.ravel_pytree(op(v))[0]
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-11, atol=1e-13)
        value, grad = hs.dataset_value_and_grad(loss, params, data, batch_size=batch_size)
        np.testing.assert_allclose(float(value), float(loss(params, data)), rtol=1e-12)
        g_want = flatten_util.ravel_pytree(jax.grad(loss)(params, data))[0]
        np.testing.assert_allclose(np.asarray(flatten_util.ravel_pytree(grad)[0]),
                                   np.asarray(g_want), rtol=1e-11, atol=1e-13)


def test_dense_matrix_of_operator_equals_dense_hessian():
    with jax.enable_x64(True):
        loss, params, data = _mlp_problem(n=12)
        op = hs.dataset_hvp(loss, params, data, batch_size=5)
        np.testing.assert_allclose(np.asarray(hs.dense_matrix(op, params)),
                                   np.asarray(hs.dense_hessian(loss, params, data)),
                                   rtol=1e-10, atol=1e-12)


def test_operator_is_a_pytree_and_compiles_once_across_parameter_values():
    loss, params, data = _mlp_problem(n=16)
    v = hs.random_start_vector(jax.random.key(0), params)
    hs.dataset_hvp(loss, params, data, batch_size=4)(v)  # warm-up compile
    shifted = jax.tree_util.tree_map(lambda x: x + 0.1, params)
    with count_compilations() as n:
        out = hs.dataset_hvp(loss, shifted, data, batch_size=4)(v)
        jax.block_until_ready(out)
    assert n[0] == 0


def test_precision_is_explicit_and_reported():
    loss, params, data = _mlp_problem(n=8)
    op = hs.dataset_hvp(loss, params, data, batch_size=4, precision="highest")
    info = op.describe()
    assert info["matmul_precision"] == "highest"
    assert info["reduction"] == "mean over examples" and info["num_examples"] == 8
    assert hs.dataset_hvp(loss, params, data, batch_size=4).describe()["matmul_precision"] == \
        "default"
    with pytest.raises(ValueError, match="precision"):
        hs.dataset_hvp(loss, params, data, batch_size=4, precision="ultra")


def test_bad_inputs_raise_value_errors_naming_the_argument():
    loss, params, data = _mlp_problem(n=8)
    bad = jax.tree_util.tree_map(lambda x: x, params)
    bad["dense_0"]["kernel"] = bad["dense_0"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"`params`.*non-finite.*dense_0"):
        hs.dataset_hvp(loss, bad, data, batch_size=4)
    with pytest.raises(ValueError, match="`params`"):
        hs.hvp(loss, bad, params, data)
    with pytest.raises(ValueError, match="`params`"):
        hs.dataset_value_and_grad(loss, bad, data, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        hs.dataset_hvp(loss, params, data, batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        hs.dataset_hvp(loss, params, data, batch_size=2.5)
    with pytest.raises(ValueError, match="disagree"):
        hs.dataset_hvp(loss, params, {"x": data["x"], "y": data["y"][:3]}, batch_size=4)
    with pytest.raises(ValueError, match="`v`"):
        hs.hvp(loss, params, jnp.zeros(3), data)


_SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jax import flatten_util
    import hessian_subspace as hs
    sys.path.insert(0, sys.argv[1])  # the tests directory
    from _helpers import loss_of, mlp

    params, outputs = mlp((8, 16, 4))
    loss = loss_of(outputs)
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(100, 8)).astype(np.float32),
            "y": rng.integers(0, 4, 100).astype(np.int32)}
    v = hs.random_start_vector(jax.random.key(1), params)
    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("data",))
    data = jax.device_put(data, NamedSharding(mesh, P("data")))
    op = hs.dataset_hvp(loss, params, data, batch_size=24)  # 4 batches of 24 + ragged 4
    out = flatten_util.ravel_pytree(op(v))[0]
    hlo = hs.curvature.apply_operator.lower(op, v).compile().as_text()
    shards = [len(x.sharding.device_set) for x in jax.tree_util.tree_leaves(data)]
    print(json.dumps({"devices": len(devices), "hvp": np.asarray(out).tolist(),
                      "all_reduce": "all-reduce" in hlo, "shards": shards}))
    """
)


def _run_sharded(num_devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, tests_dir], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_dataset_hvp_runs_data_parallel_on_four_cpu_devices():
    one, four = _run_sharded(1), _run_sharded(4)
    assert one["devices"] == 1 and four["devices"] == 4
    assert four["shards"] == [4, 4]
    # The per-batch products are split over devices and summed by an all-reduce.
    assert four["all_reduce"] and not one["all_reduce"]
    np.testing.assert_allclose(four["hvp"], one["hvp"], rtol=2e-5, atol=2e-6)


def test_partial_loss_with_bound_state_compiles_once():
    # Arrays bound in a Partial loss (e.g. frozen batch-norm statistics) are dynamic inputs.
    def scaled_loss(scale, params, batch):
        return 0.5 * jnp.mean((batch["x"] @ params) ** 2) * scale

    data = {"x": jnp.asarray(np.random.default_rng(0).normal(size=(20, 4)), jnp.float32)}
    v = jnp.ones(4)
    outs = []
    for scale in (1.0, 3.0):
        loss = jax.tree_util.Partial(scaled_loss, jnp.float32(scale))
        op = hs.dataset_hvp(loss, jnp.zeros(4), data, batch_size=8)
        with count_compilations() as n:
            outs.append(op(v))
            hs.dataset_value_and_grad(loss, jnp.ones(4), data, batch_size=8)
        if scale == 3.0:
            assert n[0] == 0
    np.testing.assert_allclose(outs[1], 3.0 * outs[0], rtol=1e-6)


def test_jit_of_every_operator_type_equals_the_operator():
    # Operators hash by identity (not by their arrays), so jax.jit(op) is an ordinary jitted
    # callable; it agrees with op(v) for the Hessian, the Gauss-Newton matrix and a block.
    params, outputs = mlp((4, 5, 3))
    rng = np.random.default_rng(3)
    data = {"x": rng.normal(size=(20, 4)).astype(np.float32), "y": rng.integers(0, 3, 20)}
    hessian = hs.dataset_hvp(loss_of(outputs), params, data, batch_size=8)
    ggn = hs.dataset_ggn(outputs, cross_entropy, params, data, batch_size=8)
    for op in (hessian, ggn, hs.restrict(hessian, "dense_1"), hs.restrict(ggn, ["dense_0"])):
        v = hs.random_start_vector(jax.random.key(1), op.like)
        want, got = op(v), jax.jit(op)(v)
        for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        assert hash(op) == hash(op) and op == op and op != hs.dataset_hvp(
            loss_of(outputs), params, data, batch_size=8)
