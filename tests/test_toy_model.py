"""The toy model of §3 / App. E against its late-time solution, and the paper's claims (a)-(c).

Tolerances come from the asymptotics derived in ``hessian_subspace/toy_model.py``: with
x = ηt, the top eigenvalue obeys  x·λ_1 - 1 = ((1 - η/2) log x - C') / x + o(1/x)  with
C' ≈ e^{z(0)} + 2 set by the initial margin z(0) ~ N(0, 2/d) (flax's lecun-normal kernel,
variance 1/d per entry), so |C'| < 5 whenever |z(0)| < 1 (5 standard deviations at d = 40).
The subspace, the gradient's place in it and the flat directions are exact at every step, so
those are tested to float64 rounding.
"""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
from jax import flatten_util
import pytest

import hessian_subspace as hs
from hessian_subspace.paper import data as data_lib
from hessian_subspace.paper import models, toy_claims, toy_model
from hessian_subspace.training import tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = float(np.finfo(np.float64).eps)
ETA = 1.0
K_CONST = 5.0  # bound on |C'| (module docstring above)
STEPS = (0, 10, 100, 1000, 3000, 10000)
SMALL = dict(dim=40, learning_rate=ETA, seed=0)


def _orthonormal_means(k, d, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, k)))
    return q.T


def _envelope(x, eta=ETA):
    """Bound on the relative error of a late-time quantity at x = ηt (module docstring)."""
    return (abs(1 - eta / 2) * math.log(x) + K_CONST) / x


# ------------------------------------------------------------------ the analytic solution


@pytest.mark.parametrize("k", [2, 3, 5])
def test_analytic_hessian_spectrum_and_eigenvectors(k):
    d, eta, t = 7, 0.3, 50.0
    means = _orthonormal_means(k, d)
    sol = toy_model.analytic_late_time(means=means, eta=eta, t=t)
    h = toy_model.analytic_hessian(means=means, eta=eta, t=t)
    x = eta * t
    w = np.sort(np.linalg.eigvalsh(h))[::-1]
    # Exact algebra (float64 rounding only): k eigenvalues 1/x, k(k-2) at 1/(kx), the rest 0.
    np.testing.assert_allclose(w[:k], 1 / x, rtol=1e-12)
    np.testing.assert_allclose(w[k:k * (k - 1)], 1 / (k * x), rtol=1e-12)
    np.testing.assert_allclose(w[k * (k - 1):], 0.0, atol=1e-12 / x)
    assert sol["eigenvalue"] == pytest.approx(1 / x, rel=1e-15)
    assert sol["rank"] == k * (k - 1)
    vecs = sol["eigenvectors"]
    assert vecs.shape == (k, d * k)
    np.testing.assert_allclose(vecs @ vecs.T, np.eye(k), atol=1e-12)
    np.testing.assert_allclose(h @ vecs.T, vecs.T / x, atol=1e-12 / x)
    # The gradient lies in the predicted top subspace and is a unit vector.
    direction = sol["gradient_direction"]
    assert np.linalg.norm(direction) == pytest.approx(1.0, abs=1e-12)
    with jax.enable_x64(True):  # the metric in float64, like the data
        assert float(hs.gradient_fraction(direction, vecs)) == pytest.approx(1.0, abs=1e-12)
    assert sol["gradient_norm"] == pytest.approx(math.sqrt(k - 1) / x, rel=1e-12)


def test_analytic_k2_is_the_papers_formula():
    d, eta, t = 5, 0.1, 1e3
    means = _orthonormal_means(2, d, seed=3)
    mu1, mu2 = means
    sol = toy_model.analytic_late_time(means=means, eta=eta, t=t)
    # (mu_1, -mu_1)/sqrt2 and (mu_2, -mu_2)/sqrt2 in ravel order of the (d, 2) kernel: i*2 + y.
    expected = np.stack([np.stack([mu, -mu], axis=1).reshape(-1) for mu in (mu1, mu2)])
    np.testing.assert_allclose(sol["eigenvectors"], expected / np.sqrt(2), atol=1e-14)
    # grad_theta1 = -grad_theta2 = (mu_2 - mu_1) / (2 eta t), norm sqrt2 |mu_2 - mu_1| / (2 eta t).
    grad = np.stack([mu2 - mu1, mu1 - mu2], axis=1).reshape(-1) / (2 * eta * t)
    np.testing.assert_allclose(sol["gradient_direction"] * sol["gradient_norm"], grad,
                               atol=1e-15)
    assert sol["gradient_norm"] == pytest.approx(
        math.sqrt(2) * np.linalg.norm(mu2 - mu1) / (2 * eta * t), rel=1e-13)
    assert sol["next_eigenvalue"] is None


def test_analytic_matches_autodiff_on_the_papers_trajectory():
    """Gradient and Hessian of the real loss at θ(t) of eqs. 15-16 against eqs. 17-18."""
    d, eta, t, c = 6, 0.5, 2e4, (0.5, 2.0)
    means = _orthonormal_means(2, d, seed=1)
    mu1, mu2 = means
    rng = np.random.default_rng(0)
    perp = rng.normal(size=(2, d))
    perp -= perp @ means.T @ means  # θ̃_i ⟂ μ_1, μ_2
    bar = 0.3 * mu1 - 0.7 * mu2  # θ̄ ∈ span(μ_1, μ_2)
    l1, l2 = math.log(eta * t + c[0]), math.log(eta * t + c[1])
    theta1 = perp[0] + bar + mu1 * l1 / 2 - mu2 * l2 / 2
    theta2 = perp[1] + bar - mu1 * l1 / 2 + mu2 * l2 / 2
    with jax.enable_x64(True):
        model = models.build_model("softmax", num_outputs=2, use_bias=False)
        loss_fn = hs.curvature.bind_state(tasks.inference_loss(model, "classification"), {})
        params = {"dense_0": {"kernel": np.stack([theta1, theta2], axis=1)}}
        batch = {"x": means, "y": np.array([0, 1])}  # σ = 0: one example per class suffices
        _, grad = hs.dataset_value_and_grad(loss_fn, params, batch, batch_size=2)
        g = np.asarray(flatten_util.ravel_pytree(grad)[0])
        h = np.asarray(hs.dense_hessian(loss_fn, params, batch))
    # Exactly: the margins are z_i = log(ηt + c_i), q_i = 1/(1 + ηt + c_i) and
    # grad_theta1 = (q_2 μ_2 - q_1 μ_1)/2. Autodiff forms q as softmax - onehot = p - 1 with
    # p ≈ 1, so q carries p's absolute rounding (a few eps), not a relative one.
    q = [1 / (1 + eta * t + ci) for ci in c]
    exact = (q[1] * mu2 - q[0] * mu1) / 2
    np.testing.assert_allclose(g, np.stack([exact, -exact], axis=1).reshape(-1),
                               rtol=0, atol=10 * EPS)
    # Against the late-time limit: q_i ηt - 1 = -(1 + c_i)/(1 + ηt + c_i), so relative
    # errors are at most (1 + max c)/(ηt) for the gradient and (2 + max c)/(ηt) for the
    # Hessian (q(1-q) = 1/(E + 2 + 1/E) with E = ηt + c).
    sol = toy_model.analytic_late_time(means=means, eta=eta, t=t)
    x = eta * t
    assert abs(np.linalg.norm(g) / sol["gradient_norm"] - 1) <= (1 + max(c)) / x
    assert g @ sol["gradient_direction"] / np.linalg.norm(g) >= 1 - ((c[1] - c[0]) / x) ** 2
    h_pred = toy_model.analytic_hessian(means=means, eta=eta, t=t)
    assert np.linalg.norm(h - h_pred) / np.linalg.norm(h_pred) <= (3 + max(c)) / x


def test_analytic_rejects_non_orthonormal_means():
    with pytest.raises(ValueError, match="orthonormal"):
        toy_model.analytic_late_time(means=np.array([[1.0, 0.0], [0.6, 0.8]]), eta=1.0, t=1.0)
    with pytest.raises(ValueError, match="t > 0"):
        toy_model.analytic_late_time(means=np.eye(2), eta=1.0, t=0.0)


# ------------------------------------------------------------- simulation vs the solution


@pytest.fixture(scope="module")
def clean_run():
    cfg = dict(num_classes=2, num_examples=20, sigma=0.0, use_bias=False,
               orthogonal_means=True, measure_at=STEPS, **SMALL)
    records = toy_model.simulate(**cfg)
    means = data_lib.gaussian_mixture(num_classes=2, dim=cfg["dim"], num_examples=20,
                                      sigma=0.0, seed=0, orthogonal_means=True)["means"]
    return cfg, records, means


def test_simulation_matches_late_time_solution(clean_run):
    cfg, records, means = clean_run
    assert [r["step"] for r in records] == list(STEPS)
    p = cfg["dim"] * 2
    # The float32 means are orthonormal to delta; the predicted vectors inherit that error.
    delta = float(np.max(np.abs(means.astype(np.float64) @ means.T.astype(np.float64)
                                - np.eye(2))))
    rows = toy_model.compare_with_analytic(records, means, ETA)
    assert [r["step"] for r in rows] == list(STEPS[1:])
    for rec in records:
        # H has rank 2 and g lies in its range at every step: f_top = 1 up to rounding.
        assert 1 - rec["f_top"] <= 1e3 * EPS
        assert rec["num_large"] == 2
    for row in rows:
        x = row["eta_t"]
        assert 1 - row["subspace_overlap"] <= 10 * delta + 1e3 * EPS
        # The 2d - 2 flat directions: zero up to eigh's rounding, ~p eps relative.
        assert row["flat_ratio"] <= 100 * p * EPS
        if x >= 100:
            assert abs(row["eigenvalue_rel_error"]) <= _envelope(x)
            assert abs(row["gradient_norm_rel_error"]) <= _envelope(x)
            # cos = (q_1 + q_2)/sqrt(2(q_1² + q_2²)) = 1 - O(((C'_1 - C'_2)/ηt)²).
            assert row["gradient_cosine"] >= 1 - (K_CONST / x) ** 2
    late = {row["step"]: row for row in rows}
    assert abs(late[10000]["eigenvalue_rel_error"]) < 1e-3  # "within a few %", and then some
    # x ε - (1 - η/2) log x tends to the constant -C'; the neglected terms are O(log² x / x).
    c3, c4 = (late[s]["eigenvalue_error_constant"] for s in (3000, 10000))
    assert abs(c4 - c3) <= math.log(3000.0) ** 2 / 3000.0
    assert abs(c4) < K_CONST
    # |ε| ~ ((1 - η/2) log x - C')/x peaks at x* = exp(1 + C'/(1 - η/2)) and decreases beyond.
    x_peak = math.exp(1 - c4 / (1 - ETA / 2))
    assert x_peak < 1000
    errs = [abs(late[s]["eigenvalue_rel_error"]) for s in (10, 1000, 3000, 10000)]
    assert errs == sorted(errs, reverse=True)


def test_simulation_records_and_eq10(clean_run):
    _, records, _ = clean_run
    assert records[0]["overlap_prev"] is None
    for rec in records[1:]:
        assert rec["overlap_prev"] == pytest.approx(1.0, abs=1e-6)  # the top subspace is fixed
    for rec in records:
        assert rec["eigen_method"] == "dense" and rec["eigen_converged"] == len(rec["eigenvalues"])
        assert rec["gradient"].shape == (80,) and rec["top_eigenvectors"].shape == (2, 80)
        assert rec["f_top"] <= sum(rec["c2"]) <= 1 + 1e3 * EPS  # orthonormal eigenvectors
    # Eq. 10 drops the (η²/2) ∇³L[g, g] term; relative to the kept change η H g it is about
    # η q / 2 = 1/(2t) here (q ≈ 1/(ηt) the wrong-class probability), so at most 1/t.
    for rec in records[1:]:
        assert rec["eq10_residual"] <= 1.0 / rec["step"]
    json.dumps(toy_claims.jsonable(records))  # the vectors are dropped, the rest serialises


def test_k3_has_k_times_k_minus_1_directions_and_approaches_the_extension():
    """k = 3 (footnote 14): rank k(k - 1) = 6 at every step (exact), and the late-time form of
    the module docstring approached as t grows (slowly: no rate is asserted, only progress)."""
    k, d = 3, 12
    records = toy_model.simulate(num_classes=k, dim=d, num_examples=3, sigma=0.0,
                                 use_bias=False, learning_rate=ETA, measure_at=(1000, 10000),
                                 orthogonal_means=True, seed=0, num_eigenvalues=k * (k - 1) + 2)
    means = data_lib.gaussian_mixture(num_classes=k, dim=d, num_examples=3, sigma=0.0, seed=0,
                                      orthogonal_means=True)["means"]
    early, late = toy_model.compare_with_analytic(records, means, ETA)
    for rec, row in zip(records, (early, late), strict=True):
        lam = rec["eigenvalues"]
        # Six non-trivial directions (the sixth tends to λ_1/k = λ_1/3; 0.05 only separates
        # it from zero) and exactly flat ones beyond (rounding, ~p eps).
        assert lam[k * (k - 1) - 1] > 0.05 * lam[0]
        assert row["flat_ratio"] <= 100 * d * k * EPS
    assert abs(late["eigenvalue_rel_error"]) < abs(early["eigenvalue_rel_error"])
    assert abs(late["next_eigenvalue_rel_error"]) < abs(early["next_eigenvalue_rel_error"])
    assert 1 - late["subspace_overlap"] < 1 - early["subspace_overlap"]
    assert 1 - late["gradient_cosine"] < 1 - early["gradient_cosine"]


def test_compare_rejects_bias_records(clean_run):
    cfg, _, means = clean_run
    records = toy_model.simulate(**{**cfg, "use_bias": True, "measure_at": (5,)})
    with pytest.raises(ValueError, match="no biases"):
        toy_model.compare_with_analytic(records, means, ETA)


# -------------------------------------------------------------------- the claims of §3


@pytest.fixture(scope="module")
def claim_runs():
    configs = [(2, 0.0, False), (2, 0.02, False), (2, 0.0, True), (5, 0.0, False),
               (5, 0.0, True)]
    runs = []
    for k, sigma, bias in configs:
        cfg = dict(num_classes=k, num_examples=100, sigma=sigma, use_bias=bias,
                   measure_at=(0, 100, 3000), orthogonal_means=True, **SMALL)
        runs.append({"name": toy_claims.run_name(k, sigma, bias), "config": cfg,
                     "records": toy_model.simulate(**cfg)})
    return runs


def test_claims_reproduce(claim_runs):
    claims = toy_claims.check_claims(claim_runs)
    assert claims["reproduced"] == {"a": True, "b": True, "c": True}
    (a,) = claims["a_noise"]["runs"]
    # σ = 0: the bulk is exactly flat (rounding); σ = 0.02: non-zero but σ²-suppressed.
    assert a["bulk_ratio_sigma0"] <= 100 * 80 * EPS
    assert toy_claims.BULK_NONZERO < a["bulk_ratio"] < toy_claims.BULK_SMALL
    assert a["f_top"] >= 0.99
    b = {row["k"]: row for row in claims["b_bias"]["runs"]}
    for k, row in b.items():
        assert row["num_large"] == k - 1 and row["argmax_c2"] == k and row["c2_k"] >= 0.5
    # k = 2 with a bias, late-time symmetric limit (orthonormal means): inputs (μ_y, 1) have
    # Gram [[2, 1], [1, 2]], so the eigenvalues are 3q(1-q) and q(1-q): ratio 1/3, O(log x/x).
    assert abs(b[2]["split"] - 1 / 3) <= _envelope(3000.0)
    (c,) = claims["c_many_classes"]["runs"]
    assert c["f_top"] >= 0.99 and c["gap"] < 1


def test_claims_report_failures_instead_of_hiding_them(claim_runs):
    # Early, before the gradient has moved into the top subspace (k = 5, step 0), the same
    # criteria must come back False with the numbers, not True.
    early = [{**run, "records": run["records"][:1]} for run in claim_runs
             if run["name"] == "k5_sigma0_nobias"]
    claims = toy_claims.check_claims(early)
    assert claims["reproduced"]["c"] is False
    assert claims["c_many_classes"]["runs"][0]["f_top"] < 0.99
    assert claims["reproduced"]["a"] is None and claims["reproduced"]["b"] is None


# --------------------------------------------------------------------------- the launcher


def test_launch_smoke_writes_json(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "launch.toy_model", "--smoke", f"--out_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "toy_model.json") as f:
        results = json.load(f)
    assert len(results["runs"]) == 12
    assert {run["config"]["num_classes"] for run in results["runs"]} == {2, 5, 10}
    assert results["analytic"]["comparison"][-1]["subspace_overlap"] > 0.999
    assert set(results["claims"]["reproduced"]) == {"a", "b", "c"}
    assert "late-time solution" in proc.stdout
