"""A record is reused only when it was computed from the same checkpoint content, loss, data
and settings (its fingerprints); otherwise the run refuses with the step and what changed, or
recomputes with ``overwrite=True``. Records whose outputs depend on the transforms' state are
recomputed when the state they started from is no longer the one before them (a step analysed
since in between, or recomputed)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from hessian_subspace import analysis
from hessian_subspace.analysis import store as store_lib
from hessian_subspace.paper import data

STEPS = (0, 4, 8, 12)


def _problem(seed=2):
    ds = data.gaussian_mixture(num_classes=3, dim=5, num_examples=120, sigma=0.5, seed=seed)
    return {"x": ds["x"], "y": ds["y"]}


def _init(hidden=6):
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"w1": jax.random.normal(k1, (5, hidden)) / 2, "b1": jnp.zeros(hidden),
            "w2": jax.random.normal(k2, (hidden, 3)) / 2, "b2": jnp.zeros(3)}


def make_loss(decay):
    def loss_fn(params, batch):
        h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
        logits = h @ params["w2"] + params["b2"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        return ce + decay * jnp.sum(params["w1"] ** 2)
    return loss_fn


def _train(ds, lr, steps=STEPS, decay=1e-3, hidden=6):
    loss_fn = make_loss(decay)
    tx = optax.sgd(lr)
    step_fn = jax.jit(lambda p, o: (lambda u, o: (optax.apply_updates(p, u), o))(
        *tx.update(jax.grad(loss_fn)(p, ds), o)))
    params, opt, out = _init(hidden), None, {}
    opt = tx.init(params)
    for t in range(max(steps) + 1):
        if t in steps:
            out[t] = params
        params, opt = step_fn(params, opt)
    return out


def _save(directory, trajectory):
    with ocp.CheckpointManager(os.path.abspath(directory)) as mngr:
        for step, params in trajectory.items():
            mngr.save(step, args=ocp.args.StandardSave(params))
        mngr.wait_until_finished()


def _chain():
    return analysis.chain(analysis.loss(), analysis.gradient(), analysis.eigenpairs(k=4),
                          analysis.f_top(k=2, num_minibatches=0),
                          analysis.subspace_overlap(k=2, reference_steps=(0, 4)))


def _analyzer(ds, results, loss_fn=None, chain=None, every_steps=None, overwrite=False):
    return analysis.Analyzer(
        chain or _chain(), loss_fn or make_loss(1e-3), data=ds, batch_size=60,
        results=analysis.Results(str(results), overwrite=overwrite, progress=False),
        schedule=analysis.Schedule(every_steps=every_steps))


def _mtimes(results):
    folder = os.path.join(results, "records")
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns
            for name in sorted(os.listdir(folder))}


def test_records_carry_fingerprints_and_a_rerun_reuses_them(tmp_path):
    ds = _problem()
    source = analysis.in_memory(_train(ds, 0.3))
    results = tmp_path / "r"
    first = _analyzer(ds, results).run(source)
    fps = first[0]["fingerprints"]
    assert set(fps) >= {"checkpoint", "loss", "data", "settings", "algorithm"}
    assert len({r["fingerprints"]["checkpoint"] for r in first}) == 4  # one per content
    assert len({r["fingerprints"]["loss"] for r in first}) == 1
    before = _mtimes(results)
    assert _analyzer(ds, results).run(source) == []  # everything matches: nothing recomputed
    assert _mtimes(results) == before


def test_a_users_own_orbax_checkpoints_retrained_in_place_are_not_reused(tmp_path):
    """The run of the issue: the same checkpoint directory, retrained with another learning
    rate, analysed into the same results directory."""
    ds = _problem()
    ckpts, results = tmp_path / "ckpts", tmp_path / "results"
    _save(ckpts, _train(ds, 0.3))
    like = _init()
    _analyzer(ds, results).run(analysis.orbax_checkpoints(str(ckpts), like=like))
    shutil.rmtree(ckpts)
    _save(ckpts, _train(ds, 0.05))  # retrained in place; step 0 (the init) is unchanged
    source = analysis.orbax_checkpoints(str(ckpts), like=like)
    with pytest.raises(analysis.StaleResultsError,
                       match=r"step 4: its record \(.*step_00000004.json\) was computed from "
                             r"other inputs .*checkpoint's content .* differs.*another results "
                             r"directory, or overwrite=True \(--overwrite\)"):
        _analyzer(ds, results).run(source)
    kept = analysis.read_results(str(results))
    assert [r["step"] for r in kept] == list(STEPS)  # refused: nothing moved or rewritten
    step0 = os.stat(os.path.join(results, "records", "step_00000000.json")).st_mtime_ns
    # overwrite=True: the old records go to replaced/, the changed steps are computed again.
    redone = _analyzer(ds, results, overwrite=True).run(source)
    assert [r["step"] for r in redone] == [4, 8, 12]
    assert os.stat(os.path.join(results, "records", "step_00000000.json")).st_mtime_ns == step0
    assert len(os.listdir(results / "replaced" / "records")) == 3
    fresh = _analyzer(ds, tmp_path / "fresh").run(source)
    for a, b in zip(analysis.read_results(str(results)), fresh, strict=True):
        assert a["fingerprints"] == b["fingerprints"]
        np.testing.assert_allclose(a["f_top"], b["f_top"], rtol=1e-6)
        assert a["subspace_overlap"] == b["subspace_overlap"]


def test_a_changed_loss_constant_or_bound_array_is_not_reused(tmp_path):
    ds = _problem()
    source = analysis.in_memory(_train(ds, 0.3))
    results = tmp_path / "r"
    _analyzer(ds, results, loss_fn=make_loss(1e-3)).run(source)
    with pytest.raises(analysis.StaleResultsError, match="step 0: .*the loss differs"):
        _analyzer(ds, results, loss_fn=make_loss(0.3)).run(source)
    # The same body under another name is the same loss: reused.
    same = make_loss(1e-3)
    assert _analyzer(ds, results, loss_fn=same).run(source) == []
    # A constant bound as an array (jax.tree_util.Partial) is part of the loss too.

    def decayed(decay, params, batch):
        return make_loss(0.0)(params, batch) + decay * jnp.sum(params["w2"] ** 2)

    other = tmp_path / "p"
    _analyzer(ds, other, loss_fn=jax.tree_util.Partial(decayed, jnp.asarray(0.01))).run(source)
    with pytest.raises(analysis.StaleResultsError, match="the loss differs"):
        _analyzer(ds, other, loss_fn=jax.tree_util.Partial(decayed, jnp.asarray(0.02))).run(
            source)


def test_the_live_hook_refuses_a_record_of_other_parameters(tmp_path):
    ds = _problem()
    results = tmp_path / "r"
    trajectory = _train(ds, 0.3)
    analyzer = _analyzer(ds, results, every_steps=4)
    for step, params in trajectory.items():
        analyzer(step, params)
    rerun = _analyzer(ds, results, every_steps=4)
    assert rerun(0, trajectory[0]) is None  # the same parameters: reused
    other = _train(ds, 0.05)
    with pytest.raises(analysis.StaleResultsError, match="step 4: "):
        rerun(4, other[4])
    replaced = _analyzer(ds, results, every_steps=4, overwrite=True)
    record = replaced(4, other[4])
    assert record["status"] == "ok"
    assert record["fingerprints"]["checkpoint"] != trajectory and os.path.isdir(
        results / "replaced")


def _flip_until_values_change(directory, step, like):
    """Flips one byte at a time in the data files of ``step`` until orbax still reads the
    checkpoint but its values changed (the silent corruption orbax cannot see); returns the
    number of flips tried."""
    source = analysis.orbax_checkpoints(str(directory), like=like)
    good, _ = source.load(step)
    files = sorted(os.path.join(root, n) for root, _, names in os.walk(directory / str(step))
                   for n in names if f"{os.sep}d{os.sep}" in os.path.join(root, n))
    tried = 0
    for path in files:
        size = os.path.getsize(path)
        for i in range(1, 32):
            offset = i * size // 32
            with open(path, "r+b") as f:  # 8 bytes, as a bad sector or a bad copy would
                f.seek(offset)
                b = f.read(8)
                f.seek(offset)
                f.write(bytes(x ^ 0xFF for x in b))
            tried += 1
            try:
                params, _ = source.load(step)
            except analysis.CheckpointError:
                params = None
            leaves = zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(good),
                         strict=True) if params is not None else ()
            if any(not np.array_equal(a, b) for a, b in leaves):
                return tried
            with open(path, "r+b") as f:  # undo, try the next offset
                f.seek(offset)
                f.write(b)
    raise AssertionError("no flip changed the values silently")


def test_a_flipped_byte_in_a_users_checkpoint_is_caught_at_the_next_analysis(tmp_path):
    """A user's own orbax checkpoints carry no checksum of ours: what the first analysis saw is
    in its records, so a later change of the data is refused, not analysed as if nothing
    happened."""
    ds = _problem()
    ckpts, results = tmp_path / "ckpts", tmp_path / "results"
    _save(ckpts, _train(ds, 0.3, hidden=256))  # data chunks big enough to flip silently
    like = _init(256)
    _analyzer(ds, results).run(analysis.orbax_checkpoints(str(ckpts), like=like))
    _flip_until_values_change(ckpts, 8, like)
    with pytest.raises(analysis.StaleResultsError, match="step 8: .*checkpoint's content"):
        _analyzer(ds, results).run(analysis.orbax_checkpoints(str(ckpts), like=like))
    rec = analysis.ResultStore(str(results)).record(8)
    assert rec["status"] == "ok"  # the old record is kept, never silently replaced


def test_an_ok_record_is_kept_when_its_checkpoint_became_unreadable(tmp_path):
    ds = _problem()
    ckpts, results = tmp_path / "ckpts", tmp_path / "results"
    _save(ckpts, _train(ds, 0.3))
    like = _init()
    _analyzer(ds, results).run(analysis.orbax_checkpoints(str(ckpts), like=like))
    shutil.rmtree(ckpts / "8" / "default")  # step 8 can no longer be read
    with pytest.raises(analysis.FailedStepsError, match="step 8: checkpoint unreadable") as e:
        _analyzer(ds, results).run(analysis.orbax_checkpoints(str(ckpts), like=like))
    assert e.value.records == []  # nothing written: the ok record could not be checked
    assert analysis.ResultStore(str(results)).record(8)["status"] == "ok"


def test_a_corrupt_pipeline_json_is_rebuilt_from_matching_records_only(tmp_path, caplog):
    ds = _problem()
    source = analysis.in_memory(_train(ds, 0.3))
    results = tmp_path / "r"
    _analyzer(ds, results).run(source)
    settings = results / "pipeline.json"
    settings.write_text("{ not json")
    # Other settings (k = 3 instead of 2): refused, although pipeline.json is unreadable.
    other = analysis.chain(analysis.loss(), analysis.gradient(), analysis.eigenpairs(k=6),
                           analysis.f_top(k=3, num_minibatches=0))
    with caplog.at_level("WARNING"):
        with pytest.raises(analysis.StaleResultsError,
                           match=r"no readable pipeline.json, and the records of steps "
                                 r"\[0, 4, 8, 12\] were made with other settings"):
            _analyzer(ds, results, chain=other)
    assert "settings will be rebuilt from the records" in caplog.text
    assert "its step will be computed again" not in caplog.text
    assert not settings.exists() and os.listdir(results / "quarantine")
    # The same settings: pipeline.json is rebuilt from the records, which are reused.
    before = _mtimes(results)
    analyzer = _analyzer(ds, results)
    assert json.loads(settings.read_text()) == json.loads(json.dumps(analyzer.settings))
    assert analyzer.run(source) == [] and _mtimes(results) == before


def test_records_lacking_a_reference_are_completed_once_it_is_analysed(tmp_path):
    """Two analyses split the steps of one directory: the later steps, computed first, lack
    the overlap with the reference steps; once those are analysed, the records after them
    started from another state than the one now before them, and are computed again."""
    ds = _problem()
    trajectory = _train(ds, 0.3)
    source = analysis.in_memory(trajectory)
    results = tmp_path / "r"
    late = _analyzer(ds, results).run(source, steps=[8, 12])
    for r in late:
        assert "0" not in r["subspace_overlap"] and "4" not in r["subspace_overlap"]
    assert late[0]["state_from"] == dict(step=None, content=None, values=True)
    assert late[1]["state_from"]["step"] == 8
    _analyzer(ds, results).run(source, steps=[0, 4])
    completed = _analyzer(ds, results).run(source)
    assert [r["step"] for r in completed] == [8, 12]
    store = analysis.ResultStore(str(results))
    for r in completed:
        assert {"0", "4"} <= set(r["subspace_overlap"])
        before = {8: 4, 12: 8}[r["step"]]
        assert r["state_from"] == dict(step=before, content=store.content("state", before),
                                       values=True)
    fresh = _analyzer(ds, tmp_path / "fresh").run(source)
    for a, b in zip(analysis.read_results(str(results)), fresh, strict=True):
        assert set(a["subspace_overlap"]) == set(b["subspace_overlap"])
    assert _analyzer(ds, results).run(source) == []  # complete now: all reused


def test_a_record_is_recomputed_when_the_state_it_started_from_changed(tmp_path):
    ds = _problem()
    trajectory = _train(ds, 0.3)
    results = tmp_path / "r"
    records = _analyzer(ds, results).run(analysis.in_memory(trajectory))
    warm = records[1]
    assert warm["warm_start_step"] == 0 and warm["state_from"]["step"] == 0
    # Step 4's checkpoint changes: with overwrite, step 4 is recomputed, and so are the later
    # steps, whose overlaps started from step 4's state (their own checkpoints did not change).
    changed = dict(trajectory)
    changed[4] = jax.tree_util.tree_map(lambda x: x * 1.01, trajectory[4])
    redone = _analyzer(ds, results, overwrite=True).run(analysis.in_memory(changed))
    assert [r["step"] for r in redone] == [4, 8, 12]
    assert _analyzer(ds, results).run(analysis.in_memory(changed)) == []


def test_a_warm_start_alone_does_not_make_records_outdated(tmp_path):
    """eigenpairs' state is a start vector only (`state_affects_values=False`): a chain
    without subspace_overlap keeps its later records when an earlier step changes."""
    ds = _problem()
    trajectory = _train(ds, 0.3)
    pipe = analysis.chain(analysis.gradient(), analysis.eigenpairs(k=4, tol=1e-5),
                          analysis.f_top(k=2, num_minibatches=0))
    results = tmp_path / "r"
    records = _analyzer(ds, results, chain=pipe).run(analysis.in_memory(trajectory))
    assert records[1]["state_from"]["values"] is False
    changed = dict(trajectory)
    changed[4] = jax.tree_util.tree_map(lambda x: x * 1.01, trajectory[4])
    redone = _analyzer(ds, results, chain=pipe, overwrite=True).run(
        analysis.in_memory(changed))
    assert [r["step"] for r in redone] == [4]


def test_fingerprints_of_the_store_and_of_the_old_layout(tmp_path):
    ds = _problem()
    results = tmp_path / "r"
    source = analysis.in_memory(_train(ds, 0.3))
    _analyzer(ds, results).run(source)
    store = analysis.ResultStore(str(results))
    rec = store.record(4)
    assert rec["files"]["state"]["content"] == store_lib.fp.arrays_content(store.state(4))
    # A directory of the previous layout (bases/ and reads) is refused by name.
    settings = json.loads((results / "pipeline.json").read_text())
    settings["layout"] = 3
    (results / "pipeline.json").write_text(json.dumps(settings))
    with pytest.raises(analysis.StaleResultsError, match="differ in layout"):
        _analyzer(ds, results)
