"""Tests for hessian_subspace.paper.figures on synthetic records (no training, Agg backend)."""

import os

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from hessian_subspace.paper import figures  # noqa: E402

K = 3
STEPS = list(range(0, 120, 10))  # 12 ok records
REFS = (0, 20, 50)


def _record(step: int) -> dict:
    rng = np.random.default_rng(step)
    c2 = np.abs(rng.normal(size=2 * K)) * 0.1
    so = {}
    for t1 in sorted(set(REFS) | {step - 10}):
        if 0 <= t1 < step:
            decay = np.exp(-(step - t1) / 100)
            so[str(t1)] = {f"top{d}": float(decay * (1 - 0.05 * d)) for d in range(2, 2 * K + 1)}
            so[str(t1)]["next"] = float(decay ** 4)
    if step > 0:
        so["previous"] = {**so[str(step - 10)], "step": step - 10}
    return {
        "status": "ok", "step": step, "k": K,
        "train_loss": float(np.exp(-step / 50)),
        "train_accuracy": float(1 - 0.6 * np.exp(-step / 30)),
        "f_top": float(1 - np.exp(-step / 20)),
        "f_top_minibatch": [0.5, 0.6], "f_top_minibatch_mean": 0.55,
        "eigenvalues": [3.0 + step / 100, 2.0, 1.0, 0.5, 0.4, 0.3],  # top k, then next k
        "lambda_max": 3.0 + step / 100,
        "c2": [float(c) for c in c2],
        "subspace_overlap": so,
        "layer_slices": [["dense_0/bias", 0, 4], ["dense_0/kernel", 4, 20],
                         ["dense_1/kernel", 20, 30]],
    }


@pytest.fixture
def records():
    recs = [_record(s) for s in STEPS]
    recs.insert(3, {"status": "failed", "step": 25, "reason": "lanczos diverged"})
    recs[5]["f_top"] = None  # step 40: a non-finite value
    recs[5]["lambda_max"] = None
    recs[5]["eigenvalues"] = [None, 2.0, 1.0, 0.5, 0.4, 0.3]
    return recs


def _lines(ax):
    return [ln for ln in ax.get_lines() if len(ln.get_xdata())]


def test_fig1_ftop_from_records(records):
    fig = figures.fig1_ftop(records, title="t")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3  # f_top, loss, twin accuracy
    lines = _lines(fig.axes[0])
    assert len(lines) == 2  # full-data and mini-batch mean
    # 12 ok records, the failed one dropped and the None f_top at step 40 skipped.
    np.testing.assert_array_equal(lines[0].get_xdata(), [s for s in STEPS if s != 40])
    assert len(lines[1].get_xdata()) == len(STEPS)


def test_fig1_ftop_from_train_log(records):
    log = [{"step": s, "event": "train", "loss": 1.0 / (s + 1), "accuracy": s / 200}
           for s in range(200)]
    log += [{"step": s, "event": "checkpoint", "test_loss": 0.1, "test_accuracy": 0.9}
            for s in STEPS]
    fig = figures.fig1_ftop(records, log, log_x=True, window=10)
    assert len(fig.axes) == 3
    loss_lines = _lines(fig.axes[1])
    assert len(loss_lines) == 2  # raw (faint) and running mean
    assert all(len(ln.get_xdata()) == 200 for ln in loss_lines)
    smoothed = np.asarray(loss_lines[1].get_ydata())
    np.testing.assert_allclose(smoothed[-1], np.mean([1.0 / (s + 1) for s in range(190, 200)]))
    assert fig.axes[0].get_xscale() == "symlog"


def test_fig1_regression_log_has_no_accuracy_axis(records):
    log = [{"step": s, "event": "train", "loss": 1.0} for s in range(20)]
    assert len(figures.fig1_ftop(records, log).axes) == 2


def test_fig1_raises_without_ftop():
    with pytest.raises(ValueError, match="f_top"):
        figures.fig1_ftop([{"status": "ok", "step": 0}, {"status": "failed", "step": 1}])


def test_fig2_subspace_overlap(records):
    fig = figures.fig2_subspace_overlap(records, t1_steps=[0, 20, 50, 999])
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert len(_lines(ax)) == 3  # 999 is not a reference step
    x = _lines(fig.axes[0])[0].get_xdata()  # t1 = 0
    np.testing.assert_array_equal(x, [s for s in STEPS if s > 0])
    y = _lines(fig.axes[0])[0].get_ydata()
    np.testing.assert_allclose(y[0], np.exp(-0.1) * (1 - 0.05 * K))
    with pytest.raises(ValueError):
        figures.fig2_subspace_overlap(records, t1_steps=[999])


def test_fig3_overlap_vs_dim(records):
    fig = figures.fig3_overlap_vs_dim(records, t1=20)
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    data = [ln for ln in _lines(ax) if ln.get_marker() == "o"]  # not the error-bar caps
    assert len(data) == 1
    np.testing.assert_array_equal(data[0].get_xdata(), range(2, 2 * K + 1))
    decays = [np.exp(-(s - 20) / 100) for s in STEPS if s > 20]
    np.testing.assert_allclose(np.asarray(data[0].get_ydata(), float),
                               [np.mean(decays) * (1 - 0.05 * d) for d in range(2, 2 * K + 1)])
    vlines = [ln for ln in _lines(ax) if len(set(ln.get_xdata())) == 1]
    assert any(ln.get_xdata()[0] == K for ln in vlines)
    multi = figures.fig3_overlap_vs_dim(records, t1=[0, 50], dims=[2, 3, 4])
    assert len([ln for ln in _lines(multi.axes[0]) if ln.get_marker() == "o"]) == 2
    with pytest.raises(ValueError):
        figures.fig3_overlap_vs_dim(records, t1=999)


def test_fig4_dense_spectrum():
    rng = np.random.default_rng(0)
    ev = np.concatenate([rng.normal(0, 0.01, 200), [5.0, 4.0, 3.0], [np.nan]])
    fig = figures.fig4_dense_spectrum(ev, title="step 0", k=K, bins=50)
    assert len(fig.axes) == 2
    assert len(fig.axes[0].patches) == 50
    assert fig.axes[0].get_yscale() == "log"
    top_red = _lines(fig.axes[1])[0]
    np.testing.assert_array_equal(top_red.get_ydata(), [5.0, 4.0, 3.0])
    with pytest.raises(ValueError):
        figures.fig4_dense_spectrum([np.nan])


def test_fig5_slq_density_integrates_to_one():
    rng = np.random.default_rng(0)
    nodes = np.sort(rng.uniform(-0.1, 2.0, size=(4, 20)), axis=1)
    weights = rng.uniform(size=(4, 20))
    weights /= weights.sum(axis=1, keepdims=True)
    fig = figures.fig5_slq_density(nodes, weights, num_grid=2000)
    assert len(fig.axes) == 2
    assert fig.axes[1].get_xscale() == "log"
    line = _lines(fig.axes[0])[0]
    x, y = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
    np.testing.assert_allclose(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)), 1.0, atol=1e-3)
    lin = figures.fig5_slq_density(nodes[0], weights[0], sigma=0.05, log_eigenvalue=False)
    assert len(lin.axes) == 1
    with pytest.raises(ValueError):
        figures.fig5_slq_density(nodes, weights[:, :3])


def test_fig6_eigenvector_anatomy_fixes_sign(records):
    v = np.zeros(30)
    v[5], v[25] = -0.9, 0.3
    fig = figures.fig6_eigenvector_anatomy({0: v, 100: -v}, records[0]["layer_slices"])
    assert len(fig.axes) == 2
    for ax in fig.axes:
        pts = [ln for ln in _lines(ax) if ln.get_marker() == "."]
        assert len(pts) == 3  # one colour per layer
        y = np.concatenate([ln.get_ydata() for ln in pts])
        assert y[5] == pytest.approx(0.9) and y[25] == pytest.approx(-0.3)


def test_fig8_lambda_max(records):
    fig = figures.fig8_lambda_max(records, log_y=True)
    assert len(fig.axes) == 1
    (line,) = _lines(fig.axes[0])
    assert len(line.get_xdata()) == len(STEPS) - 1  # None at step 40 skipped
    assert fig.axes[0].get_yscale() == "log"


def test_eigenvalues_over_time(records):
    assert len(_lines(figures.eigenvalues_over_time(records).axes[0])) == K
    fig = figures.eigenvalues_over_time(records, include_next=True)
    lines = _lines(fig.axes[0])
    assert len(lines) == 2 * K
    assert len(lines[0].get_xdata()) == len(STEPS) - 1


def test_fig11_eigenvector_overlaps(records):
    records[4]["c2"][4] = None  # step 30
    fig = figures.fig11_eigenvector_overlaps(records, steps=[0, 30, 100, 12345])
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 3
    assert [len(ax.patches) for ax in visible] == [2 * K, 2 * K - 1, 2 * K]
    c2 = records[0]["c2"]
    text = " ".join(t.get_text() for t in visible[0].texts)
    assert f"{sum(c2[:K]):.3f}" in text and f"{sum(c2[K:]):.3f}" in text
    own = figures.fig11_eigenvector_overlaps(records, steps=[0], sharey=False)
    assert len(own.axes) == 1
    with pytest.raises(ValueError):
        figures.fig11_eigenvector_overlaps(records, steps=[25])  # the failed record


def test_fig12_variants(records):
    runs = {"sgd": records, "adam": records[::2], "empty": [{"status": "failed", "step": 0}]}
    fig = figures.fig12_variants(runs, log_x=True)
    assert len(fig.axes) == 1
    assert len(_lines(fig.axes[0])) == 2
    with pytest.raises(ValueError):
        figures.fig12_variants({"empty": []})


def test_table1_markdown():
    table = figures.table1_markdown([
        dict(experiment="MNIST Softmax", ours=0.96123, paper=0.96, std=0.0149),
        dict(experiment="random | labels", ours=None, paper=0.86),
    ])
    lines = table.strip().split("\n")
    assert lines[0] == "| Experiment | ours | paper |"
    assert lines[2] == "| MNIST Softmax | 0.96 ± 0.01 | 0.96 |"
    assert lines[3] == r"| random \| labels | — | 0.86 |"
    with_steps = figures.table1_markdown([dict(experiment="a", ours=0.5, paper=0.5, steps=1000)],
                                          digits=3)
    assert "| steps |" in with_steps and "| a | 0.500 | 0.500 | 1000 |" in with_steps


def test_save_writes_png_and_pdf(tmp_path, records):
    fig = figures.fig8_lambda_max(records)
    png, pdf = figures.save(fig, str(tmp_path / "new" / "dir" / "fig8"))
    assert png.endswith("fig8.png") and pdf.endswith("fig8.pdf")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(pdf, "rb") as f:
        assert f.read(5) == b"%PDF-"
    assert os.path.getsize(png) > 1000 and os.path.getsize(pdf) > 1000
    assert sorted(os.listdir(tmp_path / "new" / "dir")) == ["fig8.pdf", "fig8.png"]
