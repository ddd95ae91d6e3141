"""Gauss-Newton products and parameter blocks against dense float64 constructions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import flatten_util

import hessian_subspace as hs

from _helpers import count_compilations, cross_entropy, loss_of, mlp, squared_error


# Dense references are built under `jax.jit`: one compilation instead of op-by-op dispatch.
_dense_matrix = jax.jit(hs.dense_matrix)
_dense_hessian = jax.jit(hs.dense_hessian)


def _f64(tree):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), tree)


def _problem(task, *, hidden=(5, 4), num_outputs=3, n=12, seed=0, activation="softplus"):
    """A small MLP, its analysis set and the GGN's two functions (call inside enable_x64)."""
    params, outputs = mlp((4, *hidden, num_outputs), seed=seed, activation=activation)
    rng = np.random.default_rng(seed)
    x = _f64(rng.normal(size=(n, 4)))
    if task == "classification":
        y = jnp.asarray(rng.integers(0, num_outputs, n))
    else:
        y = _f64(rng.normal(size=(n, num_outputs)))
    data = {"x": x, "y": y}
    output_loss = cross_entropy if task == "classification" else squared_error
    return outputs, _f64(params), data, outputs, output_loss, loss_of(outputs, output_loss)


def _dense_ggn(output_fn, params, data, task):
    """(1/n) sum_a J_a^T H_l,a J_a with J from jacfwd and H_l written out by hand."""
    flat, unravel = flatten_util.ravel_pytree(params)
    outputs = np.asarray(jax.jit(output_fn)(params, data))
    jac = np.asarray(jax.jit(jax.jacfwd(lambda w, d: output_fn(unravel(w), d)))(flat, data))
    n, m = outputs.shape
    if task == "classification":
        z = np.exp(outputs - outputs.max(axis=1, keepdims=True))
        prob = z / z.sum(axis=1, keepdims=True)
        h_out = np.stack([np.diag(q) - np.outer(q, q) for q in prob])  # diag(p) - p p^T
    else:  # mean over all n * m entries of (f - y)^2: per example 2 I / m.
        h_out = np.broadcast_to(2.0 * np.eye(m) / m, (n, m, m))
    return np.einsum("amp,amc,acq->pq", jac, h_out, jac) / n


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_ggn_vp_and_dataset_ggn_match_dense_construction(task):
    with jax.enable_x64(True):
        model, params, data, output_fn, output_loss, loss = _problem(
            task, num_outputs=3 if task == "classification" else 2)
        # The output loss is the analysis loss of the model's outputs.
        np.testing.assert_allclose(float(output_loss(output_fn(params, data), data)),
                                   float(loss(params, data)), rtol=1e-14)
        g = _dense_ggn(output_fn, params, data, task)
        v = hs.random_start_vector(jax.random.key(1), params)
        got = jax.jit(hs.ggn_vp)(output_fn, output_loss, params, v, data)
        want = g @ np.asarray(flatten_util.ravel_pytree(v)[0])
        np.testing.assert_allclose(np.asarray(flatten_util.ravel_pytree(got)[0]), want,
                                   rtol=1e-10, atol=1e-13)
        # 12 examples in batches of 5: two full batches and a ragged one of 2.
        op = hs.dataset_ggn(output_fn, output_loss, params, data, batch_size=5)
        np.testing.assert_allclose(np.asarray(_dense_matrix(op, params)), g, rtol=1e-10,
                                   atol=1e-13)
        assert op.describe()["curvature"] == "ggn" and op.dim == g.shape[0]
        # Positive semi-definite (convex losses), to round-off.
        assert np.linalg.eigvalsh(g).min() >= -1e-12 * np.abs(g).max()


def test_ggn_equals_hessian_for_linear_models_only():
    with jax.enable_x64(True):
        for hidden, same in (((), True), ((5,), False)):
            model, params, data, output_fn, output_loss, loss = _problem("regression",
                                                                         hidden=hidden)
            ggn = np.asarray(_dense_matrix(
                hs.dataset_ggn(output_fn, output_loss, params, data, batch_size=5), params))
            hess = np.asarray(_dense_hessian(loss, params, data))
            gap = np.abs(ggn - hess).max() / np.abs(hess).max()
            if same:  # f linear in theta: H = J^T H_l J exactly.
                assert gap < 1e-12
            else:  # The second term, sum of dl/df times the Hessian of f, is not small.
                assert gap > 1e-2
                assert np.linalg.eigvalsh(hess).min() < -1e-8  # and H is indefinite.


def test_operators_compile_once_across_parameter_values():
    with jax.enable_x64(True):
        model, params, data, output_fn, output_loss, _ = _problem("classification")
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(np.float32(x)), params)
    data = {"x": jnp.asarray(np.float32(data["x"])), "y": jnp.asarray(np.int32(data["y"]))}
    v = hs.random_start_vector(jax.random.key(0), params)
    ops = lambda p: [hs.dataset_ggn(output_fn, output_loss, p, data, batch_size=5),  # noqa: E731
                     hs.restrict(hs.dataset_hvp(loss_of(model), p, data,
                                                batch_size=5), "dense_1")]
    for op in ops(params):  # warm-up compilations
        op(v if isinstance(op, hs.GGNOperator) else op.select(v))
    shifted = jax.tree_util.tree_map(lambda x: x + 0.1, params)
    with count_compilations() as n:
        for op in ops(shifted):
            jax.block_until_ready(op(v if isinstance(op, hs.GGNOperator) else op.select(v)))
    assert n[0] == 0


def _block_indices(params, prefix):
    return np.concatenate([np.arange(a, b) for name, a, b in hs.leaf_slices(params)
                           if name.startswith(prefix + "/")])


def test_restrict_is_the_dense_block_of_the_hessian_and_of_the_ggn():
    with jax.enable_x64(True):
        model, params, data, output_fn, output_loss, loss = _problem("classification")
        # The GGN's block is a block of the dense GGN.
        ggn_block = hs.restrict(
            hs.dataset_ggn(output_fn, output_loss, params, data, batch_size=5), "dense_0")
        idx = _block_indices(params, "dense_0")
        want = _dense_ggn(output_fn, params, data, "classification")[np.ix_(idx, idx)]
        np.testing.assert_allclose(np.asarray(_dense_matrix(ggn_block, ggn_block.like)), want,
                                   rtol=1e-10, atol=1e-13)
        assert ggn_block.describe()["curvature"] == "ggn"
        # The Hessian's block, its description, and the other ways of naming it.
        op = hs.dataset_hvp(loss, params, data, batch_size=5)
        full = np.asarray(_dense_hessian(loss, params, data))
        block = hs.restrict(op, "dense_1")
        idx = _block_indices(params, "dense_1")
        np.testing.assert_array_equal(block.flat_indices, idx)
        assert block.dim == idx.size == 5 * 4 + 4
        assert block.leaf_names == ("dense_1/bias", "dense_1/kernel")
        assert [n for n, _, _ in hs.leaf_slices(block.like)] == list(block.leaf_names)
        want = full[np.ix_(idx, idx)]
        np.testing.assert_allclose(np.asarray(_dense_matrix(block, block.like)), want,
                                   rtol=1e-10, atol=1e-13)
        info = block.describe()
        assert info["curvature"] == "hessian" and info["block"]["num_params"] == idx.size
        # The same block from a pytree mask and from two prefixes of one layer.
        mask = jax.tree_util.tree_map(lambda _: False, params)
        mask["dense_1"] = {"kernel": True, "bias": True}
        for subset in (mask, ["dense_1/kernel", "dense_1/bias"]):
            assert hs.restrict(op, subset).mask == block.mask
        # Lanczos on a block against eigh of the dense block: in test_pipeline.py
        # (test_block_analysis_and_ggn_alongside_match_dense_blocks), which compiles it anyway.


def test_restrict_prefixes_match_whole_path_components_and_bad_subsets_raise():
    params = {"dense_1": {"kernel": jnp.zeros((2, 2))}, "dense_10": {"kernel": jnp.zeros(3)},
              "out": jnp.zeros(1)}
    identity = lambda v: v  # noqa: E731
    block = hs.restrict(identity, "dense_1", like=params)
    assert block.leaf_names == ("dense_1/kernel",) and block.dim == 4
    v = {"dense_1": {"kernel": jnp.ones((2, 2))}, "dense_10": {"kernel": None}, "out": None}
    np.testing.assert_array_equal(block(v)["dense_1"]["kernel"], jnp.ones((2, 2)))
    assert hs.restrict(identity, ("dense_10", "out"), like=params).dim == 4
    with pytest.raises(ValueError, match="matches no parameter"):
        hs.restrict(identity, "dense_2", like=params)
    with pytest.raises(ValueError, match="selects no parameter"):
        hs.restrict(identity, jax.tree_util.tree_map(lambda _: False, params), like=params)
    with pytest.raises(ValueError, match="`like` is required"):
        hs.restrict(identity, "out")
