"""The views beyond the paper (f_top for every k, per-block spectra, the Adam-preconditioned
Hessian) against dense float64 computations."""

import jax
import numpy as np
import optax
import pytest

import hessian_subspace as hs
from hessian_subspace import analysis
from hessian_subspace.training import tasks

from _pipeline import CE, dense_reference, eig_desc, tiny_problem


def test_views_f_top_curve_block_spectra_and_adam_against_dense_float64():
    model, ds, params, state = tiny_problem()
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
                                 results=analysis.Results(progress=False),
                                 operator=analysis.Operator(dtype="float64"))
    rec = analyzer.process(3, params, state, extras={"optimizer": opt_state})
    _, g, h, w, v = dense_reference(model, ds, params)
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
                                   eig_desc(h[np.ix_(idx, idx)])[0][:3], rtol=1e-8)
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
    np.testing.assert_allclose(rec["adam_eigenvalues"], eig_desc(pre)[0][:4], rtol=1e-7)
    top = eig_desc(pre)[1][:4]
    gs = s * g
    np.testing.assert_allclose(rec["adam_f_top"], np.sum((top @ gs) ** 2) / (gs @ gs),
                               rtol=1e-6)
    assert rec["adam_count"] == 3
    with pytest.raises(ValueError, match="needs Adam's state"):
        analysis.Analyzer(analysis.adam_preconditioned(2), tasks.inference_loss(model, CE), data=ds,
                          results=analysis.Results(progress=False)).process(0, params, state)
