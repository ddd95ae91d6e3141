"""Multi-host JAX on localhost: 2 processes x 2 CPU devices (gloo collectives). The analysis of
a run through launch/analyze.py equals the 1-process analysis; each process loads only its
share of a data set; bad multi-host settings fail before anything starts."""

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from hessian_subspace import analysis

from _helpers import Process, device_env, free_port, two_processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CONFIG = os.path.join(REPO, "launch", "configs", "train.py")


def _env(devices):
    return device_env(devices)


def _two_processes(cmd, log_prefix, timeout=600):
    return two_processes(cmd, log_prefix, devices=2, timeout=timeout)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mh") / "run"
    cmd = [sys.executable, "-m", "launch.train", f"--config={TRAIN_CONFIG}:smoke",
           f"--workdir={workdir}", "--config.num_steps=12", "--noprogress",
           "--config.checkpoint_schedule=4"]
    code, out = Process(cmd, f"{workdir}.train.log").finish()
    assert code == 0, out[-3000:]
    return workdir


def _numbers(record):
    keys = ("train_loss", "grad_norm", "eigenvalues", "f_top", "f_next", "overlap_g_hg", "c2",
            "lambda_max")
    return {k: record[k] for k in keys}


def test_two_process_analysis_equals_one_process(run_dir, tmp_path):
    base = [sys.executable, "-m", "launch.analyze", f"--workdir={run_dir}", "--batch_size=128",
            "--noprogress", "--num_analysis=301", "--reference_steps=0,4"]
    one = subprocess.run(base + [f"--results={tmp_path / 'one'}"], cwd=REPO, env=_env(1),
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    runs = _two_processes(base + [f"--results={tmp_path / 'two'}", "--mesh=data:4"],
                          str(tmp_path / "two"))
    for code, out in runs:
        assert code == 0, out[-3000:]
    assert "process 1 of 2; 4 devices (2 local)" in runs[1][1]
    a = analysis.read_results(str(tmp_path / "one"))
    b = analysis.read_results(str(tmp_path / "two"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 4, 8, 12]
    for x, y in zip(a, b, strict=True):
        assert y["status"] == "ok" and y["processes"] == 2
        assert y["hessian"]["mesh"] == {"data": 4}
        assert x["processes"] == 1
        for key, value in _numbers(x).items():
            np.testing.assert_allclose(y[key], value, rtol=3e-5, atol=3e-6, err_msg=key)
        assert set(y["subspace_overlap"]) == set(x["subspace_overlap"])
        for t, over in x["subspace_overlap"].items():  # read back from process 0's files
            if t == "previous":
                assert y["subspace_overlap"][t] == over  # {"step": t}
                continue
            np.testing.assert_allclose(y["subspace_overlap"][t]["top3"], over["top3"],
                                       rtol=1e-4, atol=1e-5)
    # Only process 0 wrote: one set of records, whole and valid.
    assert analysis.ResultStore(str(tmp_path / "two")).check() == []


_LOADER = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
    import jax.numpy as jnp, numpy as np
    import hessian_subspace as hs
    n = 103
    full = {"x": np.arange(n * 2, dtype=np.float32).reshape(n, 2)}
    asked = []
    def load(start, stop):  # a data set that can read ranges: count what this process reads
        asked.append([start, stop])
        return {"x": full["x"][start:stop]}
    mesh = hs.sharding.parse_mesh("data:4")
    batched = hs.batch_data(load, num_examples=n, batch_size=8, mesh=mesh)
    mean = jax.jit(lambda b: hs.dataset_mean(lambda x: jnp.mean(x["x"], 0), b))(batched)
    print(json.dumps(dict(asked=asked, mean=np.asarray(hs._tree.to_host(mean)).tolist())))
    """
)


def test_each_process_loads_only_its_share(tmp_path):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _LOADER, f"localhost:{port}", str(pid)],
                              cwd=REPO, env=_env(2), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    chunk = 103 // 4  # 25 examples per device, the last 3 on every device
    want_mean = np.mean(np.arange(206, dtype=np.float64).reshape(103, 2), 0)
    for pid, res in enumerate(results):
        ranges = {tuple(r) for r in res["asked"]}
        own = {(d * chunk, (d + 1) * chunk) for d in (2 * pid, 2 * pid + 1)}
        assert own <= ranges and ranges - own <= {(0, 1), (4 * chunk, 103)}, ranges
        np.testing.assert_allclose(res["mean"], want_mean, rtol=1e-6)


def test_bad_multihost_settings_fail_before_anything_starts(run_dir, tmp_path):
    base = [sys.executable, "-m", "launch.analyze", f"--workdir={run_dir}", "--noprogress",
            f"--results={tmp_path / 'r'}"]
    for extra, message in (
            (["--num_processes=2"], "needs all of --coordinator_address"),
            (["--coordinator_address=localhost:1", "--num_processes=2", "--process_id=2"],
             "--process_id must be in"),
            (["--coordinator_address=nohost", "--num_processes=2", "--process_id=0"],
             "host:port"),
            (["--mesh=data:3"], "multiply to the device count"),
            (["--mesh=data:1,batch:x"], "look like")):
        proc = subprocess.run(base + extra, cwd=REPO, env=_env(2), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode != 0 and message in proc.stderr, (extra, proc.stderr[-2000:])
    assert not (tmp_path / "r").exists()
    # A coordinator nobody answers: a clear error naming the flag, after the timeout.
    proc = subprocess.run(base + [f"--coordinator_address=localhost:{free_port()}",
                                  "--num_processes=2", "--process_id=1",
                                  "--distributed_timeout=5"],
                          cwd=REPO, env=_env(2), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--coordinator_address=localhost" in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def long_run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mh_long") / "run"
    cmd = [sys.executable, "-m", "launch.train", f"--config={TRAIN_CONFIG}:smoke",
           f"--workdir={workdir}", "--config.num_steps=20", "--noprogress",
           "--config.checkpoint_schedule=1"]
    code, out = Process(cmd, f"{workdir}.train.log").finish()
    assert code == 0, out[-3000:]
    return workdir


@pytest.mark.slow
def test_a_lost_peer_ends_the_run_with_one_line_and_no_failure_record(long_run_dir, tmp_path):
    """kill -9 of process 1 in the middle of a 2-process analysis: process 0 names it, exits 1
    at once (no native abort 60 s later), and writes no failure record; restarted, the two
    processes reuse every finished record and complete the run."""
    results = tmp_path / "r"
    base = [sys.executable, "-m", "launch.analyze", f"--workdir={long_run_dir}",
            "--batch_size=128", "--noprogress", "--num_analysis=301", "--mesh=data:4",
            f"--results={results}"]
    port = free_port()
    procs = []
    for pid in (0, 1):
        log = open(tmp_path / f"p{pid}.log", "w")
        procs.append((subprocess.Popen(base + [f"--coordinator_address=localhost:{port}",
                                               "--num_processes=2", f"--process_id={pid}"],
                                       cwd=REPO, env=_env(2), stdout=log,
                                       stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list((results / "records").glob("*.json"))
                                              if (results / "records").exists() else []) < 3:
        time.sleep(0.1)
    procs[1][0].kill()
    start = time.monotonic()
    code = procs[0][0].wait(timeout=120)
    waited = time.monotonic() - start
    for _, log in procs:
        log.close()
    out = (tmp_path / "p0.log").read_text()
    assert code == 1, out[-3000:]
    assert "process 0: process 1 of 2 was lost" in out, out[-3000:]
    assert "Fatal Python error" not in out and "Check failure" not in out, out[-3000:]
    assert waited < 30, waited  # not JAX's heartbeat timeout
    records = analysis.read_results(str(results))
    assert 3 <= len(records) < 21 and {r["status"] for r in records} == {"ok"}
    done = {r["step"]: r["seconds"] for r in records}
    for code, out in _two_processes(base, str(tmp_path / "again")):
        assert code == 0, out[-3000:]
    records = analysis.read_results(str(results))
    assert [r["step"] for r in records] == list(range(21))
    assert all(r["status"] == "ok" for r in records)
    for r in records:  # the finished ones were reused, not recomputed
        if r["step"] in done:
            assert r["seconds"] == done[r["step"]]


def test_process_0_alone_is_one_line_naming_the_missing_process(run_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launch.analyze", f"--workdir={run_dir}",
                           "--noprogress", f"--results={tmp_path / 'r'}",
                           f"--coordinator_address=localhost:{free_port()}",
                           "--num_processes=3", "--process_id=0", "--distributed_timeout=3"],
                          cwd=REPO, env=_env(2), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("launch.analyze: process 0: processes 1, 2 of 3 did not join "
                           "within --distributed_timeout=3 s"), last
    assert "Traceback" not in proc.stderr and "Fatal Python error" not in proc.stderr
    assert not (tmp_path / "r").exists()
