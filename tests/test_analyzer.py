"""The Analyzer: the acceptance script of issue 9 (the user's own loss and metric, live and
offline), failure records, settings refused before anything is written, compile-once, and
outputs that break a transform's contract."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hessian_subspace as hs
from hessian_subspace import analysis
from hessian_subspace.training import batches, tasks

from _helpers import count_compilations
from _pipeline import CE, acceptance_problem, config_of, paper_analyzer, tiny_problem, user_loss


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

    analysis_set, params = acceptance_problem()
    loss_fn = user_loss(1e-3)
    pipe = _acceptance_chain()
    tx = optax.sgd(0.5)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, batch):
        updates, opt_state = tx.update(jax.grad(loss_fn)(params, batch), opt_state)
        return optax.apply_updates(params, updates), opt_state

    analyzer = analysis.Analyzer(pipe, loss_fn, data=analysis_set, batch_size=64,
                                 results=analysis.Results(str(tmp_path / "mine"), progress=False),
                                 schedule=analysis.Schedule(every_steps=20))
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
                      results=analysis.Results(str(tmp_path / "offline"), progress=False)
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
        loss = user_loss(weight_decay)
        op = hs.dataset_hvp(loss, p60, analysis_set, batch_size=64)
        top = hs.top_eigenpairs(op, hs.random_start_vector(jax.random.key(5), p60), 6, tol=1e-5)
        _, g = hs.dataset_value_and_grad(loss, p60, analysis_set, batch_size=64)
        direct = float(hs.gradient_fraction(g, top.eigenvectors[:3]))
        rec = analysis.Analyzer(pipe, loss, data=analysis_set, batch_size=64,
                                results=analysis.Results(progress=False)).process(60, p60)
        np.testing.assert_allclose(rec["f_top"], direct, atol=2e-5)
        np.testing.assert_allclose(rec["eigenvalues"], np.asarray(top.eigenvalues), rtol=2e-3)
        if weight_decay:
            with_decay = rec["f_top"]
            np.testing.assert_allclose(with_decay, records[-1]["f_top"], rtol=1e-5)
        else:
            without = rec["f_top"]
    # The weight-decay term changes f_top by far more than the computations disagree (~1e-6).
    assert abs(with_decay - without) > 50 * 2e-5


def test_non_finite_parameters_and_gradients_give_failure_records(tmp_path):
    model, ds, params, state = tiny_problem()
    analyzer = paper_analyzer(model, ds, str(tmp_path))
    bad = jax.tree_util.tree_map(lambda x: x, params)
    bad["dense_1"]["bias"] = bad["dense_1"]["bias"].at[0].set(jnp.nan)
    rec = analyzer.process(3, bad, state)
    assert rec["status"] == "failed" and "non-finite" in rec["reason"]
    assert analyzer.store.record(3)["status"] == "failed"
    assert analyzer.store.state(3) is None
    assert analyzer.process(4, params, state)["status"] == "ok"
    # Inputs that make the loss (not the parameters) non-finite: caught during the analysis.
    inf_data = dict(ds, x=np.where(np.arange(90)[:, None] == 5, np.inf, ds["x"]))
    rec = analysis.Analyzer(analysis.chain(analysis.gradient()), tasks.cross_entropy_loss(model),
                            data=inf_data, results=analysis.Results(progress=False)
                            ).process(0, params)
    assert rec["status"] == "failed" and "gradient is not finite" in rec["reason"]


def test_invalid_settings_are_refused_before_anything_is_written(tmp_path):
    model, ds, params, state = tiny_problem()
    loss = tasks.inference_loss(model, CE)
    pipe = analysis.chain(analysis.gradient())
    results = tmp_path / "results"
    for make, match in ((lambda: analysis.Operator(precision="fastest"), "precision"),
                        (lambda: analysis.Operator(dtype="float16"), "dtype"),
                        (lambda: dict(batch_size=0), "batch_size"),
                        (lambda: analysis.Operator(curvature="fisher"), "curvature"),
                        (lambda: analysis.Operator(curvature="ggn"), "output_fn"),
                        (lambda: analysis.Schedule(every_steps=0), "every"),
                        (lambda: analysis.Operator(block=""), "block"),
                        (lambda: dict(data={"x": np.zeros((0, 3))}), "data")):
        with pytest.raises(ValueError, match=match):
            spec = make()
            args = dict(data=ds, results=analysis.Results(str(results), progress=False))
            args.update(spec if isinstance(spec, dict) else
                        {type(spec).__name__.lower(): spec})
            analysis.Analyzer(pipe, loss, **args)
    with pytest.raises(TypeError, match="`operator` must be analysis.Operator"):
        analysis.Analyzer(pipe, loss, data=ds, operator="ggn")
    with pytest.raises(ValueError, match="`config.k` must be an int >= 1"):
        config_of(k=-3)
    with pytest.raises(ValueError, match="unknown transforms"):
        config_of(transforms=("loss", "nope"))
    # A block that matches no parameter, and a loss that needs a state nobody gave: refused at
    # the first checkpoint, still before any file.
    analyzer = analysis.Analyzer(pipe, loss, data=ds,
                                 results=analysis.Results(str(results), progress=False),
                                 operator=analysis.Operator(block="dense_7"))
    with pytest.raises(ValueError, match="matches no parameter"):
        analyzer.process(0, params, state)
    with pytest.raises(TypeError, match="takes a model state"):
        analyzer.process(0, params)
    assert not results.exists()
    # The corrected run starts cleanly; another setting in the same directory is refused.
    analysis.Analyzer(pipe, loss, data=ds, results=analysis.Results(str(results), progress=False)
                      ).process(0, params, state)
    with pytest.raises(analysis.StaleResultsError, match="other settings.*batch_size"):
        analysis.Analyzer(pipe, loss, data=ds, batch_size=7,
                          results=analysis.Results(str(results), progress=False))
    with pytest.raises(ValueError, match="other settings.*transforms"):
        analysis.Analyzer(analysis.chain(analysis.gradient(), analysis.eigenpairs(k=2)), loss,
                          data=ds, results=analysis.Results(str(results), progress=False))


def test_one_compilation_per_transform_and_shape(tmp_path):
    model, ds, params, state = tiny_problem()
    analyzer = paper_analyzer(model, ds, str(tmp_path), config_of(batch_size=32))
    analyzer.process(0, params, state)
    analyzer.process(1, jax.tree_util.tree_map(lambda x: x * 1.1, params), state)
    with count_compilations() as n:
        for t in range(2, 5):
            analyzer.process(t, jax.tree_util.tree_map(lambda x, t=t: x * (1 + 0.1 * t), params),
                             state)
    assert n[0] == 0


def test_outputs_too_large_for_a_record_and_clashing_keys_fail_that_checkpoint(caplog):
    """A transform breaking its contract at a checkpoint (an output too large for a record, an
    undeclared key another transform wrote) fails that checkpoint's record with the reason and
    a log line; nothing is thrown through the caller's training loop. A declared clash is
    refused by chain() before any work."""
    model, ds, params, _ = tiny_problem()
    loss = tasks.cross_entropy_loss(model)
    big = analysis.transform("big", lambda ctx: {"big": np.zeros(200_000)})
    rec = analysis.Analyzer(big, loss, data=ds, results=analysis.Results(progress=False)
                            ).process(0, params)
    assert rec["status"] == "failed" and "holds 200000 numbers" in rec["reason"]
    assert "Stored" in rec["reason"]
    clash = analysis.transform("clash", lambda ctx: {"grad_norm": 1.0})
    analyzer = analysis.Analyzer(analysis.chain(analysis.gradient(), clash), loss, data=ds,
                                 results=analysis.Results(progress=False),
                                 schedule=analysis.Schedule(every_steps=1))
    with caplog.at_level("WARNING"):
        rec = analyzer(0, params)  # the live hook: a failure record, the loop goes on
    assert rec["status"] == "failed"
    assert "'grad_norm', which is already in the record" in rec["reason"]
    assert "grad_norm" in caplog.text and "failed" in caplog.text
    declared = analysis.transform("clash", lambda ctx: {"grad_norm": 1.0}, records=("grad_norm",))
    with pytest.raises(ValueError, match="writes the record key 'grad_norm'.*'gradient'"):
        analysis.chain(analysis.gradient(), declared)
    stored = analysis.transform("keep", lambda ctx: {"arrays": analysis.Stored(v=np.ones(3))})
    analyzer = analysis.Analyzer(stored, loss, data=ds, results=analysis.Results(progress=False))
    rec = analyzer.process(0, params)
    assert "arrays" not in rec
    np.testing.assert_array_equal(analyzer.store.stored("arrays", 0)["v"], np.ones(3))
