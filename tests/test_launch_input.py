"""Issue 12, bad input at the launch scripts: flags and config overrides that used to end in a
traceback or pass silently. One small training run serves every case."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from hessian_subspace.analysis import config as config_lib
from hessian_subspace.paper import experiment
from launch.configs import train as train_configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", *args, "--noprogress"], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("smoke") / "run")
    config = train_configs.get_config("smoke")
    config.num_steps, config.checkpoint_schedule = 20, "10"
    experiment.train_from_config(config, workdir, progress=False)
    return workdir


def test_config_override_of_no_field_is_one_clear_line(tmp_path):
    code, out = _run("launch.train", "--config=launch/configs/train.py:smoke",
                     f"--workdir={tmp_path}/x", "--config.data.nosuchfield=1")
    assert code == 1
    assert "--config.data.nosuchfield: the config has no such field" in out
    assert "Traceback" not in out
    assert not os.path.exists(tmp_path / "x")


def test_none_default_fields_can_be_overridden_as_the_readme_shows(tmp_path):
    # The README's override line, on the smoke config (None-default fields are placeholders).
    code, out = _run("launch.train", "--config=launch/configs/train.py:smoke",
                     f"--workdir={tmp_path}/r", "--config.data.label_transform=shuffle",
                     "--config.model.kwargs.initializer=he_normal", "--config.num_steps=5",
                     "--config.data.num_train=200")
    assert code == 0, out[-3000:]
    config, _ = experiment.read_run_config(str(tmp_path / "r"))
    assert config["data"]["label_transform"] == "shuffle"
    assert config["data"]["num_train"] == 200
    assert config["model"]["kwargs"]["initializer"] == "he_normal"


def test_k_larger_than_the_model_is_refused_before_anything_is_written(smoke_run, tmp_path):
    # The smoke model has 659 parameters: 2k eigenpairs need 2k <= 658.
    with pytest.raises(ValueError, match=r"`k` = 1000: the analysis computes 2000 eigenpairs "
                                         r"\(2k\) but the model has 659 parameters; k must be "
                                         r"<= 329"):
        experiment.analyze_run(smoke_run, str(tmp_path / "a"),
                               analysis_config=config_lib.as_config(dict(k=1000)),
                               progress=False)
    assert not os.path.exists(tmp_path / "a")


def test_steps_without_a_checkpoint_are_refused(smoke_run, tmp_path):
    with pytest.raises(ValueError, match=r"`steps`: no checkpoint at step\(s\) \[12345\]; the "
                                         r"checkpoint directory .*checkpoints has \[0, 10, 20\]"):
        experiment.analyze_run(smoke_run, str(tmp_path / "a"), steps=[0, 12345],
                               analysis_config=config_lib.as_config(dict(transforms="loss")),
                               progress=False)
    assert not os.path.exists(tmp_path / "a" / "records")


def test_a_watched_run_that_never_finishes_exits_non_zero(smoke_run, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(smoke_run, unfinished)
    shutil.rmtree(unfinished / "checkpoints" / "20")  # the last step never comes
    code, out = _run("launch.analyze", f"--workdir={unfinished}", f"--results={tmp_path}/a",
                     "--watch", "--poll_seconds=0.2", "--timeout_seconds=3",
                     "--transforms=loss")
    assert code == 1, out[-3000:]
    assert "the watched run did not finish" in out and "waiting for step 20" in out
    # What was analysed before the timeout is kept.
    assert (tmp_path / "a" / "records").is_dir()
