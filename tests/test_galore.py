"""GaLore: the optax transformation against a hand-written numpy step, and galore_subspace
(its projector against the Hessian's diagonal blocks) against numpy's SVD and the dense float64
Hessian block."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hessian_subspace import _tree, analysis
from hessian_subspace.analysis import galore as galore_metrics
from hessian_subspace.training import galore as galore_opt
from hessian_subspace.training import tasks

from _pipeline import CE, dense_reference, tiny_problem


def _reference_galore(grads_seq, shapes, rank, refresh_every, lr, scale, b1=0.9, b2=0.999,
                      eps=1e-8):
    """GaLore's Adam written out in numpy, leaf by leaf."""
    state = {name: dict(p=None, mu=None, nu=None) for name in shapes}
    out = []
    for t, grads in enumerate(grads_seq):
        step = {}
        for name, g in grads.items():
            s = state[name]
            side = None if g.ndim != 2 or min(g.shape) <= rank else (
                "left" if g.shape[0] <= g.shape[1] else "right")
            if side is not None and t % refresh_every == 0:
                u, _, vt = np.linalg.svd(g, full_matrices=False)
                s["p"] = u[:, :rank] if side == "left" else vt[:rank].T
            r = g if side is None else (s["p"].T @ g if side == "left" else g @ s["p"])
            s["mu"] = (1 - b1) * r if s["mu"] is None else b1 * s["mu"] + (1 - b1) * r
            s["nu"] = (1 - b2) * r * r if s["nu"] is None else b2 * s["nu"] + (1 - b2) * r * r
            n = (s["mu"] / (1 - b1 ** (t + 1))) / (np.sqrt(s["nu"] / (1 - b2 ** (t + 1))) + eps)
            if side is None:
                step[name] = -lr * n
            else:
                step[name] = -lr * scale * (s["p"] @ n if side == "left" else n @ s["p"].T)
        out.append(step)
    return out


def test_galore_optax_matches_a_hand_written_step():
    rng = np.random.default_rng(0)
    shapes = {"wide": (4, 7), "tall": (8, 5), "bias": (7,), "small": (2, 3)}
    grads_seq = [{n: rng.normal(size=s) for n, s in shapes.items()} for _ in range(4)]
    params = {n: np.zeros(s) for n, s in shapes.items()}
    tx = galore_opt.galore(0.01, 2, refresh_every=2, scale=0.5)
    want = _reference_galore(grads_seq, shapes, 2, 2, 0.01, 0.5)
    with jax.enable_x64(True):
        state = tx.init(params)
        step = jax.jit(tx.update)
        for t, grads in enumerate(grads_seq):
            upd, state = step(grads, state)
            for name in shapes:
                # Singular vectors have signs; the projected step does not depend on them.
                np.testing.assert_allclose(upd[name], want[t][name], rtol=1e-9, atol=1e-14,
                                           err_msg=f"{name} at step {t}")
    # The projected leaves move only in their rank-2 row (column) space.
    assert np.linalg.matrix_rank(np.asarray(upd["wide"]), tol=1e-12) == 2
    assert np.linalg.matrix_rank(np.asarray(upd["tall"]), tol=1e-12) == 2


def test_galore_refuses_bad_settings():
    for kwargs, match in ((dict(learning_rate=0.0, rank=2), "learning_rate"),
                          (dict(learning_rate=0.1, rank=0), "rank"),
                          (dict(learning_rate=0.1, rank=2, scale=-1), "scale"),
                          (dict(learning_rate=0.1, rank=2, b2=1.0), "b2")):
        with pytest.raises(ValueError, match=match):
            galore_opt.galore(**kwargs)


def test_projector_is_numpys_top_singular_subspace():
    rng = np.random.default_rng(1)
    for shape in ((5, 9), (9, 5)):
        g = rng.normal(size=shape)
        u, side = galore_metrics.projector(g, 3)
        a, _, bt = np.linalg.svd(g)
        ref = a[:, :3] if shape[0] <= shape[1] else bt[:3].T
        assert side == ("left" if shape[0] <= shape[1] else "right")
        np.testing.assert_allclose(np.sum((u.T @ ref) ** 2), 3.0, rtol=1e-12)


def test_galore_subspace_against_the_dense_hessian_blocks(tmp_path):
    model, ds, params, state = tiny_problem()  # FC 6-5-3: kernels (6, 5) and (5, 3)
    rank = 2
    analyzer = analysis.Analyzer(
        analysis.chain(analysis.gradient(),
                       galore_metrics.galore_subspace(rank, refresh_every=5, tol=1e-10)),
        tasks.inference_loss(model, CE), data=ds, batch_size=32,
        results=analysis.Results(str(tmp_path), progress=False),
        operator=analysis.Operator(dtype="float64"))
    rec = analyzer.process(0, params, state)
    assert rec["status"] == "ok", rec.get("reason")
    got = rec["galore_subspace"]
    assert set(got["layers"]) == {"dense_0/kernel", "dense_1/kernel"} and got["refreshed"]
    _, g, h, _, _ = dense_reference(model, ds, params)
    slices = {n: (a, b) for n, a, b in _tree.leaf_slices(params)}
    for path, entry in got["layers"].items():
        a, b = slices[path]
        shape = tuple(entry["shape"])
        block = h[a:b, a:b]
        w, v = np.linalg.eigh(block)
        v = v[:, ::-1][:, :rank].T.reshape(rank, *shape)
        np.testing.assert_allclose(entry["block_eigenvalues"], w[::-1][:rank], rtol=1e-8)
        gl = g[a:b].reshape(shape)
        u, side = galore_metrics.projector(gl, rank)
        assert entry["side"] == side
        sv = np.linalg.svd(gl, compute_uv=False)
        np.testing.assert_allclose(entry["gradient_energy"], np.sum(sv[:rank] ** 2)
                                   / np.sum(sv ** 2), rtol=1e-9)
        vs = v if side == "left" else np.transpose(v, (0, 2, 1))
        cap = np.mean([np.sum((u.T @ vi) ** 2) for vi in vs])
        np.testing.assert_allclose(entry["captured"], cap, rtol=1e-6)
        np.testing.assert_allclose(entry["block_f_top"],
                                   np.sum((v.reshape(rank, -1) @ gl.ravel()) ** 2)
                                   / np.sum(gl**2), rtol=1e-6)
        assert 0 <= entry["side_overlap"] <= 1 + 1e-12
        assert "stale" not in entry
    # Two steps later: not refreshed (T = 5), compared with the projector of step 0.
    moved = jax.tree_util.tree_map(lambda x: x * 1.1, params)
    rec2 = analyzer.process(2, moved, state)
    got2 = rec2["galore_subspace"]
    assert not got2["refreshed"]
    _, g2, _, _, _ = dense_reference(model, ds, moved)
    for path, entry in got2["layers"].items():
        a, b = slices[path]
        u_now, _ = galore_metrics.projector(g2[a:b].reshape(entry["shape"]), rank)
        u_then, _ = galore_metrics.projector(g[a:b].reshape(entry["shape"]), rank)
        assert entry["stale"]["since"] == 0 and entry["stale"]["steps"] == 2
        np.testing.assert_allclose(entry["stale"]["overlap"],
                                   np.sum((u_now.T @ u_then) ** 2) / rank, rtol=1e-5)
    # A resumed analyzer reads the kept projectors back from the store.
    again = analysis.Analyzer(
        analysis.chain(analysis.gradient(),
                       galore_metrics.galore_subspace(rank, refresh_every=5, tol=1e-10)),
        tasks.inference_loss(model, CE), data=ds, batch_size=32,
        results=analysis.Results(str(tmp_path), progress=False),
        operator=analysis.Operator(dtype="float64"))
    rec7 = again.process(7, moved, state)["galore_subspace"]
    assert rec7["refreshed"] and all(e["stale"]["since"] == 0
                                     for e in rec7["layers"].values())


def test_galore_trains_in_the_loop():
    """GaLore in the package's jitted training step: the loss goes down."""
    model, ds, params, state = tiny_problem()
    tx = galore_opt.galore(0.05, 2, refresh_every=3)
    loss_fn = tasks.cross_entropy_loss(model)
    opt = tx.init(params)

    @jax.jit
    def step(p, o):
        g = jax.grad(loss_fn)(p, ds)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    start = float(loss_fn(params, ds))
    p = params
    for _ in range(30):
        p, opt = step(p, opt)
    assert float(loss_fn(p, ds)) < 0.8 * start
    assert int(opt.count) == 30 and jnp.all(jnp.isfinite(opt.nu["dense_0"]["kernel"]))
