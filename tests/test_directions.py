"""loss_decrease and loss_landscape against closed forms (a quadratic: least squares, where the
second-order prediction is exact and every slice a parabola), against direct float64 loss
evaluations and numpy eigenvectors on a small network, and against hand-written optimizer
steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import flatten_util

from hessian_subspace import analysis
from hessian_subspace.analysis import directions, step as step_lib
from hessian_subspace.training import tasks

from _pipeline import CE, dense_reference, tiny_problem


def _least_squares(seed=0, n=64, p=6):
    rng = np.random.default_rng(seed)
    scales = np.array([3.0, 2.0, 1.0, 0.3, 0.1, 0.05])[:p]
    x = rng.normal(size=(n, p)) * scales
    y = rng.normal(size=n)
    return {"x": x, "y": y}, {"w": rng.normal(size=p)}


def _ls_loss(params, batch):
    r = batch["x"] @ params["w"] - batch["y"]
    return 0.5 * jnp.mean(r * r)


def _run(chain, params, loss_fn, data, extras=None, step=3, batch_size=16):
    ctx = step_lib.context(step, params, loss_fn, data, batch_size=batch_size, extras=extras)
    return step_lib.apply(chain, ctx, chain.init(ctx))


def _closed_form(data, params, lr):
    x, y, w = data["x"], data["y"], np.asarray(params["w"])
    h = x.T @ x / len(y)
    g = x.T @ (x @ w - y) / len(y)
    vals, vecs = np.linalg.eigh(h)
    return g, h, vecs[:, ::-1].T, vals[::-1]


def test_loss_decrease_on_a_quadratic_is_its_closed_form():
    data, params = _least_squares()
    lr, k = 0.3, 2
    nxt = {"x": data["x"][:8], "y": data["y"][:8]}
    with jax.enable_x64(True):
        chain = analysis.chain(analysis.gradient(), analysis.eigenpairs(4, tol=1e-10),
                               directions.loss_decrease(k, learning_rate=lr,
                                                        optimizer=optax.sgd(lr)))
        out = _run(chain, params, _ls_loss, data, extras={"next_batch": nxt}).record
    g, h, v, w = _closed_form(data, params, lr)
    top = v[:k].T @ v[:k]
    for kind, u in (("gd", -lr * g),
                    ("step", -lr * nxt["x"].T @ (nxt["x"] @ params["w"] - nxt["y"]) / 8)):
        rec = out["loss_decrease"][kind]
        parts = {"full": u, "top": top @ u, "bulk": u - top @ u}
        for part, d in parts.items():
            exact = g @ d + 0.5 * d @ h @ d  # a quadratic: the change is its Taylor series
            np.testing.assert_allclose(rec[part], exact, rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(rec[f"predicted_{part}"], exact, rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(rec[f"slope_{part}"], g @ d, rtol=1e-10, atol=1e-14)
        # Exact eigenvectors: no cross term, the parts add up.
        np.testing.assert_allclose(rec["top"] + rec["bulk"], rec["full"], rtol=1e-8)
        np.testing.assert_allclose(rec["bulk_share"],
                                   rec["bulk"] / (rec["top"] + rec["bulk"]), rtol=1e-12)
        np.testing.assert_allclose(rec["top_fraction"], (u @ top @ u) / (u @ u), rtol=1e-10)
    assert out["loss_decrease"]["step"]["gradient_from"] == "next_batch"
    assert out["loss_decrease"]["step"]["batch_examples"] == 8
    assert out["loss_decrease"]["gd"]["learning_rate"] == lr
    assert out["hvps"] >= 4  # two curvature products per update


def test_loss_decrease_on_a_network_matches_direct_float64_losses():
    model, ds, params, state = tiny_problem()
    loss_fn = tasks.inference_loss(model, CE)
    lr, k = 0.5, 3
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params)
        chain = analysis.chain(analysis.gradient(), analysis.eigenpairs(k, tol=1e-10),
                               directions.loss_decrease(k, learning_rate=lr))
        ctx = step_lib.context(0, p64, loss_fn, {"x": np.asarray(ds["x"], np.float64),
                                                  "y": ds["y"]}, state=state, batch_size=32)
        rec = step_lib.apply(chain, ctx, chain.init(ctx)).record["loss_decrease"]["gd"]
        value, g, h, w, v = dense_reference(model, ds, params)
        flat, unravel = flatten_util.ravel_pytree(p64)
        batch = {"x": jnp.asarray(ds["x"], jnp.float64), "y": jnp.asarray(ds["y"])}

        def loss_at(x):
            return float(loss_fn(unravel(jnp.asarray(x)), batch, state))

        u = -lr * g
        top = v[:k].T @ (v[:k] @ u)
        for part, d in (("full", u), ("top", top), ("bulk", u - top)):
            direct = loss_at(np.asarray(flat) + d) - value
            np.testing.assert_allclose(rec[part], direct, rtol=1e-9, atol=1e-13)
            np.testing.assert_allclose(rec[f"predicted_{part}"], g @ d + 0.5 * d @ h @ d,
                                       rtol=1e-8, atol=1e-13)
    np.testing.assert_allclose(rec["loss"], value, rtol=1e-12)
    # A real network: the second-order prediction is close for a small step, not exact.
    assert abs(rec["full"] - rec["predicted_full"]) < 0.2 * abs(rec["full"])


def test_loss_decrease_takes_adams_step_from_the_checkpoints_optimizer_state():
    data, params = _least_squares(seed=1)
    tx = optax.adam(0.05)
    with jax.enable_x64(True):
        opt_state = tx.init(params)
        p = params
        for i in range(3):  # a few real steps so that both moments are non-trivial
            gr = jax.grad(_ls_loss)(p, {"x": data["x"][i::3], "y": data["y"][i::3]})
            upd, opt_state = tx.update(gr, opt_state, p)
            p = optax.apply_updates(p, upd)
        nxt = {"x": data["x"][:16], "y": data["y"][:16]}
        # As a checkpoint restores it: nested dicts and lists, not optax's NamedTuples.
        restored = [{"count": opt_state[0].count, "mu": {"w": opt_state[0].mu["w"]},
                     "nu": {"w": opt_state[0].nu["w"]}}, None]
        chain = analysis.chain(analysis.gradient(), analysis.eigenpairs(2, tol=1e-10),
                               directions.loss_decrease(1, optimizer=tx))
        rec = _run(chain, p, _ls_loss, data,
                   extras={"next_batch": nxt, "optimizer": restored}).record
        # Adam by hand: bias-corrected moments after one more gradient.
        gb = np.asarray(jax.grad(_ls_loss)(p, nxt)["w"])
        mu = 0.9 * np.asarray(opt_state[0].mu["w"]) + 0.1 * gb
        nu = 0.999 * np.asarray(opt_state[0].nu["w"]) + 0.001 * gb**2
        c = 4
        u = -0.05 * (mu / (1 - 0.9**c)) / (np.sqrt(nu / (1 - 0.999**c)) + 1e-8)
        g, h, *_ = _closed_form(data, p, 0)
    got = rec["loss_decrease"]["step"]
    np.testing.assert_allclose(got["update_norm"], np.linalg.norm(u), rtol=1e-10)
    np.testing.assert_allclose(got["full"], g @ u + 0.5 * u @ h @ u, rtol=1e-9)
    assert "gd" not in rec["loss_decrease"]


def test_loss_decrease_refuses_what_it_cannot_measure():
    data, params = _least_squares()
    with pytest.raises(ValueError, match="learning_rate"):
        directions.loss_decrease(2)
    with pytest.raises(ValueError, match="learning_rate"):
        directions.loss_decrease(2, learning_rate=-1.0)
    with pytest.raises(TypeError, match="optimizer"):
        directions.loss_decrease(2, optimizer="adam")
    # Adam without its state in the extras: a clear error, not a step from a zero state.
    chain = analysis.chain(analysis.gradient(), analysis.eigenpairs(2),
                           directions.loss_decrease(1, optimizer=optax.adam(1e-3)))
    with pytest.raises(ValueError, match="optimizer=True"):
        _run(chain, jax.tree_util.tree_map(np.float32, params), _ls_loss, data)
    with pytest.raises(ValueError, match="not the optimizer"):
        _run(chain, jax.tree_util.tree_map(np.float32, params), _ls_loss, data,
             extras={"optimizer": {"trace": {"v": np.zeros(6)}}})
    # More top directions than the eigenpairs hold: refused by the chain before any work.
    with pytest.raises(ValueError):
        analysis.chain(analysis.gradient(), analysis.eigenpairs(2),
                       directions.loss_decrease(3, learning_rate=0.1))


def test_landscape_slices_of_a_quadratic_are_its_parabolas():
    data, params = _least_squares()
    k = 2
    with jax.enable_x64(True):
        chain = analysis.chain(analysis.gradient(), analysis.eigenpairs(4, tol=1e-10),
                               directions.loss_landscape(k, num_points=7, radius=0.5,
                                                         surface_points=5))
        res = _run(chain, params, _ls_loss, data)
    rec = res.record["loss_landscape"]
    g, h, v, w = _closed_form(data, params, 0)
    t = np.asarray(rec["t"])
    np.testing.assert_allclose(t, np.linspace(-0.5, 0.5, 7))
    assert set(rec["slices"]) == {"top1", "top2", "bulk1", "bulk2", "random1", "random2",
                                  "gradient"}
    for s in rec["slices"].values():
        # The direction itself is not recorded; slope and curvature determine the parabola.
        parabola = t * s["slope"] + 0.5 * t**2 * s["curvature"]
        np.testing.assert_allclose(s["change"], parabola, rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(s["curvature_fd"], s["curvature"], rtol=1e-8)
        np.testing.assert_allclose(s["norm"], 1.0, rtol=1e-12)
    np.testing.assert_allclose(rec["slices"]["top1"]["curvature"], w[0], rtol=1e-9)
    np.testing.assert_allclose(rec["slices"]["top2"]["curvature"], w[1], rtol=1e-9)
    np.testing.assert_allclose(rec["slices"]["gradient"]["slope"], np.linalg.norm(g),
                               rtol=1e-10)
    # Bulk directions have no component in the top-k subspace: their curvature is at most λ_3.
    for name in ("bulk1", "bulk2"):
        assert rec["slices"][name]["curvature"] <= w[k] * (1 + 1e-9)
    surface = res.stored["loss_landscape_surfaces"]["top1__top2"]
    a = np.asarray(res.stored["loss_landscape_surfaces"]["t"])
    # Eigenvectors have no sign: the slopes along the computed ones, |slope| from numpy's.
    ga, gb = (rec["slices"][n]["slope"] for n in ("top1", "top2"))
    np.testing.assert_allclose([abs(ga), abs(gb)], np.abs(v[:2] @ g), rtol=1e-9)
    want = (a[:, None] * ga + a[None, :] * gb + 0.5 * (a[:, None] ** 2 * w[0]
                                                       + a[None, :] ** 2 * w[1]))
    np.testing.assert_allclose(surface, want, rtol=1e-9, atol=1e-13)


def test_landscape_curvature_on_a_network_agrees_with_the_rayleigh_quotient():
    model, ds, params, state = tiny_problem()
    loss_fn = tasks.inference_loss(model, CE)
    chain = analysis.chain(analysis.gradient(), analysis.eigenpairs(3, tol=1e-6),
                           directions.loss_landscape(3, radius=0.02, num_points=5,
                                                     surfaces=()))
    ctx = step_lib.context(0, params, loss_fn, ds, state=state, batch_size=32)
    res = step_lib.apply(chain, ctx, chain.init(ctx))
    rec = res.record["loss_landscape"]
    _, _, h, w, _ = dense_reference(model, ds, params)
    np.testing.assert_allclose(rec["slices"]["top1"]["curvature"], w[0], rtol=1e-4)
    for s in rec["slices"].values():
        # float32: the difference quotient at h = 0.01 carries round-off ~ eps·L/h².
        err = 8 * np.finfo(np.float32).eps * rec["loss"] / 0.01**2
        assert abs(s["curvature_fd"] - s["curvature"]) < 0.02 * abs(s["curvature"]) + err
    assert "loss_landscape_surfaces" not in res.stored


def test_filter_normalization_matches_the_parameters_filter_norms():
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=3)},
              "conv": {"kernel": rng.normal(size=(2, 2, 3, 5))}}
    d = jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape), params)
    out = directions.filter_normalize(d, params)
    np.testing.assert_array_equal(out["dense"]["bias"], 0)
    for leaf in ("dense", "conv"):
        p, o = params[leaf]["kernel"], np.asarray(out[leaf]["kernel"])
        axes = tuple(range(p.ndim - 1))
        np.testing.assert_allclose(np.sqrt((o**2).sum(axes)), np.sqrt((p**2).sum(axes)),
                                   rtol=1e-6)
        # Each filter keeps its direction.
        ratio = o / np.asarray(d[leaf]["kernel"])
        np.testing.assert_allclose(ratio, np.broadcast_to(ratio.reshape(-1, p.shape[-1])[0],
                                                          p.shape), rtol=1e-6)


def test_landscape_refuses_bad_settings():
    for kwargs, match in ((dict(num_points=4), "odd"), (dict(radius=0), "radius"),
                          (dict(normalization="layer"), "normalization"),
                          (dict(surfaces=(("top1", "top9"),)), "surfaces"),
                          (dict(num_top=0, num_bulk=0, num_random=0, gradient=False),
                           "no directions")):
        with pytest.raises(ValueError, match=match):
            directions.loss_landscape(2, **kwargs)


def test_config_builds_the_new_transforms_and_names_their_sections():
    from hessian_subspace.analysis import config as config_lib

    c = config_lib.default_config()
    c.transforms = ("gradient,eigenpairs,loss_decrease,loss_landscape,class_mean_subspace,"
                    "galore_subspace")
    with pytest.raises(ValueError, match="config.loss_decrease.*learning_rate"):
        config_lib.build_chain(c, k=2)
    c.loss_decrease.learning_rate = 0.1
    c.loss_landscape.steps = (5,)
    chain = config_lib.build_chain(c, k=2, optimizer=optax.sgd(0.1))
    assert chain.names == ("gradient", "eigenpairs", "loss_decrease", "loss_landscape",
                           "class_mean_subspace", "galore_subspace")
    described = {d["name"]: d["config"] for d in chain.describe()}
    assert described["loss_decrease"]["learning_rate"] == 0.1
    assert described["loss_landscape"]["surfaces"] == [["top1", "top2"], ["top1", "random1"]]
    c.loss_landscape.surfaces = "top1-top2"
    with pytest.raises(ValueError, match="config.loss_landscape.*':'"):
        config_lib.build_chain(c, k=2)


def test_a_record_of_other_extras_is_refused_not_reused(tmp_path):
    data, params = _least_squares()
    data = jax.tree_util.tree_map(np.float32, data)
    params = jax.tree_util.tree_map(np.float32, params)
    chain = analysis.chain(analysis.gradient(), analysis.eigenpairs(2),
                           directions.loss_decrease(1, optimizer=optax.sgd(0.1)))
    analyzer = analysis.Analyzer(chain, _ls_loss, data=data,
                                 results=analysis.Results(str(tmp_path), progress=False),
                                 schedule=analysis.Schedule(on_steps=(3,)))
    first = {"next_batch": {"x": data["x"][:8], "y": data["y"][:8]}}
    other = {"next_batch": {"x": data["x"][8:16], "y": data["y"][8:16]}}
    rec = analyzer(3, params, extras=first)
    assert rec["status"] == "ok" and rec["fingerprints"]["extras"]
    assert analyzer(3, params, extras=first) is None  # the same inputs: reused
    with pytest.raises(analysis.StaleResultsError, match="extras differ"):
        analyzer(3, params, extras=other)  # another next batch: not this record's inputs
