"""Models of the paper: shapes, parameter counts, training, and the deterministic analysis loss."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import flatten_util

import hessian_subspace as hs
from hessian_subspace.paper import models
from hessian_subspace.training import tasks

CIFAR = (32, 32, 3)
FULL_CONVNET = dict(dropout=True, batch_norm=True, extra_dense=True)


def _batch(shape, n=4, num_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": jnp.asarray(rng.normal(size=(n, *shape)), jnp.float32),
            "y": jnp.asarray(rng.integers(0, num_classes, n), jnp.int32)}


def _init(model, shape, seed=0):
    """Jitted `init_variables` (eager init compiles every initialiser op by op: slower)."""
    fn = jax.jit(lambda key: tasks.init_variables(model, key, jnp.ones((1, *shape))))
    return fn(jax.random.key(seed))


def _abstract_init(model, shape):
    return jax.eval_shape(
        lambda key: tasks.init_variables(model, key, jnp.ones((1, *shape))), jax.random.key(0))


def _numpy_init(model, shape, seed=0):
    """He-normal kernels, zero biases, unit scales: avoids compiling flax's initialisers (~10 s
    for ResNet-18 on 2 CPU cores)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(path[-1].key)
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in), leaf.dtype)
        return jnp.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, _abstract_init(model, shape))


@functools.lru_cache(maxsize=None)
def _sgd_step(model, task, learning_rate):
    """Jitted SGD-with-momentum step; cached so tests sharing a model share its compilation."""
    loss_fn = tasks.train_loss_fn(model, task)
    tx = optax.sgd(learning_rate, momentum=0.9)

    @jax.jit
    def step(params, state, opt_state, batch, key):
        (loss, (state, outputs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, state, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, loss, outputs

    return tx, step


def _trees_equal(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return (jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
            and all(np.array_equal(np.asarray(x), np.asarray(y))
                    for x, y in zip(leaves_a, leaves_b, strict=True)))


@pytest.fixture(scope="module")
def full_convnet():
    """ConvNet dropout + batch-norm + extra dense on 16x16x3 images (any size >= 10 works)."""
    model = models.build_model("convnet", num_outputs=10, **FULL_CONVNET)
    params, state = _numpy_init(model, (16, 16, 3))
    return model, params, state, _batch((16, 16, 3), n=8, seed=1)


# ------------------------------------------------------------------------ shapes and counts


@pytest.mark.parametrize("name,kwargs,shape,num_outputs", [
    ("softmax", {}, (28, 28, 1), 10),
    ("fc", dict(hidden=(7, 5), activation="tanh"), (6,), 3),
    ("fc_regression", dict(hidden=(8, 8), activation="softplus"), (1,), 1),
    ("small_convnet", dict(channels=(2, 3)), (8, 8, 1), 4),
    ("convnet", FULL_CONVNET, CIFAR, 10),
    ("resnet18", {}, CIFAR, 10),
])
def test_output_shapes_in_both_modes(name, kwargs, shape, num_outputs):
    model = models.build_model(name, num_outputs=num_outputs, **kwargs)
    params, state = _abstract_init(model, shape)
    x = jnp.ones((2, *shape))
    variables = {"params": params, **state}
    out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    assert out.shape == (2, num_outputs)
    new_state, out_train = jax.eval_shape(
        lambda v: tasks.train_loss_fn(model, "classification")(
            v["params"], {k: v[k] for k in state}, {"x": x, "y": jnp.zeros(2, jnp.int32)},
            jax.random.key(0))[1],
        variables)
    assert out_train.shape == (2, num_outputs)
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)


@pytest.mark.parametrize("name,kwargs,shape,count", [
    ("fc", dict(hidden=(100, 100)), (784,), 89_610),
    ("softmax", {}, (28, 28, 1), 7_850),
    ("convnet", {}, CIFAR, 1_250_858),
    ("resnet18", {}, CIFAR, 11_173_962),
])
def test_parameter_counts(name, kwargs, shape, count):
    model = models.build_model(name, num_outputs=10, **kwargs)
    params, state = _abstract_init(model, shape)
    assert models.param_count(params) == count
    assert set(state) == ({"batch_stats"} if name == "resnet18" else set())


def test_layer_names():
    mlp, _ = _abstract_init(models.build_model("fc", num_outputs=10), (784,))
    assert list(mlp) == ["dense_0", "dense_1", "dense_2"]
    conv, state = _abstract_init(models.build_model("convnet", num_outputs=10, **FULL_CONVNET),
                                 CIFAR)
    assert sorted(conv) == sorted(
        [f"conv_{i}" for i in range(4)] + [f"bn_conv_{i}" for i in range(4)]
        + ["dense_0", "dense_1", "bn_dense_0", "bn_dense_1", "dense_out"])
    assert sorted(state["batch_stats"]) == sorted(k for k in conv if k.startswith("bn_"))
    resnet, _ = _abstract_init(models.build_model("resnet18", num_outputs=10), CIFAR)
    assert "shortcut_conv" in resnet["stage_2_block_0"]
    assert "shortcut_conv" not in resnet["stage_1_block_0"]
    assert "bias" not in resnet["conv_stem"]


def test_resnet18_downsamples_like_pytorch():
    model = models.ResNet18(num_outputs=10)
    params, state = _abstract_init(model, CIFAR)
    stage_4 = params["stage_4_block_0"]
    assert stage_4["conv_0"]["kernel"].shape == (3, 3, 256, 512)
    assert stage_4["shortcut_conv"]["kernel"].shape == (1, 1, 256, 512)
    # 32 -> 32 -> 16 -> 8 -> 4 before pooling: capture the last block's output shape.
    _, inter = jax.eval_shape(
        lambda v: model.apply(v, jnp.ones((1, *CIFAR)), capture_intermediates=True,
                              mutable=["intermediates"]), {"params": params, **state})
    assert inter["intermediates"]["stage_4_block_1"]["__call__"][0].shape == (1, 4, 4, 512)


# ---------------------------------------------------------------------------------- training


def _assert_training_reduces_loss(model, params, state, batch, task, num_steps=8):
    tx, step = _sgd_step(model, task, learning_rate=0.02)
    opt_state = tx.init(params)
    eval_key = jax.random.key(7)  # same dropout mask before and after training
    loss_fn = jax.jit(tasks.train_loss_fn(model, task))
    before = float(loss_fn(params, state, batch, eval_key)[0])
    for i in range(num_steps):
        params, state, opt_state, loss, _ = step(params, state, opt_state, batch,
                                                 jax.random.key(100 + i))
        assert np.isfinite(float(loss))
    after = float(loss_fn(params, state, batch, eval_key)[0])
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("name,kwargs,shape,task", [
    ("softmax", {}, (12,), "classification"),
    ("fc", dict(hidden=(16, 16), activation="softplus"), (12,), "classification"),
    ("fc_regression", dict(hidden=(16, 16), activation="tanh"), (1,), "regression"),
    ("small_convnet", dict(channels=(4, 8)), (8, 8, 1), "classification"),
])
def test_sgd_steps_reduce_training_loss(name, kwargs, shape, task):
    num_outputs = 1 if task == "regression" else 4
    model = models.build_model(name, num_outputs=num_outputs, **kwargs)
    params, state = _init(model, shape)
    batch = _batch(shape, n=8, num_classes=4, seed=2)
    if task == "regression":
        batch["y"] = jnp.sin(3.0 * batch["x"])
    _assert_training_reduces_loss(model, params, state, batch, task)


def test_sgd_steps_reduce_training_loss_of_full_convnet(full_convnet):
    model, params, state, batch = full_convnet
    _assert_training_reduces_loss(model, params, state, batch, "classification")


def test_resnet18_trains_and_updates_batch_stats():
    model = models.build_model("resnet18", num_outputs=10)
    params, state = _numpy_init(model, CIFAR)
    batch = _batch(CIFAR, n=4, seed=3)
    tx, step = _sgd_step(model, "classification", learning_rate=0.05)
    opt_state = tx.init(params)
    new_params, new_state, opt_state, loss0, outputs = step(params, state, tx.init(params),
                                                            batch, None)
    assert outputs.shape == (4, 10)
    assert not _trees_equal(new_state, state)
    _, _, _, loss1, _ = step(new_params, new_state, opt_state, batch, None)
    assert float(loss1) < float(loss0)


# ---------------------------------------------------------------- the analysis loss contract


def test_analysis_loss_and_hvp_are_deterministic(full_convnet):
    model, params, state, batch = full_convnet
    loss = hs.curvature.bind_state(tasks.inference_loss(model, "classification"), state)
    value = jax.jit(loss)
    assert np.array_equal(np.asarray(value(params, batch)), np.asarray(value(params, batch)))
    v = hs.random_start_vector(jax.random.key(5), params)
    hvp = jax.jit(hs.hvp, static_argnums=0)  # eager HVPs run op by op: slow
    hv1 = hvp(loss, params, v, batch)
    hv2 = hvp(loss, params, v, batch)
    assert _trees_equal(hv1, hv2)
    assert float(flatten_util.ravel_pytree(hv1)[0] @ flatten_util.ravel_pytree(v)[0]) != 0.0

    train = jax.jit(tasks.train_loss_fn(model, "classification"))
    key_a, key_b = jax.random.key(1), jax.random.key(2)
    assert float(train(params, state, batch, key_a)[0]) == float(
        train(params, state, batch, key_a)[0])
    assert float(train(params, state, batch, key_a)[0]) != float(
        train(params, state, batch, key_b)[0])


def test_batch_stats_move_in_training_and_are_frozen_in_analysis(full_convnet):
    model, params, state, batch = full_convnet
    state_copy = jax.tree_util.tree_map(np.array, state)
    tx, step = _sgd_step(model, "classification", learning_rate=0.02)
    _, trained_state, _, _, _ = step(params, state, tx.init(params), batch, jax.random.key(0))
    assert _trees_equal(state, state_copy)  # inputs are not mutated
    assert not _trees_equal(trained_state, state)
    # Running averages move by 0.1 towards the batch statistics (momentum 0.9, from 0 and 1).
    conv_0 = np.asarray(nn.Conv(32, (3, 3), padding="SAME").apply(
        {"params": params["conv_0"]}, batch["x"]), np.float64)
    stats = trained_state["batch_stats"]["bn_conv_0"]
    np.testing.assert_allclose(stats["mean"], 0.1 * conv_0.mean(axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * conv_0.var(axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-6)

    trained_copy = jax.tree_util.tree_map(np.array, trained_state)
    loss = jax.jit(lambda p, s, b: tasks.inference_loss(model, "classification")(p, b, s))
    value = loss(params, trained_state, batch)
    assert _trees_equal(trained_state, trained_copy)
    # Frozen statistics: examples do not interact, so the batch mean is the mean of singletons.
    singles = [loss(params, trained_state, {"x": batch["x"][i:i + 1], "y": batch["y"][i:i + 1]})
               for i in range(batch["x"].shape[0])]
    np.testing.assert_allclose(float(value), float(np.mean(singles)), rtol=1e-5)
    # ...and they are the ones in model_state: other statistics give another loss.
    assert float(loss(params, state, batch)) != float(value)


def test_regression_mse_matches_numpy():
    model = models.build_model("fc_regression", num_outputs=1, hidden=(5, 4), activation="tanh")
    params, state = _init(model, (1,))
    rng = np.random.default_rng(4)
    x = rng.uniform(-np.pi, np.pi, size=(9, 1)).astype(np.float32)
    y = np.sin(x).astype(np.float32)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    h = np.tanh(x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"])
    h = np.tanh(h @ p["dense_1"]["kernel"] + p["dense_1"]["bias"])
    f = h @ p["dense_2"]["kernel"] + p["dense_2"]["bias"]
    want = np.mean((f - y) ** 2)
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    got = hs.curvature.bind_state(tasks.inference_loss(model, "regression"), state)(params, batch)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    train_loss, (_, outputs) = tasks.train_loss_fn(model, "regression")(params, state, batch,
                                                                           None)
    np.testing.assert_allclose(float(train_loss), want, rtol=1e-5)
    assert tasks.batch_metrics(outputs, batch, "regression").keys() == {"loss"}
    np.testing.assert_allclose(
        float(tasks.batch_metrics(outputs, batch, "regression")["loss"]), want, rtol=1e-5)


def test_batch_metrics_classification():
    outputs = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [0.0, 5.0, 1.0], [1.0, 0.0, 0.0]])
    y = jnp.array([0, 1, 1, 2])
    metrics = tasks.batch_metrics(outputs, {"y": y}, "classification")
    o = np.asarray(outputs, np.float64)
    log_p = o - np.log(np.sum(np.exp(o), axis=1, keepdims=True))
    np.testing.assert_allclose(float(metrics["loss"]), -np.mean(log_p[np.arange(4), y]),
                               rtol=1e-6)
    assert float(metrics["accuracy"]) == 0.5


def test_inference_loss_of_a_stateless_model_is_the_plain_cross_entropy():
    model = models.build_model("fc", num_outputs=3, hidden=(6,))
    params, state = _init(model, (5,))
    assert state == {}
    assert _trees_equal(params, models.init_params(model, jax.random.key(0), jnp.ones((1, 5))))
    batch = _batch((5,), n=6, num_classes=3)
    logits = model.apply({"params": params}, batch["x"])
    want = float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])))
    loss = tasks.inference_loss(model, "classification")
    np.testing.assert_allclose(float(loss(params, batch, state)), want, rtol=1e-6)
    np.testing.assert_allclose(float(tasks.cross_entropy_loss(model)(params, batch)), want,
                               rtol=1e-6)
    assert float(tasks.batch_metrics(logits, batch, "classification")["accuracy"]) == float(
        jnp.mean(jnp.argmax(logits, -1) == batch["y"]))


# ------------------------------------------------------------------------------ parameters


def test_layer_slices_tile_and_match_ravel_order(full_convnet):
    _, params, _, _ = full_convnet
    tree = {"net": params, "extra": [jnp.arange(3.0), {"w": jnp.ones((2, 2))}]}
    flat, _ = flatten_util.ravel_pytree(tree)
    slices = hs.leaf_slices(tree)
    assert slices[0][1] == 0 and slices[-1][2] == flat.size == models.param_count(tree)
    assert all(prev[2] == cur[1] for prev, cur in zip(slices[:-1], slices[1:], strict=True))
    assert len({name for name, _, _ in slices}) == len(slices)

    def lookup(name):
        node = tree
        for part in name.split("/"):
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node

    for name, start, stop in slices:
        np.testing.assert_array_equal(np.asarray(flat[start:stop]),
                                      np.ravel(np.asarray(lookup(name))))
    names = [name for name, _, _ in slices]
    assert "net/dense_out/kernel" in names and "extra/1/w" in names


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("call,match", [
    (lambda: models.build_model("vgg", num_outputs=10), "vgg"),
    (lambda: models.build_model("fc", num_outputs=10, width=3), "width"),
    (lambda: models.build_model("softmax", num_outputs=10, hidden=(3,)), "hidden"),
    (lambda: models.build_model("resnet18", num_outputs=10, dropout=True), "dropout"),
    (lambda: models.build_model("convnet", num_outputs=10, batchnorm=True), "batchnorm"),
    (lambda: models.build_model("fc", num_outputs=10, activation="gelu"), "gelu"),
    (lambda: models.build_model("fc", num_outputs=10, hidden=(0,)), "hidden"),
    (lambda: models.build_model("fc", num_outputs=0), "num_outputs"),
    (lambda: hs.curvature.bind_state(tasks.inference_loss(models.MLP(), "ranking"), {}), "ranking"),
    (lambda: tasks.train_loss_fn(models.MLP(), "ranking"), "ranking"),
    (lambda: tasks.batch_metrics(jnp.zeros((2, 1)), {"y": jnp.zeros(2)}, "ranking"), "ranking"),
    (lambda: tasks.batch_metrics(jnp.zeros((2, 1)), {"y": jnp.zeros(2)}, "regression"),
     "shape"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_initialisers_change_the_scale_as_named():
    stds = {}
    for name in ("lecun_normal", "he_normal", "glorot_uniform", "lecun_truncated_normal"):
        p = models.init_params(models.build_model("fc", num_outputs=10, hidden=(300,),
                                                  initializer=name),
                               jax.random.key(0), jnp.ones((1, 784)))
        stds[name] = float(jnp.std(p["dense_0"]["kernel"]))
    np.testing.assert_allclose(stds["lecun_normal"], np.sqrt(1 / 784), rtol=0.02)
    np.testing.assert_allclose(stds["he_normal"], np.sqrt(2 / 784), rtol=0.02)
    np.testing.assert_allclose(stds["glorot_uniform"], np.sqrt(2 / (784 + 300)), rtol=0.02)
    np.testing.assert_allclose(stds["lecun_truncated_normal"], np.sqrt(1 / 784), rtol=0.02)
    # The default is flax's own lecun_normal: parameters of existing runs do not change.
    key, shape = jax.random.key(3), (784, 300)
    np.testing.assert_array_equal(models.kernel_init(models.DEFAULT_INIT)(key, shape),
                                  nn.initializers.lecun_normal()(key, shape))
    default = models.init_params(models.build_model("fc", num_outputs=10, hidden=(300,)),
                                 jax.random.key(0), jnp.ones((1, 784)))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool(jnp.array_equal(a, b)), default, models.init_params(
            models.build_model("fc", num_outputs=10, hidden=(300,),
                               initializer="lecun_truncated_normal"),
            jax.random.key(0), jnp.ones((1, 784)))))
