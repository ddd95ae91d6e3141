"""The README's main job (``python -m launch.main``), at smoke size, from the command line."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_launch_main_quick_writes_figures_and_a_summary(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.main", "--quick", f"--root={out}", "--noprogress"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert "f_top" in summary and summary in proc.stdout
    pngs = sorted(p.name for p in out.rglob("*.png"))
    assert any("fig1" in p for p in pngs) and any("toy" in p for p in pngs), pngs
    for png in out.rglob("*.png"):
        assert png.stat().st_size > 10_000, png
    # Where f_top moves by more than 0.2 between two checkpoints, checkpoints were added until
    # the two are one step apart: the figure shows the rise, not a jump between far steps.
    from hessian_subspace import analysis

    (results,) = [str(p) for p in (out / "runs").glob("*/analysis-*")]
    values = [(r["step"], r["f_top"]) for r in analysis.read_results(results)
              if r["status"] == "ok"]
    for (a, x), (b, y) in zip(values[:-1], values[1:], strict=True):
        assert abs(y - x) <= 0.2 or b - a == 1, (a, x, b, y)


def test_refinement_adds_the_checkpoints_an_uninterrupted_run_would_have(tmp_path):
    """The checkpoints added between two far apart are those of a run that saved them: the
    refinement trains again from the earlier one, and resumes are bit-identical."""
    import jax
    import numpy as np

    from hessian_subspace import analysis
    from hessian_subspace.analysis import config as config_lib
    from hessian_subspace.paper import experiment, reproduce
    from hessian_subspace.training import checkpoint
    from launch.configs import train as train_configs

    config = train_configs.get_config("smoke")
    config.num_steps, config.checkpoint_schedule = 16, "8"
    workdir, results = str(tmp_path / "run"), str(tmp_path / "run" / "analysis")
    experiment.train_from_config(config, workdir, progress=False)
    acfg = config_lib.as_config(dict(transforms="loss,gradient"))
    experiment.analyze_run(workdir, results, analysis_config=acfg, progress=False)
    added = reproduce.refine_checkpoints(config, workdir, results, key="train_loss",
                                         threshold=0.0, max_rounds=2, analysis_config=acfg,
                                         progress=False)
    assert added == [2, 4, 6, 10, 12, 14]
    full = config.copy_and_resolve_references()
    full.checkpoint_schedule = "2"
    experiment.train_from_config(full, str(tmp_path / "full"), progress=False)
    ours = checkpoint.run_checkpoints(os.path.join(workdir, "checkpoints"))
    theirs = checkpoint.run_checkpoints(str(tmp_path / "full" / "checkpoints"))
    assert ours.steps() == theirs.steps() == list(range(0, 17, 2))
    for step in (6, 10):
        for a, b in zip(jax.tree_util.tree_leaves(ours.load(step)),
                        jax.tree_util.tree_leaves(theirs.load(step)), strict=True):
            np.testing.assert_array_equal(a, b)
    assert [r["step"] for r in analysis.read_results(results)] == list(range(0, 17, 2))
