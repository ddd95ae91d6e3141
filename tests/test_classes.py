"""class_mean_subspace against an explicit float64 computation (per-example Jacobians, the dense
Gauss-Newton matrix and Hessian, numpy eigh) and against the toy model of §3, where the top-k
Hessian subspace is known in closed form: span{μ_c ⊗ (k e_c − 1)}."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import flatten_util

from hessian_subspace import analysis
from hessian_subspace.analysis import classes
from hessian_subspace.training import tasks

from _pipeline import CE, dense_curvatures, eig_desc, tiny_problem


def _explicit(output_fn, params, ds):
    """delta_{c,c'}, g_c, π_c and the dense GGN from per-example Jacobians (float64)."""
    flat, unravel = flatten_util.ravel_pytree(params)
    x, y = np.asarray(ds["x"]), np.asarray(ds["y"])
    jac = np.asarray(jax.jacrev(lambda f: output_fn(unravel(f), {"x": x, "y": y}))(flat))
    z = np.asarray(output_fn(params, {"x": x, "y": y}))  # (n, C)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    n, num = z.shape
    eye = np.eye(num)
    # d[i, c'] = sqrt(p_ic') J_i^T (e_c' - p_i)
    d = np.stack([np.stack([np.sqrt(p[i, a]) * jac[i].T @ (eye[a] - p[i]) for a in range(num)])
                  for i in range(n)])
    delta = np.stack([d[y == c].mean(0) for c in range(num)])  # (c, c', p)
    grads = np.stack([np.mean([jac[i].T @ (p[i] - eye[c]) for i in np.where(y == c)[0]], 0)
                      for c in range(num)])
    ggn = sum(jac[i].T @ (np.diag(p[i]) - np.outer(p[i], p[i])) @ jac[i] for i in range(n)) / n
    fractions = np.array([np.mean(y == c) for c in range(num)])
    return d, delta, grads, fractions, ggn


def test_papyans_decomposition_and_class_gradients_match_an_explicit_computation(tmp_path):
    model, ds, params, state = tiny_problem()
    out_fn = tasks.inference_outputs(model)
    k = 3
    analyzer = analysis.Analyzer(
        analysis.chain(analysis.eigenpairs(2 * k, tol=1e-10, num_steps=53),
                       classes.class_mean_subspace(k, tol=1e-10)),
        tasks.inference_loss(model, CE), data=ds, batch_size=32,
        results=analysis.Results(str(tmp_path), progress=False),
        operator=analysis.Operator(dtype="float64", output_fn=out_fn,
                                   output_loss=tasks.output_loss(CE)))
    rec = analyzer.process(0, params, state)
    assert rec["status"] == "ok", rec.get("reason")
    got = rec["class_mean_subspace"]
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        fn = lambda p, b: out_fn(p, b, state)  # noqa: E731
        ds64 = {"x": np.asarray(ds["x"], np.float64), "y": ds["y"]}
        d, delta, grads, fractions, ggn = _explicit(fn, p64, ds64)
        mine = classes.class_vectors(jax.tree_util.Partial(fn), p64,
                                     analysis.step.context(0, p64, lambda p, b: 0.0, ds64,
                                                           batch_size=32)["batches"])
    np.testing.assert_allclose(mine["delta"], delta, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mine["class_gradients"], grads, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mine["fractions"], fractions, rtol=1e-12)
    np.testing.assert_allclose(got["fractions"], fractions, rtol=1e-12)
    # The exact identity G = G_{1+2} + within-class covariance, and G_{1+2} = G0 + G1 + G2.
    f = classes.papyan_factors(delta, fractions)
    outer = {name: rows.T @ rows for name, rows in f.items()}
    np.testing.assert_allclose(outer["G0"] + outer["G1"] + outer["G2"], outer["G12"],
                               atol=1e-12)
    y = np.asarray(ds["y"])
    within = sum(fractions[c] * sum(np.cov(d[y == c, a].T, bias=True) for a in range(3))
                 for c in range(3))
    np.testing.assert_allclose(outer["G12"] + within, ggn, atol=1e-10)
    _, _, ggn_dense = dense_curvatures(model, ds, params)
    np.testing.assert_allclose(ggn, ggn_dense, atol=1e-10)
    # Eigenvalues of each part, and overlaps with the dense Hessian's top-k subspace.
    for name in ("G0", "G1", "G2", "G12"):
        w = np.linalg.eigvalsh(outer[name])[::-1]
        n = len(got["eigenvalues"][name])
        np.testing.assert_allclose(got["eigenvalues"][name], w[:n], rtol=1e-7, atol=1e-12)
    _, h, _ = dense_curvatures(model, ds, params)
    _, vh = eig_desc(h)
    q, _ = np.linalg.qr(grads.T)
    t = np.sum((q.T @ vh[:k].T) ** 2)
    np.testing.assert_allclose(got["hessian"]["class_gradients"]["captured"], t / k, rtol=1e-6)
    np.testing.assert_allclose(got["hessian"]["class_gradients"]["overlap"], t / k, rtol=1e-6)
    wg, vg = eig_desc(ggn)
    np.testing.assert_allclose(got["ggn_eigenvalues"], wg[:k], rtol=1e-7)
    t = np.sum((q.T @ vg[:k].T) ** 2)
    np.testing.assert_allclose(got["ggn"]["class_gradients"]["captured"], t / k, rtol=1e-6)
    _, v12 = eig_desc(outer["G12"])
    t = np.sum((v12[:k] @ vg[:k].T) ** 2)
    np.testing.assert_allclose(got["ggn"]["G12"]["overlap"], t / k, rtol=1e-6)


def _toy(counts=(3, 4, 5), dim=5, steps=20, eta=2.0):
    """Softmax regression without bias on an orthonormal-mean mixture with σ = 0, trained by
    GD from θ = 0: every class's probabilities stay equal over its wrong classes, so its
    Hessian block is a star-graph Laplacian and the top-k eigenvectors are μ_c ⊗ (k e_c − 1)
    (§3, k > 2). Unequal class sizes keep the k top eigenvalues apart (a single-vector Krylov
    method finds one vector per distinct eigenvalue)."""
    num_classes = len(counts)
    means = np.eye(dim)[:num_classes]
    x = np.repeat(means, counts, axis=0)
    y = np.repeat(np.arange(num_classes), counts)
    params = {"w": np.zeros((dim, num_classes))}

    def outputs(p, batch):
        return batch["x"] @ p["w"]

    def loss(p, batch):
        return classes.softmax_cross_entropy(outputs(p, batch), batch)

    with jax.enable_x64(True):
        grad = jax.jit(jax.grad(loss))
        for _ in range(steps):
            params = jax.tree_util.tree_map(lambda a, b: a - eta * b, params,
                                            grad(params, {"x": x, "y": y}))
    return means, {"x": x, "y": y}, jax.tree_util.tree_map(np.asarray, params), outputs, loss


def test_class_mean_spans_are_the_toy_models_top_subspace(tmp_path):
    k = 3
    means, data, params, outputs, loss = _toy()
    analyzer = analysis.Analyzer(
        analysis.chain(analysis.eigenpairs(k, tol=1e-10),
                       classes.class_mean_subspace(k, tol=1e-10)),
        loss, data=data, results=analysis.Results(str(tmp_path), progress=False),
        operator=analysis.Operator(dtype="float64", output_fn=outputs,
                                   output_loss=classes.softmax_cross_entropy))
    rec = analyzer.process(20, params)
    assert rec["status"] == "ok", rec.get("reason")
    got = rec["class_mean_subspace"]
    # The analytic top-k eigenvectors: μ_c ⊗ (k e_c − 1) (ravel order: index i * k + y).
    analytic = np.stack([np.outer(means[c], k * np.eye(k)[c] - 1).ravel() for c in range(k)])
    analytic /= np.linalg.norm(analytic, axis=1, keepdims=True)
    top = np.asarray(analyzer.store.state(20)["eigenpairs/eigenvectors"], np.float64)
    np.testing.assert_allclose(np.sum((top @ analytic.T) ** 2) / k, 1.0, atol=1e-6)
    for part in ("class_gradients", "G0", "G12"):
        for matrix in ("hessian", "ggn"):
            np.testing.assert_allclose(got[matrix][part]["captured"], 1.0, atol=1e-6)
    assert got["hessian"]["class_gradients"]["dim"] == k
    np.testing.assert_allclose(got["hessian"]["class_gradients"]["overlap"], 1.0, atol=1e-6)
    # No within-class spread (σ = 0) and a linear model (H = G): G_{1+2} is the whole matrix,
    # so its non-zero eigenvalues are the Hessian's.
    np.testing.assert_allclose(got["eigenvalues"]["G12"][:k], rec["eigenvalues"], rtol=1e-8)
    np.testing.assert_allclose(got["ggn_eigenvalues"], rec["eigenvalues"], rtol=1e-8)


def test_class_mean_subspace_refuses_bad_input():
    with pytest.raises(ValueError):
        classes.class_mean_subspace(0)
    with pytest.raises(TypeError, match="output_fn"):
        classes.class_mean_subspace(2, output_fn="logits")
    with pytest.raises(ValueError, match="tol"):
        classes.class_mean_subspace(2, tol=0)


def test_class_mean_subspace_refuses_what_it_cannot_hold():
    model, ds, params, state = tiny_problem()
    chain = analysis.chain(analysis.eigenpairs(2), classes.class_mean_subspace(
        2, ggn=False, output_fn=tasks.inference_outputs(model), max_bytes=1000))
    ctx = analysis.step.context(0, params, tasks.inference_loss(model, CE), ds, state=state,
                                batch_size=32)
    with pytest.raises(ValueError, match="12 vectors of 53 parameters.*max_bytes"):
        analysis.step.apply(chain, ctx, chain.init(ctx))
