"""The per-checkpoint step without files: ``analysis.step.apply`` on a context made by hand
(``analysis.step.context``, no results directory) gives the records the Analyzer writes, over
two checkpoints with the transforms' state threaded by the caller."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hessian_subspace import analysis

from _pipeline import acceptance_problem, user_loss


def _chain():
    return analysis.chain(analysis.loss(), analysis.gradient(),
                          analysis.eigenpairs(k=4, tol=1e-5), analysis.f_top(k=2),
                          analysis.overlap_g_hg(),
                          analysis.subspace_overlap(k=2, reference_steps=(0,)))


def test_the_step_without_files_gives_the_analyzers_records():
    data, params = acceptance_problem()
    loss = user_loss(1e-3)
    later = jax.tree_util.tree_map(lambda x: x * 1.1 + 0.01, params)
    pipe = _chain()
    analyzer = analysis.Analyzer(pipe, loss, data=data, batch_size=64,
                                 results=analysis.Results(progress=False))
    want = [analyzer.process(0, params), analyzer.process(5, later)]
    assert analyzer.store.directory is None

    ctx0 = analysis.step.context(0, params, loss, data, batch_size=64)
    out0 = analysis.step.apply(pipe, ctx0, pipe.init(ctx0))
    ctx5 = analysis.step.context(5, later, loss, data, batch_size=64)
    out5 = analysis.step.apply(pipe, ctx5, out0.state)
    for got, record in ((out0, want[0]), (out5, want[1])):
        assert set(got.record) <= set(record)
        for key in ("train_loss", "grad_norm", "eigenvalues", "residuals", "f_top",
                    "f_top_bound", "overlap_g_hg", "subspace_overlap", "hvps"):
            np.testing.assert_equal(got.record[key], record[key], err_msg=key)
    # The later step warm-started from, and compared with, the state passed in: eigenpairs'
    # basis and subspace_overlap's reference, each the transform's own.
    assert out5.record["warm_start_step"] == 0
    assert "0" in out5.record["subspace_overlap"]
    assert out0.stored == {} and out0.state.keys() == set(pipe.names)
    basis = out0.state["eigenpairs"]["eigenvectors"]
    assert basis.dtype == np.float32 and basis.shape == (4, analyzer.store.state(0)[
        "eigenpairs/eigenvectors"].shape[1])
    np.testing.assert_array_equal(out0.state["subspace_overlap"]["references"]["0"][
        "eigenvectors"], basis)
    # What the analyzer persisted after step 5 is that state, by name.
    saved = analyzer.store.state(5)
    assert set(saved) == set(analysis.state.named(out5.state))
    for name, value in analysis.state.named(out5.state).items():
        np.testing.assert_array_equal(saved[name], value, err_msg=name)


def test_a_step_without_earlier_state_compares_with_nothing_and_taken_keys_are_refused():
    data, params = acceptance_problem()
    pipe = analysis.chain(analysis.gradient(), analysis.eigenpairs(k=3),
                          analysis.subspace_overlap(k=2, reference_steps=(0, 4)))
    ctx = analysis.step.context(4, params, user_loss(0.0), data, batch_size=100)
    out = analysis.step.apply(pipe, ctx, pipe.init(ctx))
    assert out.record["subspace_overlap"] == {}  # no basis of step 0 in the state given
    assert out.record["warm_start_step"] is None
    assert set(out.state["subspace_overlap"]["references"]) == {"4"}  # kept for later steps
    ctx = analysis.step.context(4, params, user_loss(0.0), data, batch_size=100)
    with pytest.raises(analysis.checks.TransformContractError, match="'grad_norm'"):
        analysis.step.apply(pipe, ctx, pipe.init(ctx), taken=("grad_norm",))
    with pytest.raises(ValueError, match="`batch_size` must be an int >= 1"):
        analysis.step.context(0, params, user_loss(0.0), data, batch_size=0)
    ctx = analysis.step.context(0, params, user_loss(0.0), data)
    with pytest.raises(ValueError, match="offers the Hessian only"):
        ctx.operator("ggn")
    assert ctx.operator(block="w1").dim == int(jnp.size(params["w1"]))
