"""Faults end cleanly: a full disk (on a real, small tmpfs), corrupt checkpoint metadata,
temporary files of killed writes, nothing to analyse, every checkpoint failing. Each ends in
one line naming the path and what happened, exit status 1, and loses nothing: the run resumes
where it stopped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hessian_subspace import _io, analysis
from hessian_subspace.analysis import store as store_lib
from hessian_subspace.paper import data, experiment
from launch.configs import train as train_configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300, prefix=()):
    proc = subprocess.run([*prefix, sys.executable, "-m", *args, "--noprogress"], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def _on_small_disk(mount: str, size: str) -> tuple[str, ...]:
    """A command prefix that runs the command with a tmpfs of ``size`` mounted at ``mount``
    (a mount namespace of its own: nothing to clean up, no root needed where user namespaces
    are allowed)."""
    os.makedirs(mount, exist_ok=True)
    return ("unshare", "--mount", "--map-root-user", "sh", "-c",
            f'mount -t tmpfs -o size={size} tmpfs "{mount}" && exec "$0" "$@"')


def _comparable(record):
    return {k: v for k, v in record.items() if k not in ("seconds", "versions", "files")}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("faults") / "run")
    config = train_configs.get_config("smoke")
    config.num_steps, config.checkpoint_schedule = 12, "4"
    experiment.train_from_config(config, workdir, progress=False)
    return workdir


def _no_traceback(out):
    assert "Traceback" not in out and 'File "' not in out, out[-3000:]


@pytest.fixture(scope="module")
def reference(smoke_run, tmp_path_factory):
    results = str(tmp_path_factory.mktemp("ref") / "a")
    code, out = _run("launch.analyze", f"--workdir={smoke_run}", f"--results={results}")
    assert code == 0, out[-3000:]
    return analysis.read_results(results)


@pytest.mark.parametrize("size", ["12k", pytest.param("48k", marks=pytest.mark.slow),
                                  pytest.param("100k", marks=pytest.mark.slow)])
def test_a_full_disk_during_the_analysis_is_one_line_and_resumes(smoke_run, reference,
                                                                  tmp_path, size):
    disk = str(tmp_path / "disk")
    code, out = _run("launch.analyze", f"--workdir={smoke_run}", f"--results={disk}/a",
                     prefix=_on_small_disk(disk, size))
    assert code == 1, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("launch.analyze: [Errno 28] No space left on device: cannot write "
                           f"{disk}/a/"), last
    _no_traceback(out)
    # What the full disk left (nothing: the tmpfs went with its namespace) resumes to the
    # records of an analysis that never failed.
    code, out = _run("launch.analyze", f"--workdir={smoke_run}", f"--results={disk}/a")
    assert code == 0, out[-3000:]
    got = analysis.read_results(f"{disk}/a")
    assert [_comparable(r)["step"] for r in got] == [r["step"] for r in reference]


def test_a_full_disk_keeps_what_was_written_and_the_rerun_completes_it(smoke_run, reference,
                                                                       tmp_path):
    """The same fault, with the partial results copied out before the tmpfs goes: they are
    whole (every record and file checks), and the rerun computes only what is missing."""
    disk = str(tmp_path / "disk")
    keep = tmp_path / "kept"
    script = (f'mount -t tmpfs -o size=64k tmpfs "{disk}" && "$0" "$@"; code=$?; '
              f'cp -r "{disk}/a" "{keep}"; exit $code')
    os.makedirs(disk)
    proc = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", script,
                           sys.executable, "-m", "launch.analyze", f"--workdir={smoke_run}",
                           f"--results={disk}/a", "--noprogress"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "No space left on device" in proc.stderr
    store = analysis.ResultStore(str(keep))
    assert store.check() == []  # nothing torn: atomic writes
    done = store.steps()
    assert done and len(done) < len(reference)
    assert not [n for _, _, names in os.walk(keep) for n in names
                if n.startswith(_io.TMP_PREFIX)]
    code, out = _run("launch.analyze", f"--workdir={smoke_run}", f"--results={keep}")
    assert code == 0, out[-3000:]
    for s in done:
        assert f"step {s} analysed" not in out
    got = analysis.read_results(str(keep))
    assert [r["step"] for r in got] == [r["step"] for r in reference]
    for a, b in zip(got, reference, strict=True):
        np.testing.assert_allclose(a["eigenvalues"], b["eigenvalues"], rtol=1e-5)


def test_a_full_disk_during_training_is_one_line_and_resumes(tmp_path):
    disk = str(tmp_path / "disk")
    args = ("launch.train", "--config=launch/configs/train.py:smoke", f"--workdir={disk}/run",
            "--config.num_steps=12", "--config.checkpoint_schedule=4")
    code, out = _run(*args, prefix=_on_small_disk(disk, "300k"))
    assert code == 1, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert "No space left on device" in last and f"{disk}/run/checkpoints" in last, last
    _no_traceback(out)


def test_a_corrupt_meta_file_of_step_0_is_named_and_the_rest_is_analysed(smoke_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    (run / "checkpoints" / "0" / "meta" / "metadata").write_text("{ not json")
    code, out = _run("launch.analyze", f"--workdir={run}", f"--results={tmp_path}/a")
    assert code == 1, out[-3000:]
    _no_traceback(out)
    assert f"cannot read {run}/checkpoints/0/meta (the meta item of step 0)" in out
    assert "1 of the 4 checkpoints" in out and "step 0: checkpoint unreadable" in out
    records = analysis.read_results(str(tmp_path / "a"))
    assert [(r["step"], r["status"]) for r in records] == [(0, "failed"), (4, "ok"), (8, "ok"),
                                                           (12, "ok")]
    code, out = _run("launch.analyze", f"--workdir={run}", f"--results={tmp_path}/a",
                     "--allow_failures")
    assert code == 0, out[-3000:]
    # Every meta unreadable: one line, no traceback.
    for step in (4, 8, 12):
        (run / "checkpoints" / str(step) / "meta" / "metadata").write_text("")
    code, out = _run("launch.analyze", f"--workdir={run}", f"--results={tmp_path}/b")
    assert code == 1 and "no checkpoint in" in out and "has a readable meta item" in out
    _no_traceback(out)


def test_nothing_to_analyse_is_an_error_naming_the_path(tmp_path):
    ds = data.gaussian_mixture(num_classes=3, dim=4, num_examples=60, sigma=0.5, seed=0)
    ds = {"x": ds["x"], "y": ds["y"]}
    params = {"w": jnp.zeros((4, 3))}

    def loss_fn(p, b):
        return -jnp.mean(jax.nn.log_softmax(b["x"] @ p["w"])[jnp.arange(60), b["y"]])

    analyzer = analysis.Analyzer(analysis.gradient(), loss_fn, data=ds,
                                 results=analysis.Results(progress=False))
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"{missing} .it does not exist. holds none"):
        analyzer.run(analysis.orbax_checkpoints(str(missing)))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="empty holds none"):
        analyzer.run(analysis.orbax_checkpoints(str(tmp_path / "empty")))
    with pytest.raises(FileNotFoundError, match="in-memory checkpoints holds none"):
        analyzer.run({})
    with pytest.raises(ValueError, match="none of the 2 checkpoints .* is scheduled"):
        analysis.Analyzer(analysis.gradient(), loss_fn, data=ds,
                          results=analysis.Results(progress=False),
                          schedule=analysis.Schedule(every_steps=10)).run({3: params, 5: params})
    code, out = _run("launch.analyze", f"--workdir={missing}", f"--results={tmp_path}/r")
    assert code == 1 and f"no finalised checkpoint in {missing}/checkpoints" in out, out
    _no_traceback(out)


def test_watching_an_empty_directory_says_what_it_waits_for(tmp_path, caplog):
    ds = data.gaussian_mixture(num_classes=3, dim=4, num_examples=60, sigma=0.5, seed=0)

    def loss_fn(p, b):
        return -jnp.mean(jax.nn.log_softmax(b["x"] @ p["w"])[jnp.arange(60), b["y"]])

    analyzer = analysis.Analyzer(analysis.gradient(), loss_fn, data={"x": ds["x"], "y": ds["y"]},
                                 results=analysis.Results(progress=False))
    with caplog.at_level("INFO"):
        with pytest.raises(TimeoutError, match="waiting for step 5"):
            analyzer.run(analysis.orbax_checkpoints(str(tmp_path / "later")), watch=True,
                         final_step=5, poll_seconds=0.1, timeout_seconds=1)
    lines = [r.getMessage() for r in caplog.records if "watching" in r.getMessage()]
    assert len(lines) == 1 and "waiting for step 5 (0 checkpoints seen)" in lines[0]
    assert str(tmp_path / "later") in lines[0]


def test_every_checkpoint_failing_is_one_error_listing_them(tmp_path):
    ds = data.gaussian_mixture(num_classes=3, dim=4, num_examples=60, sigma=0.5, seed=0)
    ds = {"x": ds["x"], "y": ds["y"]}

    def loss_fn(p, b):
        return -jnp.mean(jax.nn.log_softmax(b["x"] @ p["w"])[jnp.arange(60), b["y"]])

    bad = {t: {"w": jnp.full((4, 3), jnp.nan)} for t in (0, 1, 2)}
    analyzer = analysis.Analyzer(analysis.gradient(), loss_fn, data=ds,
                                 results=analysis.Results(str(tmp_path / "r"), progress=False))
    with pytest.raises(analysis.FailedStepsError,
                       match=r"3 of the 3 checkpoints .*\n  step 0: 12 non-finite values "
                             r"in the parameters.*\n  step 1: .*\n  step 2: ") as e:
        analyzer.run(bad)
    assert sorted(e.value.failures) == [0, 1, 2] and len(e.value.records) == 3
    again = analysis.Analyzer(analysis.gradient(), loss_fn, data=ds,
                              results=analysis.Results(str(tmp_path / "r"), progress=False))
    records = again.run(bad, allow_failures=True)  # a long sweep that keeps going
    assert [r["status"] for r in records] == ["failed"] * 3


def test_temporaries_of_killed_writes_are_removed_and_live_ones_kept(tmp_path):
    store = store_lib.ResultStore(str(tmp_path))
    store.write_step(0, {"status": "ok"}, {"bases": {"v": np.ones(3)}})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    host = _io._HOST
    names = {f".tmp-{dead}.{host}.abc-step_00000001.json": False,  # killed writer: removed
             f".tmp-{os.getpid()}.{host}.def-step_00000002.json": True,  # this live process
             f".tmp-{dead}.00000000.ghi-step_00000003.json": True,  # another host's
             ".tmp-legacy-step_00000004.npz": False}  # old layout, older than an hour
    for name in names:
        for folder in ("records", "bases"):
            (tmp_path / folder / name).write_text("partial")
    old = os.path.getmtime(tmp_path / "records" / ".tmp-legacy-step_00000004.npz") - 7200
    for folder in ("records", "bases"):
        os.utime(tmp_path / folder / ".tmp-legacy-step_00000004.npz", (old, old))
    assert store_lib.ResultStore(str(tmp_path)).check() == []
    for name, kept in names.items():
        for folder in ("records", "bases"):
            assert (tmp_path / folder / name).exists() == kept, (folder, name)


def test_results_jsonl_is_appended_and_compacted_only_on_repair(tmp_path):
    store = store_lib.ResultStore(str(tmp_path))
    path = tmp_path / store_lib.JSONL
    store.write_step(0, {"status": "ok", "x": 0}, {})
    inode = os.stat(path).st_ino
    for step in (1, 2, 3):
        store.write_step(step, {"status": "ok", "x": step}, {})
        assert os.stat(path).st_ino == inode  # appended in place, not rewritten
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2, 3]
    # A step replaced (or one before the last) rewrites the file in step order.
    store.write_step(1, {"status": "ok", "x": 10}, {})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["x"]) for r in lines] == [(0, 0), (1, 10), (2, 2), (3, 3)]
    # A torn last line (a killed append) is repaired when the store is opened.
    with open(path, "a") as f:
        f.write('{"step": 4, "sta')
    store_lib.ResultStore(str(tmp_path)).check()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]


def test_a_checkpoint_error_names_the_cause_not_a_wrapper():
    """Errors of orbax and TensorStore wrap their cause; a wrapper whose text is a bound
    method (or nothing) is skipped for the first informative line of the chain."""
    from hessian_subspace import checkpoints

    class Handler:
        def restore(self):
            pass

    try:
        try:
            raise OSError("DATA_LOSS: Error reading /x/4/model/d/abc: CRC-32C mismatch")
        except OSError as cause:
            raise ValueError(Handler().restore) from cause
    except ValueError as e:
        assert "bound method" in str(e)
        assert checkpoints.first_line(e) == ("DATA_LOSS: Error reading /x/4/model/d/abc: "
                                          "CRC-32C mismatch")
    assert checkpoints.first_line(ValueError("x" * 400)).endswith(" ...")


def test_results_jsonl_never_holds_a_step_twice_across_sessions(tmp_path):
    store = store_lib.ResultStore(str(tmp_path))
    for step in (0, 1, 2):
        store.write_step(step, {"status": "ok" if step < 2 else "failed"}, {})
    again = store_lib.ResultStore(str(tmp_path))  # a new session retries the failed last step
    again.check()
    again.write_step(2, {"status": "ok"}, {})
    again.write_step(3, {"status": "ok"}, {})
    lines = [json.loads(line) for line in (tmp_path / store_lib.JSONL).read_text().splitlines()]
    assert [(r["step"], r["status"]) for r in lines] == [(0, "ok"), (1, "ok"), (2, "ok"),
                                                         (3, "ok")]
