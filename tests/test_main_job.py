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
