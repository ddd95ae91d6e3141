"""Experiments of the paper: configs, overrides, smoke runs end to end (figures + summary)."""

import json
import os

import pytest

from hessian_subspace.paper import models, reproduce, summaries
from launch.configs import paper


def test_every_experiment_config_builds_valid_runs():
    assert len(paper.EXPERIMENTS) == 21
    for name in paper.EXPERIMENTS:
        config = paper.get_config(name)
        assert config.name == name and config.kind in summaries.KINDS
        for run in config.runs.values():
            reproduce.analysis_config_of(run)  # the analysis block is valid
            for dataset in (None, "gaussian_mixture", "idx:/tmp/x"):
                r = run if dataset is None else reproduce.override_dataset(run, dataset)
                for variant in (r, reproduce.smoke(r)):
                    kwargs = dict(variant.model.kwargs)
                    kwargs = {k: tuple(v) if isinstance(v, list) else v
                              for k, v in kwargs.items()}
                    models.build_model(variant.model.name, num_outputs=10, **kwargs)
    with pytest.raises(ValueError, match="unknown experiment"):
        paper.get_config("fig99")


def test_overrides():
    run = paper.get_config("fig1_convnet_cifar10").runs["convnet_cifar10"]
    mix = reproduce.override_dataset(run, "gaussian_mixture")
    assert mix.data.name == "gaussian_mixture" and tuple(mix.data.input_shape) == (32, 32, 3)
    assert mix.data.kwargs.dim == 3072 and mix.data.kwargs.num_classes == 10
    idx = reproduce.override_dataset(run, "idx:/data/fmnist")
    assert idx.data.name == "idx:/data/fmnist" and idx.data.input_shape is None
    sine = paper.get_config("table1").runs["sine_regression_fc"]
    assert reproduce.override_dataset(sine, "gaussian_mixture").data.name == "sine"
    small = reproduce.smoke(run)
    assert small.num_steps == 30 and small.model.kwargs.width < 1
    assert run.num_steps == 1000  # overrides copy, never modify


def test_fig1_smoke_on_the_gaussian_mixture_end_to_end(tmp_path):
    summary = reproduce.run_experiment(paper.get_config("fig1_fc_mnist"), str(tmp_path),
                                       dataset="gaussian_mixture", smoke_size=True,
                                       progress=False)
    out = tmp_path / "fig1_fc_mnist"
    assert (out / "fig1_fc_mnist.png").stat().st_size > 10_000
    assert (out / "fig1_fc_mnist.pdf").exists()
    saved = json.loads((out / "summary.json").read_text())
    numbers = saved["numbers"]["fc_mnist"]
    assert 0.0 <= numbers["f_top_final"] <= 1.0 and numbers["all_converged"]
    assert saved["runs"]["fc_mnist"]["failed"] == []
    # A second experiment on the same run reuses its checkpoints and analysis.
    again = reproduce.run_experiment(paper.get_config("fig8_lambda_max"), str(tmp_path),
                                     dataset="gaussian_mixture", smoke_size=True,
                                     progress=False)
    assert again["runs"]["fc_mnist"]["workdir"] == summary["runs"]["fc_mnist"]["workdir"]
    assert os.path.exists(tmp_path / "fig8_lambda_max" / "fig8_lambda_max.png")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(paper.EXPERIMENTS))
def test_every_experiment_at_smoke_size(name, tmp_path_factory, fashion_mnist_dir):
    # One root for all experiments, so the shared FC run is trained and analysed once.
    root = tmp_path_factory.getbasetemp() / "smoke_all"
    for data in ("gaussian_mixture", f"idx:{fashion_mnist_dir}"):
        summary = reproduce.run_experiment(paper.get_config(name), str(root / data[:3]),
                                           dataset=data, smoke_size=True, progress=False)
        assert all(not r["failed"] for r in summary["runs"].values()), summary["runs"]
        assert summary["figures"], name


@pytest.mark.slow
def test_loss_decrease_measures_the_runs_own_steps(tmp_path):
    """The step loss_decrease takes is the one the run took: restored optimizer state (Adam's
    moments for the LM), the next mini-batch in the run's order, the same update. So at every
    pair of consecutive analysed steps, its ΔL of the full step equals the change of the
    analysis-set loss between them (float32: to ~1e-5 of the loss)."""
    summary = reproduce.run_experiment(paper.get_config("loss_decrease"), str(tmp_path),
                                       dataset="gaussian_mixture", smoke_size=True,
                                       progress=False)
    assert all(not r["failed"] for r in summary["runs"].values()), summary["runs"]
    for name in ("sgd", "gd_edge_of_stability", "adam_gpt"):
        numbers = summary["numbers"][name]
        assert numbers["update"] == "step"
        records = [r for r in summary_records(tmp_path, summary, name)
                   if "loss_decrease" in r]
        by_step = {r["step"]: r["loss_decrease"]["step"] for r in records}
        pairs = [(t, t + 1) for t in by_step if t + 1 in by_step]
        assert len(pairs) >= 5, (name, sorted(by_step))
        for t, u in pairs:
            change = by_step[u]["loss"] - by_step[t]["loss"]
            assert abs(by_step[t]["full"] - change) <= 2e-5 * by_step[t]["loss"] + 1e-6, (
                name, t, by_step[t]["full"], change)
            assert by_step[t]["gradient_from"] == "next_batch"


def summary_records(root, summary, name):
    from hessian_subspace import analysis
    return analysis.read_results(summary["runs"][name]["results"])


@pytest.mark.slow
def test_transformer_lm_smoke_trains_and_analyses_every_view(tmp_path):
    summary = reproduce.run_experiment(paper.get_config("transformer_lm"), str(tmp_path),
                                       smoke_size=True, progress=False)
    (run,) = summary["runs"].values()
    assert run["failed"] == []
    numbers = summary["numbers"]
    assert numbers["train_loss_final"] < numbers["train_loss_start"]  # the LM learns
    assert numbers["all_converged"]  # every eigensolve converged
    assert set(numbers["f_top_at_final"]) == {"2", "4"}
    assert 1 <= numbers["k_saturation_final"] <= 8
    # Per-block spectra: every block of the decoder has its top eigenvalues.
    blocks = numbers["block_top_eigenvalue"]
    assert set(blocks) == {"token_embed", "position_embed", "block_0/ln_1", "block_0/attn/q",
                           "block_0/attn/k", "block_0/attn/v", "block_0/attn/o", "block_0/ln_2",
                           "block_0/mlp", "ln_f", "head"}
    assert all(v is not None and v > 0 for v in blocks.values())
    # Adam's geometry after its first update (step 0 has no second moment yet).
    assert numbers["adam_lambda_max"][0] is None
    assert all(x is not None and x > 0 for x in numbers["adam_lambda_max"][1:])
    assert {"f_top_vs_k.png", "block_spectra.png", "adam_sharpness.png"} <= set(
        summary["figures"])


@pytest.mark.slow
def test_seeds_aggregate_fig1_fig2_and_table1(tmp_path):
    # The FC run shared by Fig. 1 and Fig. 2, and one Table 1 row, over 2 seeds at smoke size.
    kw = dict(dataset="gaussian_mixture", smoke_size=True, progress=False, seeds=[0, 1])
    fig1 = reproduce.run_experiment(paper.get_config("fig1_fc_mnist"), str(tmp_path), **kw)
    assert fig1["seeds"] == [0, 1]
    seeds = fig1["runs"]["fc_mnist"]["seeds"]
    assert seeds["0"]["workdir"] != seeds["1"]["workdir"]  # really two trainings
    over = fig1["numbers"]["fc_mnist"]["over_seeds"]["f_top_final"]
    values = over["values"]
    assert len(values) == 2 and values[0] != values[1]
    assert abs(over["mean"] - sum(values) / 2) < 1e-12
    assert abs(over["std"] - abs(values[0] - values[1]) / 2 ** 0.5) < 1e-12  # ddof = 1
    assert over["min"] == min(values) and over["max"] == max(values)
    # Seed 0 is the single run: it is reused, not trained again.
    single = reproduce.run_experiment(paper.get_config("fig1_fc_mnist"), str(tmp_path),
                                      dataset="gaussian_mixture", smoke_size=True,
                                      progress=False)
    assert single["runs"]["fc_mnist"]["workdir"] == seeds["0"]["workdir"]
    assert single["numbers"]["fc_mnist"]["f_top_final"] == values[0]

    fig2 = reproduce.run_experiment(paper.get_config("fig2_subspace_overlap"), str(tmp_path),
                                    **kw)
    assert (tmp_path / "fig2_subspace_overlap" / "fig2_subspace_overlap.png").exists()
    stats = fig2["numbers"]["over_seeds"]["0"]
    assert all(entry["top"]["n"] == 2 for entry in stats.values())

    table = reproduce.run_experiment(paper.get_config("table1"), str(tmp_path),
                                     only_runs=["mnist_softmax", "mnist_fc_lr001"], **kw)
    text = (tmp_path / "table1" / "table1.md").read_text()
    assert "ours (mean ± std over 2 seeds)" in text and "min–max" in text
    lines = [line.split(" | ")[0].lstrip("| ") for line in text.splitlines()[2:]]
    assert lines[:5] == ["MNIST softmax", "MNIST FC softplus", "MNIST FC lr 0.01",
                         "MNIST FC batch 256", "MNIST FC random labels"]  # the paper's order
    row = table["numbers"]["mnist_softmax"]
    assert row["seeds"] == 2 and len(row["per_seed"]) == 2
    with pytest.raises(ValueError, match="`seeds` must be distinct"):
        reproduce.run_experiment(paper.get_config("table1"), str(tmp_path), seeds=[0, 0])
