"""Every built-in transform against dense float64 references (the Hessian, the GGN and their
blocks by jax.hessian/jacfwd and numpy eigh), the toy model of §3, warm starts, loss and
accuracy on the analysis and test sets."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hessian_subspace as hs
from hessian_subspace import analysis
from hessian_subspace.paper import data, models
from hessian_subspace.training import batches, tasks

from _helpers import count_compilations
from _pipeline import (CE, config_of, dense_curvatures, dense_reference, eig_desc,
                       moved_params, paper_analyzer, tiny_problem)


def test_every_builtin_matches_a_dense_float64_computation(tmp_path):
    model, ds, params, state = tiny_problem()
    settings = config_of(dtype="float64", tol=1e-9, lanczos_steps=60, batch_size=32,
                                num_minibatches=2, minibatch_size=16, reference_steps=(0,))
    analyzer = paper_analyzer(model, ds, str(tmp_path), settings)
    moved = moved_params(params)
    rec0 = analyzer.process(0, params, state)
    rec1 = analyzer.process(7, moved, state)
    bases = {}
    for step, rec, p in ((0, rec0, params), (7, rec1, moved)):
        assert rec["status"] == "ok" and rec["all_converged"]
        value, g, h, w, v = dense_reference(model, ds, p)
        np.testing.assert_allclose(rec["train_loss"], value, rtol=1e-12)
        np.testing.assert_allclose(rec["grad_norm"], np.linalg.norm(g), rtol=1e-10)
        np.testing.assert_allclose(rec["eigenvalues"], w[:6], rtol=1e-8, atol=1e-12)
        c2 = (v[:6] @ g) ** 2 / (g @ g)
        np.testing.assert_allclose(rec["c2"], c2, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(rec["f_top"], c2[:3].sum(), rtol=1e-6)
        np.testing.assert_allclose(rec["f_next"], c2[3:].sum(), rtol=1e-6, atol=1e-12)
        hg = h @ g
        np.testing.assert_allclose(rec["overlap_g_hg"],
                                   g @ hg / np.linalg.norm(g) / np.linalg.norm(hg), rtol=1e-9)
        np.testing.assert_allclose(rec["lambda_max"], w[0], rtol=1e-9)
        mass = rec["top_eigenvector_layer_mass"]
        assert set(mass) == {"dense_0/bias", "dense_0/kernel", "dense_1/bias", "dense_1/kernel"}
        np.testing.assert_allclose(sum(mass.values()), 1.0, rtol=1e-9)
        for name, a, b in rec["layer_slices"]:
            np.testing.assert_allclose(mass[name], np.sum(v[0, a:b] ** 2), rtol=1e-6, atol=1e-12)
        assert len(rec["f_top_minibatch"]) == 2
        assert rec["precision"]["lanczos"] == "float64" and rec["versions"]["jax"]
        bases[step] = v
        stored = analyzer.store.state(step)["eigenpairs/eigenvectors"]
        assert stored.shape == (6, h.shape[0])
    over = rec1["subspace_overlap"]["0"]
    for d in range(1, 7):  # the paper's chain: d = 1 ... 2k
        want = np.sum((bases[7][:d] @ bases[0][:d].T) ** 2) / d
        np.testing.assert_allclose(over[f"top{d}"], want, rtol=1e-5, atol=1e-7)
    want = np.sum((bases[7][3:6] @ bases[0][3:6].T) ** 2) / 3
    np.testing.assert_allclose(over["next"], want, rtol=1e-5, atol=1e-7)
    assert rec1["subspace_overlap"]["previous"] == {"step": 0}  # one copy, under "0"
    lines = [r["step"] for r in analysis.read_results(str(tmp_path))]
    assert lines == [0, 7]


def test_spectra_builtins_against_dense_float64(tmp_path):
    model, ds, params, state = tiny_problem()
    p = hs.metrics.leaf_slices(params)[-1][2]  # 53 parameters
    pipe = analysis.chain(analysis.at_steps(analysis.slq(num_probes=4, num_steps=p), (3,)),
                          analysis.at_steps(analysis.dense_spectrum(), 3))
    analyzer = analysis.Analyzer(pipe, tasks.inference_loss(model, CE), data=ds,
                                 results=analysis.Results(str(tmp_path), progress=False),
                                 operator=analysis.Operator(dtype="float64"))
    assert "slq" not in analyzer.process(2, params, state)  # not a step of theirs
    rec = analyzer.process(3, params, state)
    _, _, h, w, _ = dense_reference(model, ds, params)
    spectra = analyzer.store.stored("spectra", 3)
    np.testing.assert_allclose(np.sort(spectra["dense_eigenvalues"])[::-1], w, atol=1e-10)
    assert rec["dense_spectrum"]["num"] == p and rec["hvps"] == 4 * p + p
    # Full-dimension SLQ: every node that carries weight is an eigenvalue of H.
    nodes, weights = spectra["slq_nodes"], spectra["slq_weights"]
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-10)
    heavy = nodes[weights > 1e-6]
    assert heavy.size >= 4 * 10
    assert np.max(np.min(np.abs(heavy[:, None] - w[None]), axis=1)) < 1e-6 * w[0]


def test_toy_model_two_classes_sigma_zero_gradient_lies_in_the_predicted_top_subspace():
    # Softmax regression without biases on 2 orthogonal class means, sigma = 0 (App. E):
    # H and g live in span{(mu1, -mu1), (mu2, -mu2)}, so f_top = 1 to round-off at any time.
    ds = data.gaussian_mixture(num_classes=2, dim=50, num_examples=200, sigma=0.0, seed=3,
                               orthogonal_means=True)
    model = models.build_model("softmax", num_outputs=2, use_bias=False)
    params, state = tasks.init_variables(model, jax.random.key(0), ds["x"][:1])
    tx = optax.sgd(0.1)
    step_fn = jax.jit(lambda p, o, b: (lambda u, o: (optax.apply_updates(p, u), o))(
        *tx.update(jax.grad(tasks.cross_entropy_loss(model))(p, b), o)))
    opt = tx.init(params)
    analyzer = analysis.Analyzer(
        analysis.chain(analysis.gradient(), analysis.eigenpairs(k=4, tol=1e-4),
                       analysis.f_top(k=2, num_minibatches=0)),
        tasks.cross_entropy_loss(model), data={"x": ds["x"], "y": ds["y"]},
        results=analysis.Results(progress=False))
    mu1, mu2 = ds["means"]
    predicted = np.stack([np.outer(mu1, [1, -1]).ravel(), np.outer(mu2, [1, -1]).ravel()])
    predicted /= np.linalg.norm(predicted, axis=1, keepdims=True)
    for t in range(60):
        if t in (0, 20, 59):
            rec = analyzer.process(t, params)
            assert abs(rec["f_top"] - 1.0) < 1e-5, (t, rec["f_top"])
            top = analyzer.store.state(t)["eigenpairs/eigenvectors"][:2]
            np.testing.assert_allclose(hs.subspace_overlap(top, predicted), 1.0, atol=1e-5)
            assert max(abs(x) for x in rec["eigenvalues"][2:]) < 1e-5 * rec["eigenvalues"][0]
        idx = batches.batch_indices(200, 20, t, 0)
        params, opt = step_fn(params, opt, {"x": ds["x"][idx], "y": ds["y"][idx]})


def test_tracker_warm_start_agrees_with_lanczos_and_counts_its_hvps(tmp_path):
    model, ds, params, state = tiny_problem()
    steps = [jax.tree_util.tree_map(lambda x, t=t: x * (1 + 1e-3 * t), params) for t in range(3)]
    out = {}
    for tracker in (False, True):
        settings = config_of(batch_size=32, k=2, tol=1e-4, tracker=tracker,
                                    tracker_blocks=6,
                                    transforms=("loss", "gradient", "eigenpairs", "f_top"))
        analyzer = paper_analyzer(model, ds, str(tmp_path / str(tracker)), settings, k=2)
        out[tracker] = [analyzer.process(t, p, state) for t, p in enumerate(steps)]
    assert "tracker_hvps" not in out[True][0]  # nothing to track from at the first step
    for plain, tracked in zip(out[False][1:], out[True][1:], strict=True):
        assert tracked["tracker_hvps"] > 0 and isinstance(tracked["tracker_converged"], bool)
        np.testing.assert_allclose(tracked["eigenvalues"], plain["eigenvalues"], rtol=1e-3)
        assert abs(tracked["f_top"] - plain["f_top"]) < 1e-3
        assert tracked["tracker_converged"] and tracked["all_converged"]
        assert tracked["hvps"] == tracked["lanczos_hvps"] == tracked["tracker_hvps"]
    with pytest.raises(ValueError, match="tracker"):
        config_of(tracker=True, warm_start=False)


def test_block_analysis_and_ggn_alongside_match_dense_blocks(tmp_path):
    model, ds, params, state = tiny_problem()
    settings = config_of(
        block="dense_1", also_ggn=True, dtype="float64", tol=1e-9, lanczos_steps=18,
        batch_size=45, num_minibatches=2, minibatch_size=16,
        transforms=("loss", "gradient", "eigenpairs", "f_top", "layers"))
    analyzer = paper_analyzer(model, ds, str(tmp_path), settings)
    rec = analyzer.process(0, params, state)
    g, h, ggn = dense_curvatures(model, ds, params)
    idx = np.concatenate([np.arange(a, b) for name, a, b in hs.leaf_slices(params)
                          if name.startswith("dense_1/")])  # 5 x 3 kernel + 3 biases
    assert rec["block"] == dict(prefixes=["dense_1"], leaves=["dense_1/bias", "dense_1/kernel"],
                                num_params=18)
    assert rec["hessian"]["block"]["num_params"] == 18
    gs = g[idx]
    np.testing.assert_allclose(rec["block_grad_norm"], np.linalg.norm(gs), rtol=1e-10)
    np.testing.assert_allclose(rec["grad_norm"], np.linalg.norm(g), rtol=1e-10)
    w, v = eig_desc(h[np.ix_(idx, idx)])
    np.testing.assert_allclose(rec["eigenvalues"][:3], w[:3], rtol=1e-9)
    np.testing.assert_allclose(rec["f_top"], np.sum((v[:3] @ gs) ** 2) / (gs @ gs), rtol=1e-6)
    assert set(rec["top_eigenvector_layer_mass"]) == {"dense_1/bias", "dense_1/kernel"}
    assert analyzer.store.state(0)["eigenpairs/eigenvectors"].shape == (6, 18)
    assert len(rec["f_top_minibatch"]) == 2
    wg, vg = eig_desc(ggn[np.ix_(idx, idx)])
    np.testing.assert_allclose(rec["ggn_eigenvalues"], wg[:3], rtol=1e-8)
    np.testing.assert_allclose(rec["f_top_ggn"], np.sum((vg[:3] @ gs) ** 2) / (gs @ gs),
                               rtol=1e-6)
    np.testing.assert_allclose(rec["ggn_hessian_overlap"],
                               hs.subspace_overlap(v[:3], vg[:3]), rtol=1e-6)
    analyzer.process(1, jax.tree_util.tree_map(lambda x: 1.1 * x, params), state)
    with count_compilations() as n:  # block and GGN-alongside transforms compile once.
        analyzer.process(2, jax.tree_util.tree_map(lambda x: 1.2 * x, params), state)
    assert n[0] == 0


def test_ggn_curvature_and_its_error_bars_against_dense_float64_in_a_float32_analysis(
        tmp_path):
    model, ds, params, state = tiny_problem()
    settings = config_of(
        curvature="ggn", next_bound=True, batch_size=45, num_minibatches=0,
        reference_steps=(0,), transforms=("loss", "gradient", "eigenpairs", "f_top",
                                          "overlap_g_hg", "layers", "subspace_overlap"))
    analyzer = paper_analyzer(model, ds, str(tmp_path), settings)
    vectors = {}
    for step, p in ((0, params), (7, moved_params(params))):
        rec = analyzer.process(step, p, state)
        assert rec["curvature"] == "ggn" and rec["hessian"]["curvature"] == "ggn"
        assert rec["dtype"] == "float32" and len(rec["residuals"]) == 7  # 2k + 1 pairs
        g, h, ggn = dense_curvatures(model, ds, p)
        w, v = eig_desc(ggn)
        vectors[step] = v
        np.testing.assert_allclose(rec["eigenvalues"][:6], w[:6], rtol=0,
                                   atol=2 * max(rec["residuals"][:6]))
        assert not np.allclose(rec["eigenvalues"][:3], eig_desc(h)[0][:3], rtol=1e-2)
        np.testing.assert_allclose(rec["lambda_max"], w[0], rtol=1e-4)
        gg = ggn @ g
        np.testing.assert_allclose(rec["overlap_g_hg"],
                                   g @ gg / np.linalg.norm(g) / np.linalg.norm(gg), rtol=1e-4)
        f_top = np.sum((v[:3] @ g) ** 2) / (g @ g)
        f_next = np.sum((v[3:6] @ g) ** 2) / (g @ g)
        assert abs(rec["f_top"] - f_top) <= rec["f_top_bound"] < 0.1
        assert abs(rec["f_next"] - f_next) <= rec["f_next_bound"] < 0.1
    over = rec["subspace_overlap"]["0"]
    for d in range(2, 7):
        want = np.sum((vectors[7][:d] @ vectors[0][:d].T) ** 2) / d
        assert abs(over[f"top{d}"] - want) <= over[f"top{d}_bound"], d
    want = np.sum((vectors[7][3:6] @ vectors[0][3:6].T) ** 2) / 3
    assert abs(over["next"] - want) <= over["next_bound"]
    assert over["top3_bound"] < 0.1
    with count_compilations() as n:
        analyzer.process(8, jax.tree_util.tree_map(lambda x: 1.1 * x, moved_params(params)), state)
    assert n[0] == 0


def test_eigenpairs_of_blocks_and_of_the_ggn_beside_the_full_hessian(tmp_path):
    model, ds, params, state = tiny_problem()
    pipe = analysis.chain(
        analysis.eigenpairs(k=4, tol=1e-6),
        analysis.eigenpairs(k=3, tol=1e-6, block="dense_1", name="last_layer"),
        analysis.eigenpairs(k=3, tol=1e-6, curvature_name="ggn", block=("dense_0",),
                            name="ggn_first_layer"),
        analysis.transform("block_top", lambda ctx: float(ctx["last_layer"].eigenvalues[0]),
                           requires=("last_layer",)))
    analyzer = analysis.Analyzer(pipe, tasks.inference_loss(model, CE), data=ds,
                                 results=analysis.Results(str(tmp_path), progress=False),
                                 operator=analysis.Operator(
                                     output_fn=tasks.inference_outputs(model),
                                     output_loss=tasks.output_loss(CE), dtype="float64"))
    rec = analyzer.process(0, params, state)
    g, h, ggn = dense_curvatures(model, ds, params)
    slices = {n: (a, b) for n, a, b in hs.leaf_slices(params)}
    last = np.concatenate([np.arange(*slices[n]) for n in ("dense_1/bias", "dense_1/kernel")])
    first = np.concatenate([np.arange(*slices[n]) for n in ("dense_0/bias", "dense_0/kernel")])
    np.testing.assert_allclose(rec["eigenvalues"], eig_desc(h)[0][:4], rtol=1e-8)
    np.testing.assert_allclose(rec["last_layer_eigenvalues"],
                               eig_desc(h[np.ix_(last, last)])[0][:3], rtol=1e-8)
    np.testing.assert_allclose(rec["ggn_first_layer_eigenvalues"],
                               eig_desc(ggn[np.ix_(first, first)])[0][:3], rtol=1e-8)
    assert rec["block_top"] == rec["last_layer_eigenvalues"][0]
    store = analyzer.store
    assert store.state(0)["last_layer/eigenvectors"].shape == (3, last.size)
    assert store.state(0)["ggn_first_layer/eigenvectors"].shape == (3, first.size)


def test_loss_and_accuracy_on_the_analysis_and_test_sets():
    model, ds, params, state = tiny_problem()
    test = data.gaussian_mixture(num_classes=3, dim=6, num_examples=90, sigma=0.5, seed=0,
                                 split="test")
    test = {"x": test["x"][:37], "y": test["y"][:37]}  # ragged against batch_size=16
    analyzer = analysis.Analyzer(analysis.loss(tasks.inference_metrics(model, CE)),
                                 tasks.inference_loss(model, CE), data=ds, batch_size=16,
                                 test_data=test, results=analysis.Results(progress=False))
    rec = analyzer.process(0, params, state)
    for prefix, split in (("train", ds), ("test", test)):
        logits = model.apply({"params": params}, split["x"])
        np.testing.assert_allclose(rec[f"{prefix}_loss"], float(jnp.mean(
            optax.softmax_cross_entropy_with_integer_labels(logits, split["y"]))), rtol=1e-5)
        np.testing.assert_allclose(rec[f"{prefix}_accuracy"], float(jnp.mean(
            jnp.argmax(logits, -1) == split["y"])), rtol=1e-6)
    # Without a metrics function: the analyzer's loss alone, under the same names.
    plain = analysis.Analyzer(analysis.loss(), tasks.inference_loss(model, CE), data=ds,
                              results=analysis.Results(progress=False)).process(0, params, state)
    assert set(plain) >= {"train_loss"} and "train_accuracy" not in plain
    np.testing.assert_allclose(plain["train_loss"], rec["train_loss"], rtol=1e-5)


def test_trace_and_deflated_slq_transforms_against_dense_float64(tmp_path):
    model, ds, params, state = tiny_problem()
    pipe = analysis.chain(
        analysis.eigenpairs(k=4, tol=1e-9, num_steps=40),
        analysis.trace(num_probes=400, diagonal=True),
        analysis.slq(num_probes=3, num_steps=20, deflate=True))
    analyzer = analysis.Analyzer(pipe, tasks.inference_loss(model, CE), data=ds,
                                 results=analysis.Results(str(tmp_path), progress=False),
                                 operator=analysis.Operator(dtype="float64"))
    rec = analyzer.process(3, params, state)
    assert rec["status"] == "ok", rec.get("reason")
    _, _, h, w, _ = dense_reference(model, ds, params)
    tr = rec["trace"]
    assert tr["deflated"] == 4 and tr["probes"] == 400
    np.testing.assert_allclose(tr["top_part"], w[:4].sum(), rtol=1e-8)
    assert abs(tr["estimate"] - np.trace(h)) < 4 * tr["standard_error"]
    spectra = analyzer.store.stored("spectra", 3)
    diag, se = spectra["hessian_diagonal"], spectra["hessian_diagonal_se"]
    z = (diag - np.diag(h)) / np.maximum(se, 1e-12)
    assert np.mean(z**2) < 2.0, np.mean(z**2)
    # The deflated density: the 4 converged eigenvalues exactly, weight 1/p each.
    assert rec["slq"]["deflated"] == 4
    nodes, weights = spectra["slq_nodes"], spectra["slq_weights"]
    np.testing.assert_allclose(nodes[:, -4:], np.broadcast_to(w[:4], (3, 4)), rtol=1e-8)
    np.testing.assert_allclose(weights[:, -4:], 1 / h.shape[0], rtol=1e-12)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-10)
    assert rec["hvps"] >= 400 + 3 * 20


def test_trace_transform_with_xtrace_against_dense_float64(tmp_path):
    model, ds, params, state = tiny_problem()
    # 10 sketch vectors for 53 parameters: not exact, so the error bars are exercised.
    pipe = analysis.trace(num_probes=20, deflate=False, diagonal=True, estimator="xtrace")
    analyzer = analysis.Analyzer(pipe, tasks.inference_loss(model, CE), data=ds,
                                 results=analysis.Results(str(tmp_path), progress=False),
                                 operator=analysis.Operator(dtype="float64"))
    rec = analyzer.process(3, params, state)
    assert rec["status"] == "ok", rec.get("reason")
    _, _, h, _, _ = dense_reference(model, ds, params)
    tr = rec["trace"]
    assert tr["estimator"] == "xtrace" and tr["deflated"] == 0 and rec["hvps"] == 20
    assert tr["standard_error"] > 1e-6 * abs(tr["estimate"])
    assert abs(tr["estimate"] - np.trace(h)) < 4 * tr["standard_error"]
    spectra = analyzer.store.stored("spectra", 3)
    diag, se = spectra["hessian_diagonal"], spectra["hessian_diagonal_se"]
    live = se > 1e-12
    z = (diag[live] - np.diag(h)[live]) / se[live]
    assert np.mean(z**2) < 3.0, np.mean(z**2)
    for bad, word in ((dict(estimator="hutch"), "estimator"),
                      (dict(estimator="xtrace", num_probes=7), "num_probes")):
        with pytest.raises(ValueError, match=word):
            analysis.trace(deflate=False, **bad)


def test_a_deflated_transform_without_eigenpairs_is_refused_when_the_chain_is_built():
    with pytest.raises(ValueError, match="eigenpairs"):
        analysis.chain(analysis.trace(num_probes=4))
    analysis.chain(analysis.trace(num_probes=4, deflate=False))  # plain needs nothing
