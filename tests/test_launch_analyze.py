"""``launch.analyze`` driven by the analysis config (issue 19, item 4): ``--config.*`` overrides,
the flat flags as aliases onto the same fields, and a user's own orbax checkpoints analysed
from ``module:attribute`` names, on one device and on a mesh, against dense float64
references."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hessian_subspace import analysis
from hessian_subspace.paper import experiment
from launch.configs import train as train_configs

import user_model
from _helpers import device_env, two_processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = (0, 5, 20)


def _env(devices):
    # tests/ on PYTHONPATH: user_model is imported from there, as a user's module would be.
    return device_env(devices, PYTHONPATH=os.path.dirname(os.path.abspath(__file__)))


def _run(*args, devices=1, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "launch.analyze", "--noprogress", *args],
                          cwd=REPO, env=_env(devices), capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("smoke") / "run")
    config = train_configs.get_config("smoke")
    config.num_steps, config.checkpoint_schedule = 10, "10"
    experiment.train_from_config(config, workdir, progress=False)
    return workdir


@pytest.fixture(scope="module")
def user_checkpoints(tmp_path_factory):
    """Orbax checkpoints of tests/user_model.py, written the way a user's loop writes them."""
    directory = str(tmp_path_factory.mktemp("user") / "ckpts")
    with ocp.CheckpointManager(directory) as manager:
        for step, params in user_model.trajectory(STEPS).items():
            manager.save(step, args=ocp.args.StandardSave(params))
        manager.wait_until_finished()
    return directory


def test_config_overrides_and_their_flat_aliases_are_the_same_analysis(smoke_run, tmp_path):
    results = str(tmp_path / "a")
    common = [f"--workdir={smoke_run}", f"--results={results}", "--steps=0,10"]
    code, out = _run(*common, "--config.transforms=loss,gradient,eigenpairs,f_top",
                     "--config.k=2", "--config.eigenpairs.tol=1e-2")
    assert code == 0, out[-3000:]
    first = analysis.read_results(results)
    assert [r["k"] for r in first] == [2, 2] and all(r["status"] == "ok" for r in first)
    assert all(len(r["eigenvalues"]) == 4 for r in first)  # 2k pairs
    with open(os.path.join(results, "pipeline.json")) as f:
        eigenpairs = json.load(f)["transforms"][2]
    assert eigenpairs["name"] == "eigenpairs" and eigenpairs["config"]["tol"] == 1e-2
    # The same analysis through the flags of earlier versions: every record is reused.
    code, out = _run(*common, "--transforms=loss,gradient,eigenpairs,f_top", "--k=2",
                     "--tol=1e-2")
    assert code == 0, out[-3000:]
    assert analysis.read_results(results) == first
    # Another setting is another analysis: refused in this directory, naming what changed.
    code, out = _run(*common, "--config.transforms=loss,gradient,eigenpairs,f_top",
                     "--config.k=2", "--config.eigenpairs.tol=1e-3")
    assert code == 1 and "other settings" in out and "tol" in out, out[-3000:]


@pytest.mark.parametrize("args, fragment", [
    (["--config.eigenpairs.tol=-1"], "config.eigenpairs: `tol`"),
    (["--config.transforms=loss,nope"], "unknown transforms ['nope']"),
    (["--config.eigenpairs.nosuchfield=1"], "--config.eigenpairs.nosuchfield: the config has "
                                            "no such field"),
])
def test_a_bad_config_is_one_line_before_anything_is_written(smoke_run, tmp_path, args,
                                                              fragment):
    code, out = _run(f"--workdir={smoke_run}", f"--results={tmp_path}/r", *args, timeout=120)
    assert code == 1 and fragment in out and "Traceback" not in out, out[-3000:]
    assert not os.path.exists(tmp_path / "r")


def _own_model_args(checkpoints, results, *extra):
    return [f"--results={results}", f"--config.source.checkpoints={checkpoints}",
            "--config.source.loss=user_model:loss", "--config.source.data=user_model:analysis_set",
            "--config.source.params=user_model:init_params",
            "--config.source.metrics=user_model:metrics", "--config.k=3",
            "--config.transforms=loss,gradient,eigenpairs,f_top,subspace_overlap",
            "--config.subspace_overlap.reference_steps=(0,)", "--config.operator.dtype=float64",
            "--config.eigenpairs.tol=1e-8", "--config.f_top.num_minibatches=0", *extra]


def _dense(params):
    """Loss, gradient and descending Hessian eigenpairs in float64, without the pipeline."""
    with jax.enable_x64(True):
        data = user_model.analysis_set()
        p64 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
        flat, unravel = jax.flatten_util.ravel_pytree(p64)
        f = lambda v: user_model.loss(unravel(v), data)  # noqa: E731
        g = np.asarray(jax.grad(f)(flat))
        w, v = np.linalg.eigh(np.asarray(jax.hessian(f)(flat)))
        return float(f(flat)), g, w[::-1], v[:, ::-1].T


def test_a_users_own_orbax_checkpoints_from_module_attribute_names(user_checkpoints,
                                                                   tmp_path):
    code, out = _run(*_own_model_args(user_checkpoints, tmp_path / "one"))
    assert code == 0, out[-3000:]
    records = analysis.read_results(str(tmp_path / "one"))
    assert [r["step"] for r in records] == list(STEPS)
    top0 = None
    for record, params in zip(records, user_model.trajectory(STEPS).values(), strict=True):
        value, g, w, v = _dense(params)
        top0 = v[:3] if top0 is None else top0
        if record["step"] > 0:  # eq. 5 against step 0
            np.testing.assert_allclose(record["subspace_overlap"]["0"]["top3"],
                                       np.sum((top0 @ v[:3].T) ** 2) / 3, rtol=1e-6)
        assert record["status"] == "ok" and record["all_converged"]
        assert record["source"]["loss"] == "user_model:loss" and record["k"] == 3
        np.testing.assert_allclose(record["train_loss"], value, rtol=1e-12)
        np.testing.assert_allclose(record["grad_norm"], np.linalg.norm(g), rtol=1e-10)
        np.testing.assert_allclose(record["eigenvalues"], w[:6], rtol=1e-7, atol=1e-12)
        np.testing.assert_allclose(record["f_top"], np.sum((v[:3] @ g) ** 2) / (g @ g),
                                   rtol=1e-6)
    # On a mesh of 8 devices: examples over data:4, parameters FSDP over model:2.
    code, out = _run(*_own_model_args(user_checkpoints, tmp_path / "mesh",
                                      "--mesh=data:4,model:2"), devices=8)
    assert code == 0, out[-3000:]
    meshed = analysis.read_results(str(tmp_path / "mesh"))
    for a, b in zip(records, meshed, strict=True):
        assert b["hessian"]["mesh"] == {"data": 4, "model": 2}
        for key in ("train_loss", "grad_norm", "eigenvalues", "f_top"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-9, err_msg=key)
        if a["step"] > 0:
            np.testing.assert_allclose(b["subspace_overlap"]["0"]["top3"],
                                       a["subspace_overlap"]["0"]["top3"], rtol=1e-7)


def test_own_model_settings_missing_are_named(user_checkpoints, tmp_path):
    code, out = _run(f"--results={tmp_path}/r", f"--config.source.checkpoints={user_checkpoints}",
                     "--config.source.loss=user_model:loss", timeout=120)
    assert code == 1 and "--config.source.data, --config.source.params" in out, out[-3000:]
    code, out = _run(*_own_model_args(user_checkpoints, tmp_path / "r",
                                      "--config.source.loss=user_model:nope"), timeout=120)
    assert code == 1 and "--config.source.loss=user_model:nope" in out, out[-3000:]
    code, out = _run(*_own_model_args(user_checkpoints, tmp_path / "r", "--test_metrics"),
                     timeout=120)
    assert code == 1 and "--config.source.test_data" in out, out[-3000:]
    code, out = _run(*_own_model_args(user_checkpoints, tmp_path / "r", "--workdir=runs/x"),
                     timeout=120)
    assert code == 1 and "not both" in out, out[-3000:]
    assert not os.path.exists(tmp_path / "r")


@pytest.mark.slow
def test_a_users_own_checkpoints_over_two_processes(user_checkpoints, tmp_path):
    """Two processes on localhost (gloo), 2 devices each, parameters FSDP over model:2: the
    records equal the one-process analysis."""
    code, out = _run(*_own_model_args(user_checkpoints, tmp_path / "one"))
    assert code == 0, out[-3000:]
    cmd = [sys.executable, "-m", "launch.analyze", "--noprogress",
           *_own_model_args(user_checkpoints, tmp_path / "two", "--mesh=data:2,model:2")]
    for code, out in two_processes(cmd, str(tmp_path / "two"), env=_env(2)):
        assert code == 0, out[-3000:]
    for a, b in zip(analysis.read_results(str(tmp_path / "one")),
                    analysis.read_results(str(tmp_path / "two")), strict=True):
        assert b["processes"] == 2 and b["hessian"]["mesh"] == {"data": 2, "model": 2}
        for key in ("train_loss", "grad_norm", "eigenvalues", "f_top"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-9, err_msg=key)
