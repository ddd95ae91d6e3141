"""Seed-level statistics of records (hessian_subspace.analysis.aggregate_runs)."""

import numpy as np
import pytest

from hessian_subspace import analysis


def _records(seed):
    rng = np.random.default_rng(seed)
    out = []
    for step in (0, 10, 20):
        out.append(dict(step=step, status="ok", k=2, f_top=float(rng.uniform()),
                        eigenvalues=[float(x) for x in rng.uniform(size=3)],
                        subspace_overlap={"0": {"top2": float(rng.uniform()), "next": None}},
                        config={"seed": seed}))
    return out


def test_aggregate_runs_against_numpy():
    runs = [_records(s) for s in range(3)]
    runs[2][1]["status"] = "failed"  # step 10 of seed 2 failed: step 10 has 2 runs
    rows = analysis.aggregate_runs(runs)
    assert [r["step"] for r in rows] == [0, 20]  # steps every run has
    rows_any = analysis.aggregate_runs(runs, min_runs=2)
    assert [r["step"] for r in rows_any] == [0, 10, 20] and rows_any[1]["num_runs"] == 2
    row = rows[1]
    f = np.array([run[2]["f_top"] for run in runs])
    assert row["f_top"]["mean"] == pytest.approx(f.mean(), abs=1e-15)
    assert row["f_top"]["std"] == pytest.approx(f.std(ddof=1), abs=1e-15)
    assert (row["f_top"]["min"], row["f_top"]["max"], row["f_top"]["n"]) == (f.min(), f.max(), 3)
    lam = np.array([run[2]["eigenvalues"] for run in runs])
    np.testing.assert_allclose(row["eigenvalues"]["mean"], lam.mean(0), atol=1e-15)
    np.testing.assert_allclose(row["eigenvalues"]["std"], lam.std(0, ddof=1), atol=1e-15)
    top = np.array([run[2]["subspace_overlap"]["0"]["top2"] for run in runs])
    assert row["subspace_overlap"]["0"]["top2"]["mean"] == pytest.approx(top.mean())
    assert "next" not in row["subspace_overlap"]["0"]  # None in every run
    assert row["k"] == 2 and "config" not in row  # shared fields kept, differing ones dropped
    steps, mean, std, lo, hi = analysis.aggregate.mean_and_spread(rows, "f_top")
    assert steps.tolist() == [0, 20] and mean[1] == row["f_top"]["mean"]


def test_aggregate_runs_bad_input():
    with pytest.raises(ValueError, match="`runs` is empty"):
        analysis.aggregate_runs([])
    with pytest.raises(ValueError, match="`min_runs` must be in"):
        analysis.aggregate_runs([_records(0)], min_runs=2)
    one = analysis.aggregate_runs([_records(0)])
    assert one[0]["f_top"]["std"] == 0.0
