"""The result store survives its own files: corrupt records, state arrays and spectra are
reported by path, moved aside and recomputed; the transforms' state is stored by name, each
distinct array once; results.jsonl follows records/; scalar writers."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hessian_subspace import analysis
from hessian_subspace.analysis import store as store_lib
from hessian_subspace.analysis import writers
from hessian_subspace.paper import data

STEPS = (0, 3, 6, 9)


def _problem():
    ds = data.gaussian_mixture(num_classes=3, dim=5, num_examples=90, sigma=0.5, seed=4)
    keys = jax.random.split(jax.random.key(1), 2)
    params = {"w": 0.3 * jax.random.normal(keys[0], (5, 3)), "b": jnp.zeros(3)}

    def loss_fn(p, batch):
        logits = batch["x"] @ p["w"] + p["b"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(logits.shape[0]), batch["y"]])

    trajectory = {t: jax.tree_util.tree_map(lambda x, t=t: x * (1 + 0.05 * t) + 0.01 * t,
                                            params) for t in STEPS}
    return {"x": ds["x"], "y": ds["y"]}, loss_fn, trajectory


def _chain():
    return analysis.chain(analysis.gradient(), analysis.eigenpairs(k=4),
                          analysis.f_top(k=2, num_minibatches=0),
                          analysis.subspace_overlap(k=2, reference_steps=(0,)),
                          analysis.at_steps(analysis.slq(num_probes=2, num_steps=8), (6,)))


def _analyzer(directory, ds, loss_fn):
    return analysis.Analyzer(_chain(), loss_fn, data=ds,
                             results=analysis.Results(str(directory), progress=False))


def _comparable(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "versions")} for r in records]


@pytest.fixture
def analysed(tmp_path):
    ds, loss_fn, trajectory = _problem()
    _analyzer(tmp_path / "results", ds, loss_fn).run(trajectory)
    return tmp_path / "results", ds, loss_fn, trajectory


def test_layout_and_files_listed_with_checksums(analysed):
    results, *_ = analysed
    store = analysis.ResultStore(str(results))
    assert store.check() == []
    assert store.steps("ok") == list(STEPS)
    rec = store.record(6)
    assert set(rec["files"]) == {"spectra", "state"}
    for entry in rec["files"].values():
        assert os.path.getsize(results / entry["path"]) == entry["bytes"]
    assert set(store.stored("spectra", 6)) == {"slq_nodes", "slq_weights"}
    # The state after each step, by name: eigenpairs' basis, subspace_overlap's previous basis
    # (the same array) and its reference basis of step 0 (the same at every later step).
    names = {"eigenpairs/" + f for f in ("step", "eigenvectors", "eigenvalues", "residuals")}
    names |= {f"subspace_overlap/{which}/{f}" for which in ("previous", "references/0")
              for f in ("step", "eigenvectors", "eigenvalues", "residuals")}
    for step in STEPS:
        state = store.state(step)
        assert set(state) == names, step
        np.testing.assert_array_equal(state["eigenpairs/eigenvectors"],
                                      state["subspace_overlap/previous/eigenvectors"])
        np.testing.assert_array_equal(state["subspace_overlap/references/0/eigenvectors"],
                                      store.state(0)["eigenpairs/eigenvectors"])
        assert state["eigenpairs/step"] == step and state["eigenpairs/eigenvectors"].shape == (
            4, 18)
        manifest = json.load(open(results / rec["files"]["state"]["path"]))
        assert all(e["path"].startswith("state/arrays/") for e in manifest.values())
        assert store.content("state", step) == store_lib.fp.arrays_content(state)
    assert set(store.state(6, "eigenpairs/")) == {n for n in names if n.startswith("eigenp")}
    # Each distinct array is one file: one basis per step, not one per name and step.
    blobs = os.listdir(results / "state" / "arrays")
    manifests = [json.load(open(results / store.record(t)["files"]["state"]["path"]))
                 for t in STEPS]
    assert len(blobs) == len({e["path"] for m in manifests for e in m.values()})
    bases = {m["eigenpairs/eigenvectors"]["path"] for m in manifests}
    assert len(bases) == len(STEPS) and all(
        m["subspace_overlap/references/0/eigenvectors"] == manifests[0][
            "eigenpairs/eigenvectors"] for m in manifests)
    lines = [json.loads(x) for x in open(results / "results.jsonl")]
    assert [r["step"] for r in lines] == list(STEPS)
    settings = json.load(open(results / "pipeline.json"))
    assert [t["name"] for t in settings["transforms"]] == ["gradient", "eigenpairs", "f_top",
                                                           "subspace_overlap", "slq"]


@pytest.mark.parametrize("what", ["record", "basis", "spectrum", "state"])
def test_a_corrupt_file_is_named_moved_aside_and_its_step_recomputed(analysed, caplog, what):
    results, ds, loss_fn, trajectory = analysed
    reference = _comparable(analysis.read_results(str(results)))
    manifest = json.load(open(results / "state" / "step_00000006.json"))
    path = {"record": results / "records" / "step_00000006.json",
            "basis": results / manifest["eigenpairs/eigenvectors"]["path"],
            "spectrum": results / "spectra" / "step_00000006.npz",
            "state": results / "state" / "step_00000006.json"}[what]
    with open(path, "r+b") as f:  # truncate, as a crash of another writer would
        f.truncate(os.path.getsize(path) // 2)
    mtimes = {s: os.stat(results / "records" / f"step_{s:08d}.json").st_mtime_ns
              for s in STEPS if s != 6}
    analyzer = _analyzer(results, ds, loss_fn)
    assert str(path) in caplog.text  # reported by path
    moved = [os.path.join(root, f) for root, _, files in os.walk(results / "quarantine")
             for f in files]
    assert any(os.path.basename(m).startswith(path.name) for m in moved)  # moved, not deleted
    assert not analyzer.done(6) and analyzer.done(3)
    written = analyzer.run(trajectory)
    assert [r["step"] for r in written] == [6]  # only the damaged step is recomputed
    for s, t in mtimes.items():
        assert os.stat(results / "records" / f"step_{s:08d}.json").st_mtime_ns == t
    assert _comparable(analysis.read_results(str(results))) == reference


def test_an_unreadable_reference_basis_fails_the_step_that_needs_it(analysed):
    results, ds, loss_fn, trajectory = analysed
    reference = _comparable(analysis.read_results(str(results)))
    analyzer = _analyzer(results, ds, loss_fn)
    manifest = json.load(open(results / "state" / "step_00000006.json"))
    basis = results / manifest["subspace_overlap/references/0/eigenvectors"]["path"]
    basis.write_bytes(b"garbage, not an npy file")  # after the store was checked
    rec = analyzer.process(9, trajectory[9])  # starts from step 6's state, which holds it
    assert rec["status"] == "failed" and str(basis) in rec["reason"]
    assert "quarantine" in os.listdir(results) and not basis.exists()
    # Next start: every state that holds the lost array is unreadable, so its step is
    # recomputed (step 0's basis is in all of them), and 9 is retried; the same numbers.
    written = _analyzer(results, ds, loss_fn).run(trajectory)
    assert [r["step"] for r in written] == [0, 3, 6, 9]
    assert _comparable(analysis.read_results(str(results))) == reference


def test_results_jsonl_is_rebuilt_when_it_disagrees_with_the_records(analysed):
    results, ds, loss_fn, _ = analysed
    jsonl = results / "results.jsonl"
    full = jsonl.read_text()
    jsonl.write_text(full[: len(full) // 3])  # e.g. a disk-full during the last rebuild
    _analyzer(results, ds, loss_fn)
    assert jsonl.read_text() == full
    jsonl.unlink()
    analysis.ResultStore(str(results)).check()
    assert jsonl.read_text() == full


def test_memory_store_and_csv_and_tensorboard_writers(tmp_path):
    ds, loss_fn, trajectory = _problem()
    csv_path = tmp_path / "scalars.csv"
    logged = []
    tb = writers.TensorBoardWriter(str(tmp_path / "tb"))
    analyzer = analysis.Analyzer(_chain(), loss_fn, data=ds,
                                 results=analysis.Results(
                                     writers=[writers.CSVWriter(str(csv_path)),
                                              lambda step, s: logged.append((step, s)), tb],
                                     progress=False),
                                 schedule=analysis.Schedule(every_steps=3))
    for t, p in trajectory.items():
        analyzer(t, p)
    assert [r["step"] for r in analyzer.records] == list(STEPS)  # in memory, no files
    assert analyzer.store.directory is None
    table = writers.read_csv(str(csv_path))
    assert sorted(table["f_top"]) == list(STEPS)
    np.testing.assert_allclose([table["f_top"][s] for s in STEPS],
                               [r["f_top"] for r in analyzer.records], rtol=1e-12)
    assert "subspace_overlap/0/top2" in table and "eigenvalues" not in table
    assert [s for s, _ in logged] == list(STEPS)
    # Only the transforms' numbers: the analyzer's bookkeeping stays in the record, and the
    # previous checkpoint's overlap is written once (under its step).
    names = set(table)
    assert not {n for n in names if n.split("/")[0] in (
        "processes", "hessian", "files", "fingerprints", "seconds", "hvps", "reads")}, names
    assert not {n for n in names if n.startswith("subspace_overlap/previous")}, names
    tb.close()
    # The event file holds the same scalars (read back with tensorboardX's protobufs).
    from tensorboardX.proto import event_pb2
    (event_file,) = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "tb") for f in fs]
    raw = open(event_file, "rb").read()
    values, pos = {}, 0
    while pos < len(raw):
        n = int.from_bytes(raw[pos:pos + 8], "little")
        event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + n])
        pos += 16 + n
        for v in event.summary.value:
            if v.tag == "f_top":
                values[event.step] = v.simple_value
    np.testing.assert_allclose([values[s] for s in STEPS],
                               [r["f_top"] for r in analyzer.records], rtol=1e-6)
    with pytest.raises(TypeError, match="writer"):
        analysis.Analyzer(_chain(), loss_fn, data=ds, results=analysis.Results(writers=[42]))


def test_store_refuses_mismatched_records_and_keeps_quarantined_copies(tmp_path):
    store = store_lib.ResultStore(str(tmp_path))
    store.write_step(5, {"status": "ok"}, {})
    # A record file holding another step's record is not trusted.
    os.rename(tmp_path / "records" / "step_00000005.json",
              tmp_path / "records" / "step_00000007.json")
    problems = store_lib.ResultStore(str(tmp_path)).check()
    assert len(problems) == 1 and "step_00000007.json" in problems[0]
    assert os.listdir(tmp_path / "quarantine" / "records")


def test_overwrite_after_a_settings_change_keeps_the_new_state_readable(analysed, caplog):
    """The old state's arrays go to replaced/; the new run writes its own (also where their
    bytes equal an old array's), so the next start reuses every record."""
    results, ds, loss_fn, trajectory = analysed

    def other(overwrite):
        return analysis.Analyzer(_chain(), loss_fn, data=ds, seed=1, results=analysis.Results(
            str(results), overwrite=overwrite, progress=False))

    assert len(other(True).run(trajectory)) == len(STEPS)
    assert os.listdir(results / "replaced" / "state")
    store = analysis.ResultStore(str(results))
    assert store.check() == [] and not (results / "quarantine").exists()
    assert other(False).run(trajectory) == []
    np.testing.assert_array_equal(store.state(9)["eigenpairs/step"], 9)


def test_overwrite_sets_aside_a_directory_of_the_previous_layout(tmp_path, caplog):
    """Layout 3 kept the state as state/step_X.npz and bases in bases/: with overwrite, its
    records go to replaced/ (not quarantine/: nothing in them is corrupt)."""
    ds, loss_fn, trajectory = _problem()
    results = tmp_path / "old"
    old = store_lib.ResultStore(str(results))
    old.write_settings({"layout": 3})
    old.write_step(0, {"status": "ok"}, {"state": {"leaf_0": np.ones(2)},
                                         "bases": {"eigenvectors": np.ones((2, 3))}})
    with pytest.raises(analysis.StaleResultsError, match="differ in"):
        _analyzer(results, ds, loss_fn)
    analysis.Analyzer(_chain(), loss_fn, data=ds, results=analysis.Results(
        str(results), overwrite=True, progress=False)).run(trajectory)
    assert not (results / "quarantine").exists()
    assert os.path.exists(results / "replaced" / "records")
    assert analysis.ResultStore(str(results)).steps("ok") == list(STEPS)
