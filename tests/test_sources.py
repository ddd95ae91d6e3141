"""Checkpoint sources: a user's own orbax directories, this package's runs (checksums, corrupt
and mismatched checkpoints, retries), resuming an interrupted analysis, following a live run,
and the analyzer inside a training loop."""

import glob
import os
import shutil
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.training import train_state

from hessian_subspace import analysis
from hessian_subspace.paper import data, experiment
from hessian_subspace import checkpoints as checkpoint
from hessian_subspace.training import tasks

from _helpers import Process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CONFIG = os.path.join(REPO, "launch", "configs", "train.py")


def _comparable(record):
    return {k: v for k, v in record.items() if k not in ("seconds", "versions", "files")}


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(6)(x)))


def _user_problem():
    ds = data.gaussian_mixture(num_classes=3, dim=5, num_examples=120, sigma=0.5, seed=2)
    analysis_set = {"x": ds["x"], "y": ds["y"]}

    def loss_fn(params, batch):
        logits = _Net().apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    params = _Net().init(jax.random.key(0), ds["x"][:1])["params"]
    tx = optax.sgd(0.3)
    step_fn = jax.jit(lambda p, o: (lambda u, o: (optax.apply_updates(p, u), o))(
        *tx.update(jax.grad(loss_fn)(p, analysis_set), o)))
    trajectory, opt = {}, tx.init(params)
    for t in range(13):
        trajectory[t] = params
        params, opt = step_fn(params, opt)
    return analysis_set, loss_fn, trajectory


def _chain():
    return analysis.chain(analysis.loss(), analysis.gradient(), analysis.eigenpairs(k=4),
                          analysis.f_top(k=2, num_minibatches=1, minibatch_size=16),
                          analysis.subspace_overlap(k=2, reference_steps=(0, 4)))


def test_a_users_own_orbax_directory_single_item_and_composite(tmp_path):
    analysis_set, loss_fn, trajectory = _user_problem()
    steps = (0, 2, 4, 8, 12)
    single = ocp.CheckpointManager(str(tmp_path / "single"))
    composite = ocp.CheckpointManager(str(tmp_path / "composite"))
    for t in steps:
        single.save(t, args=ocp.args.StandardSave(trajectory[t]))
        state = train_state.TrainState.create(apply_fn=_Net().apply, params=trajectory[t],
                                              tx=optax.adam(1e-3))
        composite.save(t, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  extra=ocp.args.JsonSave({"step": t})))
    for m in (single, composite):
        m.wait_until_finished()
        m.close()
    like = trajectory[0]
    reference = analysis.Analyzer(_chain(), loss_fn, data=analysis_set, batch_size=50,
                                  results=analysis.Results(progress=False))
    reference.run({t: trajectory[t] for t in steps})
    for name, source in (
            ("single", analysis.orbax_checkpoints(str(tmp_path / "single"), like=like)),
            ("composite", analysis.orbax_checkpoints(str(tmp_path / "composite"), like=like,
                                                     item="state", params_key="params")),
            ("select", analysis.orbax_checkpoints(
                str(tmp_path / "composite"), item="state",
                select=lambda tree: (tree["params"], None)))):
        analyzer = analysis.Analyzer(_chain(), loss_fn, data=analysis_set, batch_size=50,
                                     results=analysis.Results(str(tmp_path / f"results_{name}"),
                                                              progress=False))
        written = analyzer.run(source)
        assert [r["step"] for r in written] == list(steps)
        records = analysis.read_results(str(tmp_path / f"results_{name}"))
        assert [_comparable(r) for r in records] == [_comparable(r) for r in reference.records]
    # Clear errors for a layout the source was not told about.
    with pytest.raises(analysis.CheckpointError, match="several items.*'extra', 'state'.*item="):
        analysis.orbax_checkpoints(str(tmp_path / "composite")).load(0)
    with pytest.raises(analysis.CheckpointError, match="no key 'weights'.*params"):
        analysis.orbax_checkpoints(str(tmp_path / "composite"), item="state",
                                   params_key="weights").load(0)
    small = jax.tree_util.tree_map(lambda x: x[..., :1], like)
    with pytest.raises(analysis.CheckpointError, match="shape"):
        analysis.orbax_checkpoints(str(tmp_path / "single"), like=small).load(0)
    with pytest.raises(TypeError, match="orbax_checkpoints"):
        reference.run(str(tmp_path / "single"))


class _Interrupt(Exception):
    pass


class _Flaky:
    """A source that dies (like a killed process) after loading ``after`` checkpoints."""

    def __init__(self, source, after):
        self.source, self.left = source, after

    def steps(self):
        return self.source.steps()

    def load(self, step):
        if self.left == 0:
            raise _Interrupt(step)
        self.left -= 1
        return self.source.load(step)


def test_an_interrupted_analysis_resumes_to_the_uninterrupted_records(tmp_path):
    analysis_set, loss_fn, trajectory = _user_problem()
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpts"))
    for t, p in trajectory.items():
        mngr.save(t, args=ocp.args.StandardSave(p))
    mngr.wait_until_finished()
    mngr.close()
    source = analysis.orbax_checkpoints(str(tmp_path / "ckpts"), like=trajectory[0])

    def analyzer(name):
        return analysis.Analyzer(_chain(), loss_fn, data=analysis_set, batch_size=50,
                                 results=analysis.Results(str(tmp_path / name), progress=False))

    analyzer("whole").run(source)
    with pytest.raises(_Interrupt):
        analyzer("resumed").run(_Flaky(source, after=6))
    done = analysis.read_results(str(tmp_path / "resumed"))
    assert [r["step"] for r in done] == list(range(6))
    analyzer("resumed").run(source)  # a new process: state comes back from the store
    whole = analysis.read_results(str(tmp_path / "whole"))
    resumed = analysis.read_results(str(tmp_path / "resumed"))
    assert [_comparable(r) for r in resumed] == [_comparable(r) for r in whole]
    assert all(r["warm_start"] for r in resumed[1:])  # warm start carried across the restart


# ---------------------------------------------------------------------------------------------
# Runs of this package on disk: a small training run shared by the tests below.




def _train_run(workdir, num_steps=30, schedule="1:30,5"):
    cmd = [sys.executable, "-m", "launch.train", f"--config={TRAIN_CONFIG}:smoke",
           f"--workdir={workdir}", f"--config.num_steps={num_steps}", "--noprogress",
           f"--config.checkpoint_schedule={schedule}"]
    return Process(cmd, f"{workdir}.train.log")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    code, out = _train_run(workdir).finish()
    assert code == 0, out[-3000:]
    return workdir


def _snapshot(directory):
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            st = os.stat(path)
            out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns)
    return out


def _analyze(workdir, results, *extra):
    cmd = [sys.executable, "-m", "launch.analyze", f"--workdir={workdir}",
           f"--results={results}", "--batch_size=200", "--noprogress", *extra]
    return Process(cmd, f"{results}.analyze.log")


def _run_analyzer(workdir, results, **kwargs):
    config, num_outputs = experiment.read_run_config(str(workdir))
    cfg = experiment.ConfigDict(config)
    loaded = experiment.load_data(cfg)
    analyzer = experiment.analyzer_for(cfg, num_outputs, loaded["analysis"], str(results),
                                       progress=False, **kwargs)
    model = experiment.build_model(cfg, num_outputs)
    like, state_like = jax.eval_shape(lambda: tasks.init_variables(
        model, jax.random.key(0), loaded["analysis"]["x"][:1]))
    return analyzer, checkpoint.run_checkpoints(os.path.join(workdir, "checkpoints"), like=like,
                                                state_like=state_like)


def _truncate(step_dir):
    for root, _, files in os.walk(os.path.join(step_dir, "model")):
        for name in files:
            path = os.path.join(root, name)
            if os.path.getsize(path) > 16 and not name.startswith("_"):
                with open(path, "r+b") as f:
                    f.truncate(8)


def test_corrupt_checkpoints_fail_and_are_retried_once_repaired(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run / "checkpoints", run / "checkpoints")
    _truncate(run / "checkpoints" / "3")
    before = _snapshot(run / "checkpoints")
    analyzer, source = _run_analyzer(finished_run, tmp_path / "results")
    copied = checkpoint.run_checkpoints(run / "checkpoints", like=source.like,
                                        state_like=source.state_like)
    # Every other step is analysed, then one error lists the failed step and its reason.
    with pytest.raises(analysis.FailedStepsError, match=r"1 of the 3 .*\n  step 3: "
                       r"checkpoint unreadable: cannot restore step 3") as raised:
        analyzer.run(copied, steps=[2, 3, 4])
    records = raised.value.records
    status = {r["step"]: r["status"] for r in records}
    assert status == {2: "ok", 3: "failed", 4: "ok"}
    assert "step 3" in records[1]["reason"] and list(raised.value.failures) == [3]
    assert _snapshot(run / "checkpoints") == before  # the checkpoint directory is never modified
    fixed = copied
    # Skipping failed steps on request; retrying them by default, once the checkpoint is back.
    analyzer, _ = _run_analyzer(finished_run, tmp_path / "results")
    analyzer.retry_failed = False
    assert analyzer.run(fixed, steps=[2, 3, 4]) == []
    shutil.rmtree(run / "checkpoints" / "3")
    shutil.copytree(finished_run / "checkpoints" / "3", run / "checkpoints" / "3")
    analyzer, _ = _run_analyzer(finished_run, tmp_path / "results")
    retried, after = analyzer.run(fixed, steps=[2, 3, 4])
    assert retried["step"] == 3 and retried["status"] == "ok"
    # Step 4 started from step 2's state (3 had failed); 3 comes before it now, so its
    # overlap with the previous checkpoint is computed again, from step 3's state.
    assert after["step"] == 4 and after["state_from"]["step"] == 3
    # A model whose parameter tree does not match the checkpoints: failure records.
    other = jax.eval_shape(lambda: {"dense_0": {"kernel": jnp.zeros((20, 7))}})
    mismatched = checkpoint.run_checkpoints(run / "checkpoints", like=other)
    analyzer, _ = _run_analyzer(finished_run, tmp_path / "results2")
    (rec,) = analyzer.run(mismatched, steps=[5], allow_failures=True)
    assert rec["status"] == "failed" and "`like` lacks" in rec["reason"]


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        chunk = f.read(8)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in chunk))


def test_flipped_bytes_in_checkpoint_data_never_give_silently_wrong_weights(finished_run,
                                                                             tmp_path):
    # 8 flipped bytes at 15 offsets of every data file of one checkpoint, one flip at a time:
    # orbax rejects some, some land where nothing is read, and a flip that changes the weights
    # must be a "checksum mismatch", never wrong weights in an "ok" record.
    src = finished_run / "checkpoints"
    good, _ = checkpoint.run_checkpoints(src).load(3)
    files = sorted(glob.glob(str(src / "3" / "model" / "**" / "d" / "*"), recursive=True))
    mismatch = None
    for path in files:
        for i in range(1, 16):
            copy = tmp_path / "copy"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(src / "3", copy / "3")
            target = path.replace(str(src), str(copy))
            offset = i * os.path.getsize(target) // 16
            _flip(target, offset)
            try:
                params, _ = checkpoint.run_checkpoints(copy).load(3)
            except analysis.CheckpointError as e:
                if "checksum mismatch" in str(e):
                    mismatch = (path, offset)
                continue
            for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(good),
                            strict=True):
                np.testing.assert_array_equal(a, b)  # a flip orbax does not read changes nothing
    assert mismatch is not None
    # Through the pipeline: a failed step whose reason says so.
    copy = tmp_path / "copy"
    shutil.rmtree(copy)
    shutil.copytree(src, copy)
    _flip(mismatch[0].replace(str(src), str(copy)), mismatch[1])
    analyzer, source = _run_analyzer(finished_run, tmp_path / "results")
    (rec,) = analyzer.run(checkpoint.run_checkpoints(copy, like=source.like,
                                                     state_like=source.state_like), steps=[3],
                          allow_failures=True)
    assert rec["status"] == "failed" and "checksum mismatch" in rec["reason"]


def test_killed_analysis_resumes_without_recomputing(finished_run, tmp_path):
    code, out = _analyze(finished_run, tmp_path / "ref").finish()
    assert code == 0, out[-3000:]
    ref_records = analysis.read_results(str(tmp_path / "ref"))
    assert len(ref_records) == len(checkpoint.list_steps(finished_run / "checkpoints"))

    results = tmp_path / "killed"
    victim = _analyze(finished_run, results)
    deadline = time.time() + 300
    records_dir = results / "records"
    while time.time() < deadline and len(list(records_dir.glob("step_*.json"))
                                         if records_dir.exists() else []) < 8:
        time.sleep(0.05)
    victim.kill()
    store = analysis.ResultStore(str(results))
    done_before = store.steps()
    assert 8 <= len(done_before) < len(ref_records)
    mtimes = {s: os.stat(store.record_path(s)).st_mtime_ns for s in done_before}

    code, out = _analyze(finished_run, results).finish()
    assert code == 0, out[-3000:]
    for s in done_before:  # finished steps were not recomputed
        assert os.stat(store.record_path(s)).st_mtime_ns == mtimes[s]
        assert f"step {s} analysed" not in out
    records = analysis.read_results(str(results))
    assert [_comparable(r) for r in records] == [_comparable(r) for r in ref_records]


def test_watch_follows_a_live_training_run(tmp_path):
    workdir = tmp_path / "live"
    writer = _train_run(workdir, num_steps=400, schedule="1:10,50")
    watcher = _analyze(workdir, tmp_path / "live_results", "--watch", "--poll_seconds=0.2",
                       "--timeout_seconds=120", "--transforms=loss,gradient,eigenpairs,f_top")
    code_w, out_w = writer.finish()
    code_a, out_a = watcher.finish()
    assert code_w == 0, out_w[-3000:]
    assert code_a == 0, out_a[-3000:]
    steps = [r["step"] for r in analysis.read_results(str(tmp_path / "live_results"))]
    assert steps == checkpoint.list_steps(workdir / "checkpoints")
    assert steps[-1] == 400


def test_the_analyzer_inside_the_training_loop(tmp_path):
    config = experiment.default_config()
    config.data.name = "gaussian_mixture"
    config.data.kwargs = dict(num_classes=3, dim=20, num_examples=300, sigma=0.3)
    config.model.kwargs.hidden = (8,)
    config.num_steps, config.batch_size, config.checkpoint_schedule = 12, 32, "4"
    loaded = experiment.load_data(config)
    analyzer = experiment.analyzer_for(config, loaded["num_outputs"], loaded["analysis"],
                                       str(tmp_path / "results"), progress=False)
    experiment.train_from_config(
        config, str(tmp_path / "run"), progress=False,
        callbacks=[lambda step, state: analyzer(step, state.params, state.model_state)])
    assert analyzer.store.steps() == [0, 4, 8, 12]
