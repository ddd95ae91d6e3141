"""The metric pipeline: every transform against dense float64 references, the toy model,
failure records, compile-once, kill-and-resume, and following a live run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import flatten_util

import hessian_subspace as hs
from hessian_subspace import checkpoint, data, experiment, models, pipeline, train, transforms

from _helpers import count_compilations

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CONFIG = os.path.join(REPO, "launch", "configs", "train.py")


def _tiny_problem(seed=0):
    ds = data.gaussian_mixture(num_classes=3, dim=6, num_examples=90, sigma=0.5, seed=seed)
    model = models.build_model("fc", num_outputs=3, hidden=(5,), activation="softplus")
    params, state = models.init_variables(model, jax.random.key(seed), ds["x"][:1])
    return model, {"x": ds["x"], "y": ds["y"]}, params, state


def _dense_reference(model, ds, params):
    """g, H and its eigen-decomposition in float64, independently of the pipeline."""
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params)
        batch = {"x": jnp.asarray(ds["x"], jnp.float64), "y": jnp.asarray(ds["y"])}
        loss = models.analysis_loss_fn(model, {}, "classification")
        flat, unravel = flatten_util.ravel_pytree(p64)
        g = np.asarray(jax.grad(lambda x: loss(unravel(x), batch))(flat))
        h = np.asarray(jax.hessian(lambda x: loss(unravel(x), batch))(flat))
        value = float(loss(p64, batch))
    w, v = np.linalg.eigh(h)
    order = np.argsort(-w)
    return value, g, h, w[order], v[:, order].T


def test_every_transform_matches_a_dense_float64_computation(tmp_path):
    model, ds, params, state = _tiny_problem()
    settings = pipeline.Settings(dtype="float64", tol=1e-9, lanczos_steps=60, batch_size=32,
                                 num_minibatches=2, minibatch_size=16, reference_steps=(0,))
    pipe = pipeline.Pipeline(model, "classification", ds, str(tmp_path), settings=settings,
                             num_outputs=3)
    moved = jax.tree_util.tree_map(lambda x: x + 0.3 * jnp.sin(jnp.arange(x.size).reshape(
        x.shape)), params)
    rec0 = pipe.process(0, params, state)
    rec1 = pipe.process(7, moved, state)
    bases = {}
    for step, rec, p in ((0, rec0, params), (7, rec1, moved)):
        assert rec["status"] == "ok" and rec["all_converged"]
        value, g, h, w, v = _dense_reference(model, ds, p)
        np.testing.assert_allclose(rec["train_loss"], value, rtol=1e-12)
        np.testing.assert_allclose(rec["grad_norm"], np.linalg.norm(g), rtol=1e-10)
        np.testing.assert_allclose(rec["eigenvalues"], w[:3], rtol=1e-9)
        np.testing.assert_allclose(rec["next_eigenvalues"], w[3:6], rtol=1e-8, atol=1e-12)
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
        assert len(rec["f_top_minibatch"]) == 2
        assert rec["precision"]["lanczos"] == "float64" and rec["versions"]["jax"]
        bases[step] = v
        stored = pipe.store.basis(step)["eigenvectors"]
        assert stored.shape == (6, h.shape[0])
    # Subspace overlap of step 7 with step 0, for d = 2 .. 2k, against dense eigenvectors.
    over = rec1["subspace_overlap"]["0"]
    for d in range(2, 7):
        want = np.sum((bases[7][:d] @ bases[0][:d].T) ** 2) / d
        np.testing.assert_allclose(over[f"top{d}"], want, rtol=1e-5, atol=1e-7)
    want = np.sum((bases[7][3:6] @ bases[0][3:6].T) ** 2) / 3
    np.testing.assert_allclose(over["next"], want, rtol=1e-5, atol=1e-7)
    assert rec1["subspace_overlap"]["previous"]["step"] == 0
    # results.jsonl holds both records in step order; nothing was pickled.
    lines = [json.loads(x) for x in open(tmp_path / "results.jsonl")]
    assert [r["step"] for r in lines] == [0, 7]


def test_toy_model_two_classes_sigma_zero_gradient_lies_in_the_predicted_top_subspace(tmp_path):
    # Softmax regression without biases on 2 orthogonal class means, sigma = 0 (App. E):
    # H and g live in span{(mu1, -mu1), (mu2, -mu2)}, so f_top = 1 to round-off at any time.
    ds = data.gaussian_mixture(num_classes=2, dim=50, num_examples=200, sigma=0.0, seed=3,
                               orthogonal_means=True)
    model = models.build_model("softmax", num_outputs=2, use_bias=False)
    params, state = models.init_variables(model, jax.random.key(0), ds["x"][:1])
    tx = train.make_optimizer("sgd", 0.1)
    step_fn = train.make_train_step(model, tx, "classification", seed=0)
    st = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), model_state=state)
    pipe = pipeline.Pipeline(model, "classification", {"x": ds["x"], "y": ds["y"]},
                             str(tmp_path), settings=pipeline.Settings(
                                 tol=1e-4, num_minibatches=0,
                                 transforms=("loss", "gradient", "eigenpairs", "f_top")),
                             num_outputs=2)
    mu1, mu2 = ds["means"]
    # Kernel layout: (d, classes) raveled row-major, i.e. theta[i, y].
    predicted = np.stack([np.outer(mu1, [1, -1]).ravel(), np.outer(mu2, [1, -1]).ravel()])
    predicted /= np.linalg.norm(predicted, axis=1, keepdims=True)
    for t in range(60):
        if t in (0, 20, 59):
            rec = pipe.process(t, st.params, st.model_state)
            assert abs(rec["f_top"] - 1.0) < 1e-5, (t, rec["f_top"])
            top = pipe.store.basis(t)["eigenvectors"][:2]
            np.testing.assert_allclose(hs.subspace_overlap(top, predicted), 1.0, atol=1e-5)
            assert max(abs(x) for x in rec["next_eigenvalues"]) < 1e-5 * rec["eigenvalues"][0]
        idx = data.batch_indices(200, 20, t, 0)
        st, _ = step_fn(st, {"x": ds["x"][idx], "y": ds["y"][idx]})


def test_non_finite_parameters_give_a_failure_record(tmp_path):
    model, ds, params, state = _tiny_problem()
    pipe = pipeline.Pipeline(model, "classification", ds, str(tmp_path), num_outputs=3)
    bad = jax.tree_util.tree_map(lambda x: x, params)
    bad["dense_1"]["bias"] = bad["dense_1"]["bias"].at[0].set(jnp.nan)
    rec = pipe.process(3, bad, state)
    assert rec["status"] == "failed" and "non-finite" in rec["reason"]
    assert pipe.store.record(3)["status"] == "failed"
    assert pipe.store.basis(3) is None
    good = pipe.process(4, params, state)
    assert good["status"] == "ok"


def test_settings_are_validated_and_a_results_dir_is_not_mixed(tmp_path):
    with pytest.raises(ValueError, match="unknown transforms"):
        pipeline.Settings(transforms=("loss", "nope"))
    with pytest.raises(ValueError, match="needs"):
        pipeline.Settings(transforms=("f_top",))
    model, ds, params, state = _tiny_problem()
    pipeline.Pipeline(model, "classification", ds, str(tmp_path), num_outputs=3)
    with pytest.raises(ValueError, match="other settings"):
        pipeline.Pipeline(model, "classification", ds, str(tmp_path), num_outputs=3,
                          settings=pipeline.Settings(tol=1e-5))


def test_one_compilation_per_transform_and_shape(tmp_path):
    model, ds, params, state = _tiny_problem()
    pipe = pipeline.Pipeline(model, "classification", ds, str(tmp_path), num_outputs=3,
                             settings=pipeline.Settings(batch_size=32))
    pipe.process(0, params, state)
    pipe.process(1, jax.tree_util.tree_map(lambda x: x * 1.1, params), state)
    with count_compilations() as n:
        for t in range(2, 5):
            pipe.process(t, jax.tree_util.tree_map(lambda x, t=t: x * (1 + 0.1 * t), params),
                         state)
    assert n[0] == 0


def test_tracker_warm_start_agrees_with_lanczos_and_counts_its_hvps(tmp_path):
    model, ds, params, state = _tiny_problem()
    # Checkpoints close together (the tracker's regime): it converges and replaces Lanczos.
    steps = [jax.tree_util.tree_map(lambda x, t=t: x * (1 + 1e-3 * t), params) for t in range(3)]
    out = {}
    for tracker in (False, True):
        pipe = pipeline.Pipeline(
            model, "classification", ds, str(tmp_path / str(tracker)), num_outputs=3,
            settings=pipeline.Settings(batch_size=32, k=2, tol=1e-4, tracker=tracker,
                                       tracker_blocks=6,
                                       transforms=("loss", "gradient", "eigenpairs", "f_top")))
        out[tracker] = [pipe.process(t, p, state) for t, p in enumerate(steps)]
    assert "tracker_hvps" not in out[True][0]  # nothing to track from at the first step
    for plain, tracked in zip(out[False][1:], out[True][1:], strict=True):
        assert tracked["tracker_hvps"] > 0 and isinstance(tracked["tracker_converged"], bool)
        np.testing.assert_allclose(tracked["eigenvalues"], plain["eigenvalues"], rtol=1e-3)
        assert abs(tracked["f_top"] - plain["f_top"]) < 1e-3
        assert tracked["tracker_converged"] and tracked["all_converged"]
        assert tracked["hvps"] == tracked["lanczos_hvps"] == tracked["tracker_hvps"]
    with pytest.raises(ValueError, match="tracker"):
        pipeline.Settings(tracker=True, warm_start=False)


def _dense_curvatures(model, ds, params):
    """Dense float64 g, H and GGN of the tiny problem (the GGN from jacfwd, as in test_ggn),
    each under one `jax.jit`."""
    from test_ggn import _dense_ggn
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params)
        batch = {"x": jnp.asarray(ds["x"], jnp.float64), "y": jnp.asarray(ds["y"])}
        loss = models.analysis_loss_fn(model, {}, "classification")
        flat, unravel = flatten_util.ravel_pytree(p64)
        g = np.asarray(jax.jit(jax.grad(lambda x, b: loss(unravel(x), b)))(flat, batch))
        h = np.asarray(jax.jit(hs.dense_hessian)(loss, p64, batch))
        ggn = _dense_ggn(transforms.analysis_output_fn(model, {}), p64, batch, "classification")
    return g, h, ggn


def _eig_desc(m):
    w, v = np.linalg.eigh(m)
    return w[::-1], v[:, ::-1].T


def test_block_analysis_and_ggn_alongside_match_dense_blocks(tmp_path):
    model, ds, params, state = _tiny_problem()
    settings = pipeline.Settings(
        block="dense_1", also_ggn=True, dtype="float64", tol=1e-9, lanczos_steps=18,
        batch_size=45, num_minibatches=2, minibatch_size=16,
        transforms=("loss", "gradient", "eigenpairs", "f_top", "layers"))
    pipe = pipeline.Pipeline(model, "classification", ds, str(tmp_path), settings=settings,
                             num_outputs=3)
    rec = pipe.process(0, params, state)
    g, h, ggn = _dense_curvatures(model, ds, params)
    idx = np.concatenate([np.arange(a, b) for name, a, b in models.layer_slices(params)
                          if name.startswith("dense_1/")])  # 5 x 3 kernel + 3 biases
    assert rec["block"] == dict(prefixes=["dense_1"], leaves=["dense_1/bias", "dense_1/kernel"],
                                num_params=18)
    assert rec["hessian"]["block"]["num_params"] == 18
    gs = g[idx]
    np.testing.assert_allclose(rec["block_grad_norm"], np.linalg.norm(gs), rtol=1e-10)
    np.testing.assert_allclose(rec["grad_norm"], np.linalg.norm(g), rtol=1e-10)
    w, v = _eig_desc(h[np.ix_(idx, idx)])
    np.testing.assert_allclose(rec["eigenvalues"], w[:3], rtol=1e-9)
    np.testing.assert_allclose(rec["f_top"], np.sum((v[:3] @ gs) ** 2) / (gs @ gs), rtol=1e-6)
    assert set(rec["top_eigenvector_layer_mass"]) == {"dense_1/bias", "dense_1/kernel"}
    assert pipe.store.basis(0)["eigenvectors"].shape == (6, 18)
    assert len(rec["f_top_minibatch"]) == 2
    wg, vg = _eig_desc(ggn[np.ix_(idx, idx)])
    np.testing.assert_allclose(rec["ggn_eigenvalues"], wg[:3], rtol=1e-8)
    np.testing.assert_allclose(rec["f_top_ggn"], np.sum((vg[:3] @ gs) ** 2) / (gs @ gs),
                               rtol=1e-6)
    np.testing.assert_allclose(rec["ggn_hessian_overlap"],
                               hs.subspace_overlap(v[:3], vg[:3]), rtol=1e-6)
    pipe.process(1, jax.tree_util.tree_map(lambda x: 1.1 * x, params), state)
    with count_compilations() as n:  # block and GGN-alongside transforms compile once.
        pipe.process(2, jax.tree_util.tree_map(lambda x: 1.2 * x, params), state)
    assert n[0] == 0
    with pytest.raises(ValueError, match="matches no parameter"):
        pipeline.Pipeline(model, "classification", ds, str(tmp_path / "bad"), num_outputs=3,
                          settings=pipeline.Settings(block="dense_7"))
    with pytest.raises(ValueError, match="curvature"):
        pipeline.Settings(curvature="fisher")


def test_ggn_curvature_and_its_error_bars_against_dense_float64_in_a_float32_analysis(
        tmp_path):
    # Every curvature transform with the GGN, 2k + 1 Ritz pairs for the next-k error bars.
    # (The bounds do not depend on the operator; one Lanczos compilation keeps this fast.)
    model, ds, params, state = _tiny_problem()
    settings = pipeline.Settings(
        curvature="ggn", next_bound=True, batch_size=45, num_minibatches=0,
        reference_steps=(0,), transforms=("loss", "gradient", "eigenpairs", "f_top",
                                          "overlap_g_hg", "layers", "subspace_overlap"))
    pipe = pipeline.Pipeline(model, "classification", ds, str(tmp_path), settings=settings,
                             num_outputs=3)
    moved = jax.tree_util.tree_map(lambda x: x + 0.3 * jnp.sin(jnp.arange(x.size).reshape(
        x.shape)), params)
    vectors = {}
    for step, p in ((0, params), (7, moved)):
        rec = pipe.process(step, p, state)
        assert rec["curvature"] == "ggn" and rec["hessian"]["curvature"] == "ggn"
        assert rec["dtype"] == "float32" and len(rec["residuals"]) == 7  # 2k + 1 pairs
        g, h, ggn = _dense_curvatures(model, ds, p)
        w, v = _eig_desc(ggn)
        vectors[step] = v
        # Ritz values within their residuals of the dense GGN's (and not the Hessian's).
        np.testing.assert_allclose(rec["eigenvalues"], w[:3], rtol=0,
                                   atol=2 * max(rec["residuals"][:3]))
        np.testing.assert_allclose(rec["next_eigenvalues"], w[3:6], rtol=0,
                                   atol=2 * max(rec["residuals"][3:6]))
        assert not np.allclose(rec["eigenvalues"], _eig_desc(h)[0][:3], rtol=1e-2)
        np.testing.assert_allclose(rec["lambda_max"], w[0], rtol=1e-4)
        gg = ggn @ g
        np.testing.assert_allclose(rec["overlap_g_hg"],
                                   g @ gg / np.linalg.norm(g) / np.linalg.norm(gg), rtol=1e-4)
        # The error bars hold against the dense float64 eigenvectors, and say something.
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
    with count_compilations() as n:  # GGN transforms and error bars compile once too.
        pipe.process(8, jax.tree_util.tree_map(lambda x: 1.1 * x, moved), state)
    assert n[0] == 0


# ---------------------------------------------------------------------------------------------
# Runs on disk: a small training run shared by the tests below.


class _Process:
    """A subprocess whose output goes to a file (a pipe nobody reads would block it)."""

    def __init__(self, cmd, log_path):
        self.log_path = str(log_path)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)

    def finish(self, timeout=600):
        self.proc.wait(timeout=timeout)
        self._log.close()
        return self.proc.returncode, open(self.log_path).read()

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._log.close()


def _train_run(workdir, num_steps=30, schedule="1:30,5"):
    cmd = [sys.executable, "-m", "launch.train", f"--config={TRAIN_CONFIG}:smoke",
           f"--workdir={workdir}", f"--config.num_steps={num_steps}", "--noprogress",
           f"--config.checkpoint_schedule={schedule}"]
    return _Process(cmd, f"{workdir}.train.log")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    code, out = _train_run(workdir).finish()
    assert code == 0, out[-3000:]
    return workdir


def _snapshot(directory):
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            st = os.stat(path)
            out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns)
    return out


def _analyze(workdir, results, *extra):
    cmd = [sys.executable, "-m", "launch.analyze", f"--workdir={workdir}",
           f"--results={results}", "--batch_size=200", *extra]
    return _Process(cmd, f"{results}.analyze.log")


def _comparable(record):
    drop = {"seconds", "versions"}
    return {k: v for k, v in record.items() if k not in drop}


def test_corrupt_and_mismatched_checkpoints_give_failure_records(finished_run, tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.copytree(finished_run / "checkpoints", ckpts)
    # Corrupt step 3: truncate every array file of its model item.
    for root, _, files in os.walk(ckpts / "3" / "model"):
        for name in files:
            path = os.path.join(root, name)
            if os.path.getsize(path) > 16 and not name.startswith("_"):
                with open(path, "r+b") as f:
                    f.truncate(8)
    before = _snapshot(ckpts)
    config, num_outputs = experiment.read_run_config(str(tmp_path / "run"))
    cfg = experiment.ConfigDict(config)
    loaded = experiment.load_data(cfg)
    model = experiment.build_model(cfg, num_outputs)
    pipe = pipeline.Pipeline(model, "classification", loaded["analysis"],
                             str(tmp_path / "results"), num_outputs=num_outputs, config=config,
                             settings=pipeline.Settings(batch_size=200))
    records = pipe.run(str(ckpts), steps=[2, 3, 4], progress=False)
    status = {r["step"]: r["status"] for r in records}
    assert status == {2: "ok", 3: "failed", 4: "ok"}
    assert "step 3" in records[1]["reason"]
    assert _snapshot(ckpts) == before  # the checkpoint directory is never modified
    # A model whose parameter tree does not match the checkpoints: failure records.
    other = models.build_model("fc", num_outputs=num_outputs, hidden=(7,))
    pipe2 = pipeline.Pipeline(other, "classification", loaded["analysis"],
                              str(tmp_path / "results2"), num_outputs=num_outputs)
    records = pipe2.run(str(ckpts), steps=[5], progress=False)
    assert records[0]["status"] == "failed" and "cannot restore" in records[0]["reason"]


def test_killed_analysis_resumes_without_recomputing(finished_run, tmp_path):
    code, out = _analyze(finished_run, tmp_path / "ref").finish()
    assert code == 0, out[-3000:]
    ref_records = pipeline.read_results(str(tmp_path / "ref"))
    assert len(ref_records) == len(checkpoint.list_steps(finished_run / "checkpoints"))

    results = tmp_path / "killed"
    victim = _analyze(finished_run, results)
    deadline = time.time() + 300
    store = pipeline.ResultStore(str(results))
    while time.time() < deadline and len(store.done_steps()) < 8:
        time.sleep(0.05)
    victim.kill()
    done_before = store.done_steps()
    assert 8 <= len(done_before) < len(ref_records)
    mtimes = {s: os.stat(store.record_path(s)).st_mtime_ns for s in done_before}

    code, out = _analyze(finished_run, results).finish()
    assert code == 0, out[-3000:]
    for s in done_before:  # finished steps were not recomputed
        assert os.stat(store.record_path(s)).st_mtime_ns == mtimes[s]
        assert f"step {s} analysed" not in out
    records = pipeline.read_results(str(results))
    assert [_comparable(r) for r in records] == [_comparable(r) for r in ref_records]


def test_watch_follows_a_live_training_run(tmp_path):
    workdir = tmp_path / "live"
    writer = _train_run(workdir, num_steps=400, schedule="1:10,50")
    analysis = _analyze(workdir, tmp_path / "live_results", "--watch", "--poll_seconds=0.2",
                        "--timeout_seconds=120", "--transforms=loss,gradient,eigenpairs,f_top")
    code_w, out_w = writer.finish()
    code_a, out_a = analysis.finish()
    assert code_w == 0, out_w[-3000:]
    assert code_a == 0, out_a[-3000:]
    steps = [r["step"] for r in pipeline.read_results(str(tmp_path / "live_results"))]
    assert steps == checkpoint.list_steps(workdir / "checkpoints")
    assert steps[-1] == 400


def test_pipeline_as_a_training_callback(tmp_path):
    config = experiment.default_config()
    config.data.name = "gaussian_mixture"
    config.data.kwargs = dict(num_classes=3, dim=20, num_examples=300, sigma=0.3)
    config.model.kwargs.hidden = (8,)
    config.num_steps, config.batch_size, config.checkpoint_schedule = 12, 32, "4"
    loaded = experiment.load_data(config)
    model = experiment.build_model(config, loaded["num_outputs"])
    pipe = pipeline.Pipeline(model, "classification", loaded["analysis"],
                             str(tmp_path / "results"), num_outputs=3,
                             settings=pipeline.Settings(batch_size=100))
    experiment.train_from_config(config, str(tmp_path / "run"),
                                 callbacks=[pipeline.Callback(pipe)], progress=False)
    assert pipe.store.done_steps() == [0, 4, 8, 12]
