"""The GPU benchmark script runs end to end on CPU at a toy size, so it works on the day a GPU is
lent (device time is scarce: a script that fails there wastes it). Its numbers are checked for
what must hold on any machine: every pair converged, the explicit verification reaches the same
eigenvalues and `converged` as the relation (one Krylov program), the JSON complete."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # ~40 s on 2 cores (CI runs -m slow)
def test_gpu_benchmark_script_runs_on_cpu(tmp_path):
    out = tmp_path / "gpt.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO, os.path.join(REPO, "benchmarks"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "gpu.py"), "--problem=gpt",
         "--gpt_examples=64", "--gpt_width=32", "--gpt_depth=1", "--gpt_heads=2",
         "--gpt_batch_size=16", "--repeats=1", f"--json_out={out}"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["setup"]["num_params"] > 0 and rec["machine"]["backend"] == "cpu"
    assert rec["gradient_seconds"] > 0 and rec["hvp_over_gradient"] > 0
    assert rec["cold"]["converged"] == 10 and rec["cold"]["max_rel_residual"] <= 1e-3
    assert rec["batched_products"]["k"] == 10 and rec["batched_products"]["seconds"] > 0
    explicit = rec["explicit"]
    # One Krylov program either way (two compilations of it: equal to round-off).
    assert explicit["same_converged"] and explicit["max_eigenvalue_rel_diff"] < 1e-6
    # The relation costs one product where the explicit check costs k = 10.
    assert explicit["hvps"] - rec["cold"]["hvps"] == 9
