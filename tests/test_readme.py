"""The README stays true: its test command is what CI runs, and its library example runs."""

import os
import re
import subprocess
import sys

import pytest

from hessian_subspace import analysis

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
CI = os.path.join(os.path.dirname(README), ".ci", "run")


def _blocks(lang):
    text = open(README).read()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    commands = [b.strip() for b in _blocks("bash")]
    test_cmd = [c for c in commands if "pytest" in c]
    assert len(test_cmd) == 1
    ci_lines = [line.strip() for line in open(CI) if line.strip() and not line.startswith("#")]
    assert test_cmd[0] in ci_lines
    run_cmd = [c for c in commands if "launch.main" in c]
    assert len(run_cmd) == 1


def test_readme_examples_run_as_pasted(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write results/ and ckpts/ where they run
    own, _, library = _blocks("python")
    exec(compile(own, "README.md", "exec"), {})
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if " f_top " in line]
    assert [int(r[0]) for r in rows] == [0, 50, 100, 150, 200]
    for r in rows:
        assert 0.0 <= float(r[2]) <= float(r[4]) <= 1.0  # f_top (top 3) <= f_top5 (top 5)
    assert len(os.listdir(tmp_path / "results" / "mine" / "records")) == 11
    # The same analysis from the command line, as the README writes it: its model module is
    # the example's lines up to the loss.
    (tmp_path / "my_model.py").write_text(own[:own.index("\ntx = ")])
    command = next(b for b in _blocks("sh") if "config.source" in b).split("\n# ")[0]
    args = command.replace("\\\n", " ").split()[3:]  # after "python -m launch.analyze"
    args = [a.replace("=ckpts", f"={tmp_path}/ckpts").replace("=results/", f"={tmp_path}/results/")
            for a in args]
    proc = subprocess.run([sys.executable, "-m", "launch.analyze", "--noprogress", *args],
                          cwd=os.path.dirname(README), capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path)), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline = {r["step"]: r for r in analysis.read_results(str(tmp_path / "results" / "offline"))}
    cli = analysis.read_results(str(tmp_path / "results" / "cli"))
    assert [r["step"] for r in cli] == sorted(offline) == [0, 50, 100, 150, 200]
    for r in cli:  # the same numbers, within both records' own error bars
        o = offline[r["step"]]
        assert r["fingerprints"]["checkpoint"] == o["fingerprints"]["checkpoint"]
        assert abs(r["f_top"] - o["f_top"]) <= r["f_top_bound"] + o["f_top_bound"] + 1e-6, (
            r["f_top"], o["f_top"], r["f_top_bound"])
    exec(compile(library, "README.md", "exec"), {})
    out = capsys.readouterr().out
    match = re.search(r"f_top ([0-9.eE+-]+)", out)
    assert match and 0.0 <= float(match.group(1)) <= 1.0
    assert "converged" in out


@pytest.mark.slow
def test_readme_mesh_example_runs_on_8_devices(tmp_path):
    """The mesh example as pasted, on 8 simulated devices (mesh data:4, model:2)."""
    _, sharded, _ = _blocks("python")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", sharded], env=env, capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "converged True" in proc.stdout
    match = re.search(r"f_top ([0-9.]+) mesh \{'data': 4, 'model': 2\} basis capped at (\d+)",
                      proc.stdout)
    assert match, proc.stdout
    assert 0.0 <= float(match.group(1)) <= 1.0 and int(match.group(2)) < 40
