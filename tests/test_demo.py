"""The built-in demo (the main job) on a shrunken configuration."""

import subprocess
import sys
import os

from hessian_subspace import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_records_metrics_in_range():
    records = demo.run_demo(num_classes=3, dim=10, num_examples=300, hidden=(16,),
                            measure_at=(0, 20), progress=False)
    assert [r["step"] for r in records] == [0, 20]
    for r in records:
        assert 0.0 <= r["f_top"] <= 1.0 + 1e-6
        assert -1.0 <= r["overlap_g_hg"] <= 1.0
        assert len(r["eigenvalues"]) == 3 and r["eigenvalues"][0] >= r["eigenvalues"][-1]
        assert r["converged"] == 3
    assert records[1]["subspace_overlap_prev"] is not None
    assert "f_top" in demo.format_table(records)


def test_launch_main_runs_from_the_command_line(tmp_path):
    out = tmp_path / "records.json"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.main", "--num_classes=3", "--dim=10",
         "--num_examples=200", "--hidden=8", "--measure_at=0,5", f"--json_out={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "f_top" in proc.stdout and out.exists()
