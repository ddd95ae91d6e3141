"""One loss contract for every JAX model: the same chain on the same function written as a plain
function of dict parameters, a flax linen module, a flax nnx module and an Equinox module gives
the same numbers, each equal to a dense float64 reference built from that framework's loss; nnx
BatchNorm statistics enter as the per-checkpoint state; nnx parameters round-trip through a
user's orbax directory."""

import equinox as eqx
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax import flatten_util

from hessian_subspace import analysis
from hessian_subspace.paper import data

RNG = np.random.default_rng(0)
W1, B1 = RNG.normal(size=(4, 6)).astype(np.float32) * 0.7, RNG.normal(size=6).astype(np.float32)
W2, B2 = RNG.normal(size=(6, 3)).astype(np.float32) * 0.7, RNG.normal(size=3).astype(np.float32)
DS = data.gaussian_mixture(num_classes=3, dim=4, num_examples=120, sigma=0.6, seed=5)
DATA = {"x": DS["x"], "y": DS["y"]}


def _ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def plain():
    params = {"w1": jnp.asarray(W1), "b1": jnp.asarray(B1), "w2": jnp.asarray(W2),
              "b2": jnp.asarray(B2)}

    def loss_fn(params, batch):
        h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
        return _ce(h @ params["w2"] + params["b2"], batch["y"])

    return params, loss_fn


class _Linen(linen.Module):
    @linen.compact
    def __call__(self, x):
        h = jnp.tanh(linen.Dense(6, name="hidden")(x))
        return linen.Dense(3, name="out")(h)


def flax_linen():
    model = _Linen()
    params = {"hidden": {"kernel": jnp.asarray(W1), "bias": jnp.asarray(B1)},
              "out": {"kernel": jnp.asarray(W2), "bias": jnp.asarray(B2)}}
    template = model.init(jax.random.key(0), DATA["x"][:1])["params"]
    assert jax.tree_util.tree_map(jnp.shape, template) == jax.tree_util.tree_map(jnp.shape, params)

    def loss_fn(params, batch):
        return _ce(model.apply({"params": params}, batch["x"]), batch["y"])

    return params, loss_fn


class _Nnx(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(4, 6, rngs=rngs)
        self.l2 = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def flax_nnx():
    model = _Nnx(nnx.Rngs(0))
    model.l1.kernel[...], model.l1.bias[...] = jnp.asarray(W1), jnp.asarray(B1)
    model.l2.kernel[...], model.l2.bias[...] = jnp.asarray(W2), jnp.asarray(B2)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(params, batch):
        return _ce(nnx.merge(graphdef, params)(batch["x"]), batch["y"])

    return params, loss_fn


class _Eqx(eqx.Module):
    l1: eqx.nn.Linear
    l2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.l1 = eqx.nn.Linear(4, 6, key=k1)
        self.l2 = eqx.nn.Linear(6, 3, key=k2)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def equinox():
    model = _Eqx(jax.random.key(0))
    model = eqx.tree_at(lambda m: (m.l1.weight, m.l1.bias, m.l2.weight, m.l2.bias), model,
                        (jnp.asarray(W1.T), jnp.asarray(B1), jnp.asarray(W2.T),
                         jnp.asarray(B2)))
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss_fn(params, batch):
        return _ce(jax.vmap(eqx.combine(params, static))(batch["x"]), batch["y"])

    return params, loss_fn


FRAMEWORKS = {"plain": plain, "linen": flax_linen, "nnx": flax_nnx, "equinox": equinox}


def _chain():
    return analysis.chain(analysis.loss(), analysis.gradient(), analysis.eigenpairs(k=6, tol=1e-5),
                          analysis.f_top(k=3, num_minibatches=0), analysis.overlap_g_hg(),
                          analysis.layers(), analysis.subspace_overlap(k=3, reference_steps=(0,)))


def _moved(params):
    return jax.tree_util.tree_map(lambda x: x * 1.1 + 0.05, params)


def _dense_f_top(loss_fn, params, k):
    with jax.enable_x64(True):
        flat, unravel = flatten_util.ravel_pytree(
            jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params))
        batch = {"x": jnp.asarray(DATA["x"], jnp.float64), "y": jnp.asarray(DATA["y"])}
        f = lambda w: loss_fn(unravel(w), batch)  # noqa: E731
        g, h = np.asarray(jax.grad(f)(flat)), np.asarray(jax.hessian(f)(flat))
    w, v = np.linalg.eigh(h)
    top = v[:, np.argsort(-w)[:k]].T
    return float(np.sum((top @ g) ** 2) / (g @ g)), np.sort(w)[::-1]


@pytest.fixture(scope="module")
def records():
    out = {}
    for name, make in FRAMEWORKS.items():
        params, loss_fn = make()
        analyzer = analysis.Analyzer(_chain(), loss_fn, data=DATA, batch_size=50,
                                     results=analysis.Results(progress=False))
        out[name] = (params, loss_fn, [analyzer.process(0, params),
                                       analyzer.process(5, _moved(params))])
    return out


@pytest.mark.parametrize("name", sorted(FRAMEWORKS))
def test_every_framework_through_the_same_chain(records, name):
    params, loss_fn, recs = records[name]
    reference = records["plain"][2]
    for rec, ref, p in zip(recs, reference, (params, _moved(params)), strict=True):
        assert rec["status"] == "ok" and rec["all_converged"]
        f_top, lam = _dense_f_top(loss_fn, p, 3)
        np.testing.assert_allclose(rec["f_top"], f_top, atol=1e-5)
        np.testing.assert_allclose(rec["eigenvalues"], lam[:6], rtol=1e-4, atol=1e-6)
        # The same function in another framework: the same numbers (parameters permuted).
        for key in ("train_loss", "grad_norm", "f_top", "f_next", "overlap_g_hg", "lambda_max"):
            np.testing.assert_allclose(rec[key], ref[key], rtol=2e-4, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(sum(rec["top_eigenvector_layer_mass"].values()), 1.0,
                                   rtol=1e-5)
        assert list(rec["top_eigenvector_layer_mass"]) == [
            n for n, _, _ in analysis.builtins._tree.leaf_slices(params)]
    np.testing.assert_allclose(recs[1]["subspace_overlap"]["0"]["top3"],
                               reference[1]["subspace_overlap"]["0"]["top3"], rtol=1e-3)


class _NnxBn(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(4, 6, rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)
        self.l2 = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.bn(self.l1(x))))


def test_nnx_batchnorm_statistics_are_the_per_checkpoint_state(tmp_path):
    model = _NnxBn(nnx.Rngs(0))
    model.eval()  # BatchNorm on its running statistics: a fixed operator
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    def loss_fn(params, batch, state):
        return _ce(nnx.merge(graphdef, params, state)(batch["x"]), batch["y"])

    shifted = jax.tree_util.tree_map(lambda x: x + 0.5, stats)
    analyzer = analysis.Analyzer(_chain(), loss_fn, data=DATA, batch_size=50,
                                 results=analysis.Results(progress=False))
    a = analyzer.process(0, params, stats)
    b = analyzer.process(1, params, shifted)  # same parameters, other statistics
    assert abs(a["train_loss"] - b["train_loss"]) > 1e-3
    for rec, state in ((a, stats), (b, shifted)):
        f_top, lam = _dense_f_top(lambda p, batch, s=state: loss_fn(p, batch, s), params, 3)
        np.testing.assert_allclose(rec["f_top"], f_top, atol=1e-5)
        np.testing.assert_allclose(rec["eigenvalues"][:3], lam[:3], rtol=1e-4)
    with pytest.raises(TypeError, match="takes a model state"):
        analyzer.process(2, params)
    # The user saves nnx states with orbax; the source restores them into the same structure.
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpts"))
    mngr.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                         stats=ocp.args.StandardSave(shifted)))
    mngr.wait_until_finished()
    mngr.close()
    source = analysis.orbax_checkpoints(str(tmp_path / "ckpts"), like=params, item="params",
                                        state_like=stats, state_item="stats")
    restored, restored_stats = source.load(0)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(params)
    assert jax.tree_util.tree_structure(restored_stats) == jax.tree_util.tree_structure(stats)
    (rec,) = analysis.Analyzer(_chain(), loss_fn, data=DATA, batch_size=50,
                               results=analysis.Results(progress=False),
                               schedule=analysis.Schedule(on_steps=(0,))).run(source)
    # float32: the restored arrays compile to their own program (the cached linearisation's
    # fusion may differ), so round-off, not bits.
    np.testing.assert_allclose(rec["f_top"], b["f_top"], rtol=1e-5)
    np.testing.assert_allclose(rec["eigenvalues"], b["eigenvalues"], rtol=1e-5)
