"""Training runs: checkpoint schedule, orbax checkpoints, per-step log, kill-and-resume."""

import json
import os
import sys
import time

import jax
import numpy as np
import pytest

from hessian_subspace import training
from hessian_subspace.paper import experiment
from hessian_subspace.training import checkpoint

from _helpers import Process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "launch", "configs", "train.py")


def _smoke_config(**overrides):
    config = experiment.default_config()
    config.data.name = "gaussian_mixture"
    config.data.kwargs = dict(num_classes=3, dim=20, num_examples=600, sigma=0.3)
    config.model.kwargs.hidden = (16, 16)
    config.num_steps = 40
    config.batch_size = 32
    config.checkpoint_schedule = "1:10,10"
    config.log_every = 20
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return config


def test_checkpoint_schedule():
    s = training.CheckpointSchedule("1:100,10:1000,100")
    steps = s.steps(1234)
    assert steps[:101] == list(range(101))
    assert steps[101:104] == [110, 120, 130]
    assert 1000 in steps and 1010 not in steps and 1100 in steps and 1200 in steps
    assert steps[-1] == 1234  # the final step is always saved
    assert training.CheckpointSchedule("5").steps(12) == [0, 5, 10, 12]
    for bad in ("", "0", "10:5,1:3,2", "1:10,x", "3,1:10"):
        with pytest.raises(ValueError, match="schedule"):
            training.CheckpointSchedule(bad)


def test_training_writes_checkpoints_and_log(tmp_path):
    config = _smoke_config()
    state = experiment.train_from_config(config, str(tmp_path), progress=False)
    assert int(state.step) == 40
    steps = checkpoint.list_steps(tmp_path / "checkpoints")
    assert steps == list(range(11)) + [20, 30, 40]
    log = training.read_train_log(str(tmp_path))
    train_records = [r for r in log if r["event"] == "train"]
    assert [r["step"] for r in train_records] == list(range(40))
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in train_records)
    ckpt_records = [r for r in log if r["event"] == "checkpoint"]
    assert [r["step"] for r in ckpt_records] == steps
    assert all("test_loss" in r and "test_accuracy" in r for r in ckpt_records)
    assert ckpt_records[-1]["test_loss"] < ckpt_records[0]["test_loss"]
    # The analysis side restores parameters without knowing the optimizer.
    params, model_state = checkpoint.run_checkpoints(tmp_path / "checkpoints").load(40)
    meta = checkpoint.read_meta(tmp_path / "checkpoints", 40)
    assert meta["step"] == 40 and meta["checksum"]["params"] == checkpoint.checksum(params)
    assert meta["config"]["optimizer"]["name"] == "sgd"
    assert meta["num_outputs"] == 3 and model_state == {}
    np.testing.assert_array_equal(params["dense_0"]["kernel"], state.params["dense_0"]["kernel"])
    # Momentum state is saved too and restores into the optimizer's structure.
    momentum = _smoke_config(**{"optimizer.name": "momentum"})
    state = experiment.train_from_config(momentum, str(tmp_path / "m"), progress=False)
    writer = checkpoint.CheckpointWriter(tmp_path / "m" / "checkpoints")
    restored = writer.restore_train_state(40, {"params": state.params, "model_state": {},
                                               "opt_state": state.opt_state})
    writer.close()
    for a, b in zip(jax.tree_util.tree_leaves(restored["opt_state"]),
                    jax.tree_util.tree_leaves(state.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_resume_in_process_matches_uninterrupted_run(tmp_path):
    full = experiment.train_from_config(_smoke_config(), str(tmp_path / "full"), progress=False)
    experiment.train_from_config(_smoke_config(num_steps=25), str(tmp_path / "part"),
                                 progress=False)
    # The same run continued to 40 steps ends where the uninterrupted one does.
    resumed = experiment.train_from_config(_smoke_config(), str(tmp_path / "part"),
                                           progress=False)
    for x, y in zip(jax.tree_util.tree_leaves(full.params),
                    jax.tree_util.tree_leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(x, y)
    # Another run's checkpoints are refused.
    with pytest.raises(ValueError, match="different run"):
        experiment.train_from_config(_smoke_config(seed=1), str(tmp_path / "part"),
                                     progress=False)


def test_non_finite_loss_is_detected_and_not_checkpointed(tmp_path):
    config = _smoke_config(**{"optimizer.learning_rate": 1e8, "num_steps": 30})
    with pytest.raises(FloatingPointError, match="non-finite"):
        experiment.train_from_config(config, str(tmp_path), progress=False)
    for step in checkpoint.list_steps(tmp_path / "checkpoints"):
        params, _ = checkpoint.run_checkpoints(tmp_path / "checkpoints").load(step)
        assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(params))


def _launch(workdir, num_steps, schedule="1:10,100"):
    os.makedirs(workdir, exist_ok=True)
    cmd = [sys.executable, "-m", "launch.train", f"--config={SMOKE}:smoke",
           f"--workdir={workdir}", f"--config.num_steps={num_steps}", "--noprogress",
           f"--config.checkpoint_schedule={schedule}"]
    return Process(cmd, os.path.join(os.path.dirname(workdir), os.path.basename(workdir) +
                                      ".log"))


def test_killed_run_resumes_to_the_same_final_parameters(tmp_path):
    num_steps = 3000
    code, out = _launch(tmp_path / "ref", num_steps).finish()
    assert code == 0, out[-3000:]

    victim = _launch(tmp_path / "run", num_steps)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline:
        if any(s >= 300 for s in checkpoint.list_steps(ckpt_dir)):
            break
        time.sleep(0.1)
    victim.kill()
    killed_at = checkpoint.list_steps(ckpt_dir)[-1]
    assert 300 <= killed_at < num_steps, killed_at

    code, out = _launch(tmp_path / "run", num_steps).finish()
    assert code == 0, out[-3000:]
    assert f"Resuming from step {killed_at}" in out
    a, _ = checkpoint.run_checkpoints(tmp_path / "ref" / "checkpoints").load(num_steps)
    b, _ = checkpoint.run_checkpoints(ckpt_dir).load(num_steps)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)  # bit-identical on the same machine
    log_a = [json.dumps(r, sort_keys=True) for r in training.read_train_log(str(tmp_path / "ref"))]
    log_b = [json.dumps(r, sort_keys=True) for r in training.read_train_log(str(tmp_path / "run"))]
    assert log_a == log_b
