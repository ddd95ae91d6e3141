"""The metric pipeline: composition, every built-in against dense float64 references, the toy
model, the user's own loss (the acceptance script of issue 9), failures, compile-once."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import flatten_util

import hessian_subspace as hs
from hessian_subspace import analysis
from hessian_subspace.analysis import presets
from hessian_subspace.paper import data, models
from hessian_subspace.training import batches, tasks

from _helpers import count_compilations

CE = "classification"


def _tiny_problem(seed=0):
    ds = data.gaussian_mixture(num_classes=3, dim=6, num_examples=90, sigma=0.5, seed=seed)
    model = models.build_model("fc", num_outputs=3, hidden=(5,), activation="softplus")
    params, state = tasks.init_variables(model, jax.random.key(seed), ds["x"][:1])
    return model, {"x": ds["x"], "y": ds["y"]}, params, state


def _paper_analyzer(model, ds, results_dir, settings=None, k=3, **kwargs):
    """The paper's chain on a linen model, as ``paper.experiment.analyzer_for`` builds it."""
    settings = settings or presets.Settings()
    return analysis.Analyzer(
        presets.paper_chain(settings, k=k, metrics_fn=tasks.inference_metrics(model, CE)),
        tasks.inference_loss(model, CE), data=ds, results_dir=results_dir,
        output_fn=tasks.inference_outputs(model), output_loss=tasks.output_loss(CE),
        record_fields=dict(k=k), progress=False,
        **dict(presets.analyzer_options(settings), **kwargs))


def _dense_reference(model, ds, params):
    """g, H and its eigen-decomposition in float64, independently of the pipeline."""
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params)
        batch = {"x": jnp.asarray(ds["x"], jnp.float64), "y": jnp.asarray(ds["y"])}
        loss = tasks.cross_entropy_loss(model)
        flat, unravel = flatten_util.ravel_pytree(p64)
        g = np.asarray(jax.grad(lambda x: loss(unravel(x), batch))(flat))
        h = np.asarray(jax.hessian(lambda x: loss(unravel(x), batch))(flat))
        value = float(loss(p64, batch))
    w, v = np.linalg.eigh(h)
    order = np.argsort(-w)
    return value, g, h, w[order], v[:, order].T


def _moved(params, scale=0.3):
    return jax.tree_util.tree_map(
        lambda x: x + scale * jnp.sin(jnp.arange(x.size).reshape(x.shape)), params)


# ---------------------------------------------------------------------------------------------
# Composition.


def test_chain_checks_requirements_and_names_before_any_work():
    with pytest.raises(ValueError, match="'f_top' requires 'gradient'.*analysis.gradient()"):
        analysis.chain(analysis.eigenpairs(k=4), analysis.f_top(k=2))
    with pytest.raises(ValueError, match="'f_top' requires 'eigenpairs'"):
        analysis.chain(analysis.gradient(), analysis.f_top(k=2), analysis.eigenpairs(k=4))
    with pytest.raises(ValueError, match="named 'gradient'"):
        analysis.chain(analysis.gradient(), analysis.gradient())
    with pytest.raises(ValueError, match="'mine' requires 'nothing_here'"):
        analysis.chain(analysis.transform("mine", lambda ctx: 1.0, requires=("nothing_here",)))
    with pytest.raises(TypeError, match="chain"):
        analysis.chain("f_top")
    with pytest.raises(ValueError, match="`k` must be an int >= 1"):
        analysis.eigenpairs(k=-3)
    # Nested chains flatten; a bare function of the context is a transform named after it.
    def norm_of_params(ctx):
        return {"param_norm": float(jnp.linalg.norm(flatten_util.ravel_pytree(ctx["params"])[0]))}
    pipe = analysis.chain(analysis.chain(analysis.loss(), analysis.gradient()), norm_of_params)
    assert pipe.names == ("loss", "gradient", "norm_of_params")


def test_order_is_respected_and_missing_entries_name_the_transform(tmp_path):
    model, ds, params, _ = _tiny_problem()
    loss = tasks.cross_entropy_loss(model)
    seen = []

    def first(ctx):
        seen.append("first")
        return {"a": 1.0}

    def second(ctx):
        seen.append("second")
        return {"b": ctx["a"] + 1.0}  # reads what `first` put in the context

    analyzer = analysis.Analyzer(analysis.chain(first, second), loss, data=ds, progress=False)
    record = analyzer.process(0, params)
    assert seen == ["first", "second"] and record["b"] == 2.0
    # A function that reads an entry nobody provides (and did not declare it): a clear error.
    sneaky = analysis.transform("sneaky", lambda ctx: ctx["eigenpairs"].eigenvalues[0])
    analyzer = analysis.Analyzer(analysis.chain(sneaky), loss, data=ds, progress=False,
                                 results_dir=str(tmp_path / "r"))
    with pytest.raises(analysis.MissingEntry, match="transform 'sneaky' asked for 'eigenpairs'"):
        analyzer.process(0, params)
    assert not (tmp_path / "r").exists()  # nothing was written


# ---------------------------------------------------------------------------------------------
# The acceptance script of issue 9: the user's own model, loss and metric.


def _acceptance_problem():
    ds = data.gaussian_mixture(num_classes=3, dim=8, num_examples=200, sigma=0.5, seed=1)
    analysis_set = {"x": jnp.asarray(ds["x"]), "y": jnp.asarray(ds["y"])}
    keys = jax.random.split(jax.random.key(0), 2)
    params = {"w1": 0.5 * jax.random.normal(keys[0], (8, 6)), "b1": jnp.zeros(6),
              "w2": 0.5 * jax.random.normal(keys[1], (6, 3)), "b2": jnp.zeros(3)}
    return analysis_set, params


def _user_loss(weight_decay):
    def loss_fn(params, batch):  # the user's own model and loss, params a dict
        h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
        logits = h @ params["w2"] + params["b2"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        return ce + weight_decay * jnp.sum(params["w1"] ** 2)
    return loss_fn


def _acceptance_chain():
    def f_top5(ctx):  # a user's own metric
        return {"f_top5": hs.gradient_fraction(ctx["gradient"],
                                               ctx["eigenpairs"].eigenvectors[:5])}

    return analysis.chain(analysis.loss(), analysis.gradient(), analysis.eigenpairs(k=6),
                          analysis.f_top(k=3), analysis.overlap_g_hg(),
                          analysis.subspace_overlap(k=3, reference_steps=(0,)),
                          analysis.transform("f_top5", f_top5,
                                             requires=("gradient", "eigenpairs")))


def test_acceptance_script_live_and_offline_with_the_users_loss(tmp_path):
    import orbax.checkpoint as ocp

    analysis_set, params = _acceptance_problem()
    loss_fn = _user_loss(1e-3)
    pipe = _acceptance_chain()
    tx = optax.sgd(0.5)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, batch):
        updates, opt_state = tx.update(jax.grad(loss_fn)(params, batch), opt_state)
        return optax.apply_updates(params, updates), opt_state

    analyzer = analysis.Analyzer(pipe, loss_fn, data=analysis_set, batch_size=64,
                                 results_dir=str(tmp_path / "mine"), every_steps=20,
                                 progress=False)
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpts"))
    saved = {}
    for step in range(61):  # live, inside the user's own loop
        analyzer(step, params)
        if step % 20 == 0:
            mngr.save(step, args=ocp.args.StandardSave(params))
            saved[step] = params
        idx = batches.batch_indices(200, 32, step, seed=0)
        params, opt_state = train_step(params, opt_state,
                                       {k: v[idx] for k, v in analysis_set.items()})
    mngr.wait_until_finished()
    mngr.close()
    live = analysis.read_results(str(tmp_path / "mine"))
    assert [r["step"] for r in live] == [0, 20, 40, 60]
    # Offline, over the checkpoints the user saved with orbax's CheckpointManager.
    analysis.Analyzer(pipe, loss_fn, data=analysis_set, batch_size=64,
                      results_dir=str(tmp_path / "offline"), progress=False
                      ).run(analysis.orbax_checkpoints(str(tmp_path / "ckpts"), like=params))
    records = analysis.read_results(str(tmp_path / "offline"))
    assert [r["step"] for r in records] == [0, 20, 40, 60]
    for rec, ref in zip(records, live, strict=True):
        assert rec["status"] == "ok" and rec["all_converged"]
        assert 0.0 <= rec["f_top5"] <= 1.0  # the custom metric is in every record
        assert rec["f_top"] <= rec["f_top5"] + 1e-6  # top 3 within top 5
        for key in ("f_top", "f_top5", "overlap_g_hg", "train_loss", "grad_norm"):
            np.testing.assert_allclose(rec[key], ref[key], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rec["eigenvalues"], ref["eigenvalues"], rtol=1e-4)
    assert set(records[-1]["subspace_overlap"]) == {"0", "40", "previous"}
    # The loss analysed is the user's: each record equals a direct computation with it.
    p60 = saved[60]
    for weight_decay in (0.0, 1e-3):
        loss = _user_loss(weight_decay)
        op = hs.dataset_hvp(loss, p60, analysis_set, batch_size=64)
        top = hs.top_eigenpairs(op, hs.random_start_vector(jax.random.key(5), p60), 6, tol=1e-5)
        _, g = hs.dataset_value_and_grad(loss, p60, analysis_set, batch_size=64)
        direct = float(hs.gradient_fraction(g, top.eigenvectors[:3]))
        rec = analysis.Analyzer(pipe, loss, data=analysis_set, batch_size=64,
                                progress=False).process(60, p60)
        np.testing.assert_allclose(rec["f_top"], direct, atol=2e-5)
        np.testing.assert_allclose(rec["eigenvalues"], np.asarray(top.eigenvalues), rtol=2e-3)
        if weight_decay:
            with_decay = rec["f_top"]
            np.testing.assert_allclose(with_decay, records[-1]["f_top"], rtol=1e-5)
        else:
            without = rec["f_top"]
    # The weight-decay term changes f_top by far more than the computations disagree (~1e-6).
    assert abs(with_decay - without) > 50 * 2e-5


def test_a_stateful_user_transform_and_single_value_outputs():
    analysis_set, params = _acceptance_problem()

    def count(ctx, state):
        return {"calls": int(state) + 1}, state + 1

    pipe = analysis.chain(
        analysis.transform("calls", count, init=lambda ctx: np.asarray(0)),
        analysis.transform("param_norm", lambda ctx: float(jnp.linalg.norm(ctx["params"]["w1"]))))
    analyzer = analysis.Analyzer(pipe, _user_loss(0.0), data=analysis_set, progress=False)
    records = [analyzer.process(t, params) for t in (0, 5, 9)]
    assert [r["calls"] for r in records] == [1, 2, 3]
    np.testing.assert_allclose(records[0]["param_norm"], float(jnp.linalg.norm(params["w1"])))


# ---------------------------------------------------------------------------------------------
# Every built-in against dense float64 references.


def test_every_builtin_matches_a_dense_float64_computation(tmp_path):
    model, ds, params, state = _tiny_problem()
    settings = presets.Settings(dtype="float64", tol=1e-9, lanczos_steps=60, batch_size=32,
                                num_minibatches=2, minibatch_size=16, reference_steps=(0,))
    analyzer = _paper_analyzer(model, ds, str(tmp_path), settings)
    moved = _moved(params)
    rec0 = analyzer.process(0, params, state)
    rec1 = analyzer.process(7, moved, state)
    bases = {}
    for step, rec, p in ((0, rec0, params), (7, rec1, moved)):
        assert rec["status"] == "ok" and rec["all_converged"]
        value, g, h, w, v = _dense_reference(model, ds, p)
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
        stored = analyzer.store.stored("bases", step)["eigenvectors"]
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
    model, ds, params, state = _tiny_problem()
    p = hs.metrics.leaf_slices(params)[-1][2]  # 53 parameters
    pipe = analysis.chain(analysis.at_steps(analysis.slq(num_probes=4, num_steps=p), (3,)),
                          analysis.at_steps(analysis.dense_spectrum(), 3))
    analyzer = analysis.Analyzer(pipe, tasks.inference_loss(model, CE), data=ds,
                                 results_dir=str(tmp_path), dtype="float64", progress=False)
    assert "slq" not in analyzer.process(2, params, state)  # not a step of theirs
    rec = analyzer.process(3, params, state)
    _, _, h, w, _ = _dense_reference(model, ds, params)
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
        tasks.cross_entropy_loss(model), data={"x": ds["x"], "y": ds["y"]}, progress=False)
    mu1, mu2 = ds["means"]
    predicted = np.stack([np.outer(mu1, [1, -1]).ravel(), np.outer(mu2, [1, -1]).ravel()])
    predicted /= np.linalg.norm(predicted, axis=1, keepdims=True)
    for t in range(60):
        if t in (0, 20, 59):
            rec = analyzer.process(t, params)
            assert abs(rec["f_top"] - 1.0) < 1e-5, (t, rec["f_top"])
            top = analyzer.store.stored("bases", t)["eigenvectors"][:2]
            np.testing.assert_allclose(hs.subspace_overlap(top, predicted), 1.0, atol=1e-5)
            assert max(abs(x) for x in rec["eigenvalues"][2:]) < 1e-5 * rec["eigenvalues"][0]
        idx = batches.batch_indices(200, 20, t, 0)
        params, opt = step_fn(params, opt, {"x": ds["x"][idx], "y": ds["y"][idx]})


# ---------------------------------------------------------------------------------------------
# Failures, settings, compilation.


def test_non_finite_parameters_and_gradients_give_failure_records(tmp_path):
    model, ds, params, state = _tiny_problem()
    analyzer = _paper_analyzer(model, ds, str(tmp_path))
    bad = jax.tree_util.tree_map(lambda x: x, params)
    bad["dense_1"]["bias"] = bad["dense_1"]["bias"].at[0].set(jnp.nan)
    rec = analyzer.process(3, bad, state)
    assert rec["status"] == "failed" and "non-finite" in rec["reason"]
    assert analyzer.store.record(3)["status"] == "failed"
    assert analyzer.store.stored("bases", 3) is None
    assert analyzer.process(4, params, state)["status"] == "ok"
    # Inputs that make the loss (not the parameters) non-finite: caught during the analysis.
    inf_data = dict(ds, x=np.where(np.arange(90)[:, None] == 5, np.inf, ds["x"]))
    rec = analysis.Analyzer(analysis.chain(analysis.gradient()), tasks.cross_entropy_loss(model),
                            data=inf_data, progress=False).process(0, params)
    assert rec["status"] == "failed" and "gradient is not finite" in rec["reason"]


def test_invalid_settings_are_refused_before_anything_is_written(tmp_path):
    model, ds, params, state = _tiny_problem()
    loss = tasks.inference_loss(model, CE)
    pipe = analysis.chain(analysis.gradient())
    results = tmp_path / "results"
    for kwargs, match in ((dict(precision="fastest"), "precision"),
                          (dict(dtype="float16"), "dtype"), (dict(batch_size=0), "batch_size"),
                          (dict(curvature="fisher"), "curvature"),
                          (dict(curvature="ggn"), "output_fn"), (dict(every_steps=0), "every"),
                          (dict(block=""), "block"), (dict(data={"x": np.zeros((0, 3))}), "data")):
        args = dict(data=ds, results_dir=str(results), progress=False)
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            analysis.Analyzer(pipe, loss, **args)
    with pytest.raises(ValueError, match="`k` must be an int >= 1"):
        presets.Settings(k=-3)
    with pytest.raises(ValueError, match="unknown transforms"):
        presets.Settings(transforms=("loss", "nope"))
    # A block that matches no parameter, and a loss that needs a state nobody gave: refused at
    # the first checkpoint, still before any file.
    analyzer = analysis.Analyzer(pipe, loss, data=ds, results_dir=str(results), block="dense_7",
                                 progress=False)
    with pytest.raises(ValueError, match="matches no parameter"):
        analyzer.process(0, params, state)
    with pytest.raises(TypeError, match="takes a model state"):
        analyzer.process(0, params)
    assert not results.exists()
    # The corrected run starts cleanly; another setting in the same directory is refused.
    analysis.Analyzer(pipe, loss, data=ds, results_dir=str(results), progress=False).process(
        0, params, state)
    with pytest.raises(analysis.StaleResultsError, match="other settings.*batch_size"):
        analysis.Analyzer(pipe, loss, data=ds, results_dir=str(results), batch_size=7,
                          progress=False)
    with pytest.raises(ValueError, match="other settings.*transforms"):
        analysis.Analyzer(analysis.chain(analysis.gradient(), analysis.eigenpairs(k=2)), loss,
                          data=ds, results_dir=str(results), progress=False)


def test_one_compilation_per_transform_and_shape(tmp_path):
    model, ds, params, state = _tiny_problem()
    analyzer = _paper_analyzer(model, ds, str(tmp_path), presets.Settings(batch_size=32))
    analyzer.process(0, params, state)
    analyzer.process(1, jax.tree_util.tree_map(lambda x: x * 1.1, params), state)
    with count_compilations() as n:
        for t in range(2, 5):
            analyzer.process(t, jax.tree_util.tree_map(lambda x, t=t: x * (1 + 0.1 * t), params),
                             state)
    assert n[0] == 0


def test_tracker_warm_start_agrees_with_lanczos_and_counts_its_hvps(tmp_path):
    model, ds, params, state = _tiny_problem()
    steps = [jax.tree_util.tree_map(lambda x, t=t: x * (1 + 1e-3 * t), params) for t in range(3)]
    out = {}
    for tracker in (False, True):
        settings = presets.Settings(batch_size=32, k=2, tol=1e-4, tracker=tracker,
                                    tracker_blocks=6,
                                    transforms=("loss", "gradient", "eigenpairs", "f_top"))
        analyzer = _paper_analyzer(model, ds, str(tmp_path / str(tracker)), settings, k=2)
        out[tracker] = [analyzer.process(t, p, state) for t, p in enumerate(steps)]
    assert "tracker_hvps" not in out[True][0]  # nothing to track from at the first step
    for plain, tracked in zip(out[False][1:], out[True][1:], strict=True):
        assert tracked["tracker_hvps"] > 0 and isinstance(tracked["tracker_converged"], bool)
        np.testing.assert_allclose(tracked["eigenvalues"], plain["eigenvalues"], rtol=1e-3)
        assert abs(tracked["f_top"] - plain["f_top"]) < 1e-3
        assert tracked["tracker_converged"] and tracked["all_converged"]
        assert tracked["hvps"] == tracked["lanczos_hvps"] == tracked["tracker_hvps"]
    with pytest.raises(ValueError, match="tracker"):
        presets.Settings(tracker=True, warm_start=False)


def _dense_curvatures(model, ds, params):
    """Dense float64 g, H and GGN of the tiny problem (the GGN from jacfwd, as in test_ggn)."""
    from test_ggn import _dense_ggn
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params)
        batch = {"x": jnp.asarray(ds["x"], jnp.float64), "y": jnp.asarray(ds["y"])}
        loss = tasks.cross_entropy_loss(model)
        flat, unravel = flatten_util.ravel_pytree(p64)
        g = np.asarray(jax.jit(jax.grad(lambda x, b: loss(unravel(x), b)))(flat, batch))
        h = np.asarray(jax.jit(hs.dense_hessian)(loss, p64, batch))
        ggn = _dense_ggn(hs.curvature.bind_state(tasks.inference_outputs(model), {}), p64, batch,
                         CE)
    return g, h, ggn


def _eig_desc(m):
    w, v = np.linalg.eigh(m)
    return w[::-1], v[:, ::-1].T


def test_block_analysis_and_ggn_alongside_match_dense_blocks(tmp_path):
    model, ds, params, state = _tiny_problem()
    settings = presets.Settings(
        block="dense_1", also_ggn=True, dtype="float64", tol=1e-9, lanczos_steps=18,
        batch_size=45, num_minibatches=2, minibatch_size=16,
        transforms=("loss", "gradient", "eigenpairs", "f_top", "layers"))
    analyzer = _paper_analyzer(model, ds, str(tmp_path), settings)
    rec = analyzer.process(0, params, state)
    g, h, ggn = _dense_curvatures(model, ds, params)
    idx = np.concatenate([np.arange(a, b) for name, a, b in hs.leaf_slices(params)
                          if name.startswith("dense_1/")])  # 5 x 3 kernel + 3 biases
    assert rec["block"] == dict(prefixes=["dense_1"], leaves=["dense_1/bias", "dense_1/kernel"],
                                num_params=18)
    assert rec["hessian"]["block"]["num_params"] == 18
    gs = g[idx]
    np.testing.assert_allclose(rec["block_grad_norm"], np.linalg.norm(gs), rtol=1e-10)
    np.testing.assert_allclose(rec["grad_norm"], np.linalg.norm(g), rtol=1e-10)
    w, v = _eig_desc(h[np.ix_(idx, idx)])
    np.testing.assert_allclose(rec["eigenvalues"][:3], w[:3], rtol=1e-9)
    np.testing.assert_allclose(rec["f_top"], np.sum((v[:3] @ gs) ** 2) / (gs @ gs), rtol=1e-6)
    assert set(rec["top_eigenvector_layer_mass"]) == {"dense_1/bias", "dense_1/kernel"}
    assert analyzer.store.stored("bases", 0)["eigenvectors"].shape == (6, 18)
    assert len(rec["f_top_minibatch"]) == 2
    wg, vg = _eig_desc(ggn[np.ix_(idx, idx)])
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
    model, ds, params, state = _tiny_problem()
    settings = presets.Settings(
        curvature="ggn", next_bound=True, batch_size=45, num_minibatches=0,
        reference_steps=(0,), transforms=("loss", "gradient", "eigenpairs", "f_top",
                                          "overlap_g_hg", "layers", "subspace_overlap"))
    analyzer = _paper_analyzer(model, ds, str(tmp_path), settings)
    vectors = {}
    for step, p in ((0, params), (7, _moved(params))):
        rec = analyzer.process(step, p, state)
        assert rec["curvature"] == "ggn" and rec["hessian"]["curvature"] == "ggn"
        assert rec["dtype"] == "float32" and len(rec["residuals"]) == 7  # 2k + 1 pairs
        g, h, ggn = _dense_curvatures(model, ds, p)
        w, v = _eig_desc(ggn)
        vectors[step] = v
        np.testing.assert_allclose(rec["eigenvalues"][:6], w[:6], rtol=0,
                                   atol=2 * max(rec["residuals"][:6]))
        assert not np.allclose(rec["eigenvalues"][:3], _eig_desc(h)[0][:3], rtol=1e-2)
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
        analyzer.process(8, jax.tree_util.tree_map(lambda x: 1.1 * x, _moved(params)), state)
    assert n[0] == 0


def test_outputs_too_large_for_a_record_and_clashing_keys_fail_that_checkpoint(caplog):
    """A transform breaking its contract at a checkpoint (an output too large for a record, an
    undeclared key another transform wrote) fails that checkpoint's record with the reason and
    a log line; nothing is thrown through the caller's training loop. A declared clash is
    refused by chain() before any work."""
    model, ds, params, _ = _tiny_problem()
    loss = tasks.cross_entropy_loss(model)
    big = analysis.transform("big", lambda ctx: {"big": np.zeros(200_000)})
    rec = analysis.Analyzer(big, loss, data=ds, progress=False).process(0, params)
    assert rec["status"] == "failed" and "holds 200000 numbers" in rec["reason"]
    assert "Stored" in rec["reason"]
    clash = analysis.transform("clash", lambda ctx: {"grad_norm": 1.0})
    analyzer = analysis.Analyzer(analysis.chain(analysis.gradient(), clash), loss, data=ds,
                                 progress=False, every_steps=1)
    with caplog.at_level("WARNING"):
        rec = analyzer(0, params)  # the live hook: a failure record, the loop goes on
    assert rec["status"] == "failed"
    assert "'grad_norm', which is already in the record" in rec["reason"]
    assert "grad_norm" in caplog.text and "failed" in caplog.text
    declared = analysis.transform("clash", lambda ctx: {"grad_norm": 1.0}, records=("grad_norm",))
    with pytest.raises(ValueError, match="writes the record key 'grad_norm'.*'gradient'"):
        analysis.chain(analysis.gradient(), declared)
    stored = analysis.transform("keep", lambda ctx: {"arrays": analysis.Stored(v=np.ones(3))})
    analyzer = analysis.Analyzer(stored, loss, data=ds, progress=False)
    rec = analyzer.process(0, params)
    assert "arrays" not in rec
    np.testing.assert_array_equal(analyzer.store.stored("arrays", 0)["v"], np.ones(3))


def test_eigenpairs_of_blocks_and_of_the_ggn_beside_the_full_hessian(tmp_path):
    model, ds, params, state = _tiny_problem()
    pipe = analysis.chain(
        analysis.eigenpairs(k=4, tol=1e-6),
        analysis.eigenpairs(k=3, tol=1e-6, block="dense_1", name="last_layer"),
        analysis.eigenpairs(k=3, tol=1e-6, curvature_name="ggn", block=("dense_0",),
                            name="ggn_first_layer"),
        analysis.transform("block_top", lambda ctx: float(ctx["last_layer"].eigenvalues[0]),
                           requires=("last_layer",)))
    analyzer = analysis.Analyzer(pipe, tasks.inference_loss(model, CE), data=ds,
                                 output_fn=tasks.inference_outputs(model),
                                 output_loss=tasks.output_loss(CE), dtype="float64",
                                 results_dir=str(tmp_path), progress=False)
    rec = analyzer.process(0, params, state)
    g, h, ggn = _dense_curvatures(model, ds, params)
    slices = {n: (a, b) for n, a, b in hs.leaf_slices(params)}
    last = np.concatenate([np.arange(*slices[n]) for n in ("dense_1/bias", "dense_1/kernel")])
    first = np.concatenate([np.arange(*slices[n]) for n in ("dense_0/bias", "dense_0/kernel")])
    np.testing.assert_allclose(rec["eigenvalues"], _eig_desc(h)[0][:4], rtol=1e-8)
    np.testing.assert_allclose(rec["last_layer_eigenvalues"],
                               _eig_desc(h[np.ix_(last, last)])[0][:3], rtol=1e-8)
    np.testing.assert_allclose(rec["ggn_first_layer_eigenvalues"],
                               _eig_desc(ggn[np.ix_(first, first)])[0][:3], rtol=1e-8)
    assert rec["block_top"] == rec["last_layer_eigenvalues"][0]
    store = analyzer.store
    assert store.stored("last_layer_bases", 0)["eigenvectors"].shape == (3, last.size)
    assert store.stored("ggn_first_layer_bases", 0)["eigenvectors"].shape == (3, first.size)


def test_loss_and_accuracy_on_the_analysis_and_test_sets():
    model, ds, params, state = _tiny_problem()
    test = data.gaussian_mixture(num_classes=3, dim=6, num_examples=90, sigma=0.5, seed=0,
                                 split="test")
    test = {"x": test["x"][:37], "y": test["y"][:37]}  # ragged against batch_size=16
    analyzer = analysis.Analyzer(analysis.loss(tasks.inference_metrics(model, CE)),
                                 tasks.inference_loss(model, CE), data=ds, test_data=test,
                                 batch_size=16, progress=False)
    rec = analyzer.process(0, params, state)
    for prefix, split in (("train", ds), ("test", test)):
        logits = model.apply({"params": params}, split["x"])
        np.testing.assert_allclose(rec[f"{prefix}_loss"], float(jnp.mean(
            optax.softmax_cross_entropy_with_integer_labels(logits, split["y"]))), rtol=1e-5)
        np.testing.assert_allclose(rec[f"{prefix}_accuracy"], float(jnp.mean(
            jnp.argmax(logits, -1) == split["y"])), rtol=1e-6)
    # Without a metrics function: the analyzer's loss alone, under the same names.
    plain = analysis.Analyzer(analysis.loss(), tasks.inference_loss(model, CE), data=ds,
                              progress=False).process(0, params, state)
    assert set(plain) >= {"train_loss"} and "train_accuracy" not in plain
    np.testing.assert_allclose(plain["train_loss"], rec["train_loss"], rtol=1e-5)


def test_views_f_top_curve_block_spectra_and_adam_against_dense_float64():
    model, ds, params, state = _tiny_problem()
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    grads = jax.grad(tasks.cross_entropy_loss(model))(params, ds)
    for _ in range(3):  # a few updates: a non-trivial second moment
        updates, opt_state = tx.update(grads, opt_state, params)
    blocks = {"first": "dense_0", "last": ("dense_1/kernel", "dense_1/bias")}
    pipe = analysis.chain(
        analysis.gradient(), analysis.eigenpairs(k=12, tol=1e-9), analysis.f_top_curve((3, 5)),
        analysis.block_spectra(blocks, k=3, tol=1e-9, slq_probes=2, slq_steps=8),
        analysis.adam_preconditioned(4, tol=1e-9))
    analyzer = analysis.Analyzer(pipe, tasks.inference_loss(model, CE), data=ds,
                                 dtype="float64", progress=False)
    rec = analyzer.process(3, params, state, extras={"optimizer": opt_state})
    _, g, h, w, v = _dense_reference(model, ds, params)
    curve = np.cumsum((v[:12] @ g) ** 2 / (g @ g))
    np.testing.assert_allclose(rec["f_top_curve"], curve, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose([rec["f_top_at"]["3"], rec["f_top_at"]["5"]], curve[[2, 4]],
                               rtol=1e-6)
    assert rec["k_saturation"] == int(np.argmax(curve >= 0.95 * curve[-1]) + 1)
    slices = {n: (a, b) for n, a, b in hs.leaf_slices(params)}
    for label, names in (("first", ("dense_0/bias", "dense_0/kernel")),
                         ("last", ("dense_1/bias", "dense_1/kernel"))):
        idx = np.concatenate([np.arange(*slices[n]) for n in names])
        np.testing.assert_allclose(rec["block_spectra"][label]["eigenvalues"],
                                   _eig_desc(h[np.ix_(idx, idx)])[0][:3], rtol=1e-8)
        assert rec["block_spectra"][label]["num_params"] == idx.size
    assert set(analyzer.store.stored("block_slq", 3)) == {"first.nodes", "first.weights",
                                                           "last.nodes", "last.weights"}
    # Adam: D = sqrt(nu / (1 - b2^t)) + eps, the spectrum of D^-1/2 H D^-1/2.
    adam_state = opt_state[0]
    nu = np.concatenate([np.ravel(adam_state.nu[n.split("/")[0]][n.split("/")[1]])
                         for n, _, _ in hs.leaf_slices(params)])
    d = np.sqrt(nu / (1 - 0.999 ** int(adam_state.count))) + 1e-8
    s = 1 / np.sqrt(d)
    pre = s[:, None] * h * s[None, :]
    np.testing.assert_allclose(rec["adam_eigenvalues"], _eig_desc(pre)[0][:4], rtol=1e-7)
    top = _eig_desc(pre)[1][:4]
    gs = s * g
    np.testing.assert_allclose(rec["adam_f_top"], np.sum((top @ gs) ** 2) / (gs @ gs),
                               rtol=1e-6)
    assert rec["adam_count"] == 3
    with pytest.raises(ValueError, match="needs Adam's state"):
        analysis.Analyzer(analysis.adam_preconditioned(2), tasks.inference_loss(model, CE),
                          data=ds, progress=False).process(0, params, state)
