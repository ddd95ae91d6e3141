"""Transforms and their composition: what chain() checks before any work (requirements,
declared record keys, how many vectors a transform uses against how many its provider
computes), that every built-in writes exactly the record keys it declares, and that the
README's table of record keys says the same."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import flatten_util

from hessian_subspace import analysis
from hessian_subspace.analysis import transforms as transforms_lib
from hessian_subspace.paper import data
from hessian_subspace.training import tasks

from _pipeline import acceptance_problem, tiny_problem, user_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The README's row label -> the built-in it documents, made with small arguments.
BUILTINS = {
    "analysis.loss()": lambda: analysis.loss(),
    "analysis.gradient()": lambda: analysis.gradient(),
    "analysis.eigenpairs(k)": lambda: analysis.eigenpairs(k=6),
    "analysis.f_top(k)": lambda: analysis.f_top(k=3, num_minibatches=2, minibatch_size=16),
    "analysis.c2(num)": lambda: analysis.c2(6),
    "analysis.overlap_g_hg()": lambda: analysis.overlap_g_hg(),
    "analysis.layers()": lambda: analysis.layers(),
    "analysis.subspace_overlap(k)": lambda: analysis.subspace_overlap(3, reference_steps=(0,)),
    "analysis.ggn(k)": lambda: analysis.ggn(3),
    "analysis.slq(*, num_probes, num_steps, deflate)": lambda: analysis.slq(
        num_probes=2, num_steps=8, deflate=True),
    "analysis.trace(*, num_probes, deflate, diagonal, estimator)": lambda: analysis.trace(
        num_probes=4, diagonal=True),
    "analysis.dense_spectrum()": lambda: analysis.dense_spectrum(),
    "analysis.views.f_top_curve(ks)": lambda: analysis.views.f_top_curve((2, 4)),
    "analysis.views.block_spectra()": lambda: analysis.views.block_spectra(
        k=2, slq_probes=1, slq_steps=4),
    "analysis.views.adam_preconditioned(k)": lambda: analysis.views.adam_preconditioned(2),
    "analysis.loss_decrease(k, *, learning_rate, optimizer)":
        lambda: analysis.loss_decrease(2, learning_rate=0.1),
    "analysis.loss_landscape(k, *, num_top, num_bulk, num_random, radius, num_points, "
    "surfaces, normalization)": lambda: analysis.loss_landscape(2, num_points=3,
                                                                 surface_points=3),
    "analysis.class_mean_subspace(k, *, ggn=True)": lambda: analysis.class_mean_subspace(2),
    "analysis.galore_subspace(rank, *, refresh_every)": lambda: analysis.galore_subspace(2),
}


def _readme_table() -> dict[str, set[str]]:
    """The README's record-key table: row label -> the keys named outside parentheses."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    start = text.index("| transform | record keys |")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        label, keys = [cell.strip() for cell in line.strip("|").split("|")[:2]]
        outside = re.sub(r"\([^)]*\)", "", keys)
        rows[label.strip("`")] = set(re.findall(r"`([^`]+)`", outside))
    return rows


def test_the_readme_lists_every_builtins_record_keys():
    rows = _readme_table()
    assert set(rows) == set(BUILTINS) | {"the analyzer (every record)"}, sorted(rows)
    for label, make in BUILTINS.items():
        assert rows[label] == set(make().records), label
    assert rows["the analyzer (every record)"] == set(transforms_lib.RESERVED_KEYS)


def _problem():
    ds = data.gaussian_mixture(num_classes=3, dim=4, num_examples=90, sigma=0.5, seed=1)
    k1, k2 = jax.random.split(jax.random.key(3))
    params = {"dense_0": {"w": jax.random.normal(k1, (4, 5)) / 2, "b": jnp.zeros(5)},
              "dense_1": {"w": jax.random.normal(k2, (5, 3)) / 2, "b": jnp.zeros(3)}}

    def outputs(p, batch):
        return jnp.tanh(batch["x"] @ p["dense_0"]["w"] + p["dense_0"]["b"]) @ p["dense_1"]["w"] \
            + p["dense_1"]["b"]

    def output_loss(logits, batch):
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    def loss_fn(p, batch):
        return output_loss(outputs(p, batch), batch)

    return {"x": ds["x"], "y": ds["y"]}, params, loss_fn, outputs, output_loss


def test_every_builtin_writes_exactly_the_keys_it_declares():
    ds, params, loss_fn, outputs, output_loss = _problem()
    chain = analysis.chain(*(make() for make in BUILTINS.values()))
    analyzer = analysis.Analyzer(chain, loss_fn, data=ds, batch_size=45,
                                 results=analysis.Results(progress=False),
                                 operator=analysis.Operator(output_fn=outputs,
                                                            output_loss=output_loss))
    opt = optax.adam(1e-2)
    state = opt.init(params)
    _, state = opt.update(jax.tree_util.tree_map(jnp.ones_like, params), state, params)
    written = set()
    for step, p in ((0, params), (1, jax.tree_util.tree_map(lambda x: 1.1 * x, params))):
        record = analyzer.process(step, p, extras={"optimizer": state})
        assert record["status"] == "ok", record.get("reason")
        written |= set(record)
    declared = chain.record_keys()
    reserved = set(transforms_lib.RESERVED_KEYS)
    undeclared = {k for k in written - reserved
                  if transforms_lib.key_clash(k, declared) is None}
    assert not undeclared, undeclared
    # Every declared key is written by some checkpoint, but those that depend on options
    # not used here (a block, a basis cap, the tracker, a test set; Adam before its first step).
    optional = {"block_grad_norm", "max_basis", "tracker_hvps", "tracker_converged",
                "test_loss", "adam_skipped"}
    assert set(declared) - written - optional == set(), set(declared) - written - optional


def test_chain_refuses_more_vectors_than_eigenpairs_computes():
    five = analysis.eigenpairs(k=5)
    cases = [
        (analysis.f_top(k=10), r"'f_top' uses 10 vectors of 'eigenpairs', but transform "
                               r"'eigenpairs' computes 5; ask it for at least 10"),
        (analysis.c2(6), r"'c2' uses 6 vectors"),
        (analysis.subspace_overlap(6), r"'subspace_overlap' uses 6 vectors"),
        (analysis.subspace_overlap(2, dims=(1, 7)), r"'subspace_overlap' uses 7 vectors"),
        (analysis.views.f_top_curve((2, 8)), r"'f_top_curve' uses 8 vectors"),
        (analysis.ggn(6), r"'ggn' uses 6 vectors"),
    ]
    for t, match in cases:
        with pytest.raises(ValueError, match=match):
            analysis.chain(analysis.gradient(), five, t)
    # What fits is accepted; the paper's 2k pairs for a top-k analysis.
    analysis.chain(analysis.gradient(), analysis.eigenpairs(k=10), analysis.f_top(k=5),
                   analysis.c2(10), analysis.subspace_overlap(5, dims=range(1, 11)),
                   analysis.views.f_top_curve((5, 10)))
    # A user's transform declares what it uses, and is checked the same way.
    mine = analysis.transform("f_top8", lambda ctx: 0.0, requires=("gradient", "eigenpairs"),
                              needs={"eigenpairs": 8})
    with pytest.raises(ValueError, match="'f_top8' uses 8 vectors"):
        analysis.chain(analysis.gradient(), five, mine)
    with pytest.raises(ValueError, match=r"`needs\[.eigenpairs.\]` must be an int >= 1"):
        analysis.transform("x", lambda ctx: 0.0, needs={"eigenpairs": 0})


def test_chain_refuses_declared_record_key_clashes():
    with pytest.raises(ValueError, match=r"'f_top_b' writes the record key 'f_top', which "
                                         r"transform 'f_top' writes too"):
        analysis.chain(analysis.gradient(), analysis.eigenpairs(k=4), analysis.f_top(k=2),
                       analysis.f_top(k=1, name="f_top_b"))
    # A family: loss(metrics_fn) writes train_* and test_*.
    mine = analysis.transform("acc", lambda ctx: {"train_accuracy": 1.0},
                              records=("train_accuracy",))
    with pytest.raises(ValueError, match=r"'train_accuracy', which transform 'loss' writes too "
                                         r"\('train_\*'\)"):
        analysis.chain(analysis.loss(lambda p, b: {"loss": 0.0}), mine)
    with pytest.raises(ValueError, match="'seconds', which the analyzer writes"):
        analysis.chain(analysis.transform("t", lambda ctx: {"seconds": 1.0},
                                          records=("seconds",)))
    # Two eigenpairs with their own names: their keys are prefixed, no clash.
    analysis.chain(analysis.eigenpairs(k=3), analysis.eigenpairs(k=3, name="last",
                                                                 block="dense_1"))
    # record_fields may not shadow a transform's key either.
    ds, _, loss_fn, _, _ = _problem()
    with pytest.raises(ValueError, match=r"`record_fields`: 'grad_norm' is a record key "
                                         r"transform 'gradient' writes"):
        analysis.Analyzer(analysis.gradient(), loss_fn, data=ds,
                          results=analysis.Results(record_fields={"grad_norm": 1}))


def test_key_clash_of_keys_and_families():
    clash = transforms_lib.key_clash
    assert clash("train_loss", ["train_*"]) == "train_*"
    assert clash("train_*", ["train_loss"]) == "train_loss"
    assert clash("train_*", ["train_x*"]) == "train_x*"
    assert clash("f_top", ["f_top_bound", "f_next"]) is None
    assert clash("test", ["train_*"]) is None


def test_a_non_finite_output_fails_the_record_and_an_infinite_bound_does_not(tmp_path):
    """An Inf loss with a finite gradient was stored as "ok" with train_loss null."""
    ds, params, loss_fn, _, _ = _problem()

    def inf_loss(p, batch):  # infinite value, finite gradient
        return loss_fn(p, batch) + jax.lax.stop_gradient(jnp.inf)

    analyzer = analysis.Analyzer(analysis.chain(analysis.loss(), analysis.gradient()), inf_loss,
                                 data=ds,
                                 results=analysis.Results(str(tmp_path / "a"), progress=False))
    record = analyzer.process(0, params)
    assert record["status"] == "failed"
    assert "non-finite values" in record["reason"] and "train_loss" in record["reason"]
    nan = analysis.transform("nan", lambda ctx: {"x": {"y": np.array([1.0, np.nan])}})
    record = analysis.Analyzer(nan, loss_fn, data=ds, results=analysis.Results(progress=False)
                               ).process(0, params)
    assert record["status"] == "failed" and "x/y" in record["reason"]
    bound = analysis.transform("bound", lambda ctx: {"top_bound": np.inf, "n": 1.0})
    record = analysis.Analyzer(bound, loss_fn, data=ds, results=analysis.Results(progress=False)
                               ).process(0, params)
    assert record["status"] == "ok" and record["top_bound"] is None  # no bound: null


def test_at_steps_and_every_run_a_transform_at_chosen_checkpoints(tmp_path):
    """The one step filter: a gated transform outputs nothing at other checkpoints and keeps
    its state across them (a stateful counter counts only the steps it ran at); the gate is
    part of the settings (``run_at`` in pipeline.json)."""
    ds, params, loss_fn, _, _ = _problem()

    def counter(ctx, state):
        return {"runs": state + 1, "at": ctx.step}, state + 1

    def make(name):
        return analysis.transform(name, counter, init=lambda ctx: 0, records=("runs", "at"))

    for gated, chosen in ((analysis.at_steps(make("c"), [4, 1]), {1, 4}),
                          (analysis.at_steps(make("c"), 3), {3}),
                          (analysis.every(make("c"), 2), {0, 2, 4}),
                          (analysis.every(make("c"), 3, offset=1), {1, 4})):
        results = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
        analyzer = analysis.Analyzer(analysis.chain(gated), loss_fn, data=ds,
                                     results=analysis.Results(str(results), progress=False))
        records = analyzer.run(analysis.in_memory({s: params for s in range(6)}))
        ran = {r["step"]: r["runs"] for r in records if "runs" in r}
        assert set(ran) == chosen
        assert [ran[s] for s in sorted(ran)] == list(range(1, len(chosen) + 1))
        assert all(r["status"] == "ok" for r in records)
        with open(results / "pipeline.json") as f:
            described = json.load(f)["transforms"][0]["config"]["run_at"]
        assert described == gated.config["run_at"]
    # A gated transform keeps its declarations, so chain() still checks them.
    slq = analysis.at_steps(analysis.slq(num_probes=2, num_steps=8), (0,))
    assert slq.records == ("slq",) and slq.name == "slq"


def test_at_steps_and_every_refuse_bad_arguments():
    t = analysis.gradient()
    for bad, error, match in (((-1,), ValueError, "`steps entries` must be an int >= 0"),
                              ((1.5,), ValueError, "`steps entries`"),
                              ("10", TypeError, "`steps` must be a step or a sequence")):
        with pytest.raises(error, match=match):
            analysis.at_steps(t, bad)
    with pytest.raises(ValueError, match="`n` must be an int >= 1"):
        analysis.every(t, 0)
    with pytest.raises(ValueError, match=r"`offset` must be an int in \[0, 2\]"):
        analysis.every(t, 3, offset=3)
    with pytest.raises(ValueError, match="gated already"):
        analysis.every(analysis.at_steps(t, 3), 2)
    with pytest.raises(TypeError, match="gate each transform of a chain"):
        analysis.at_steps(analysis.chain(t), 3)
    with pytest.raises(TypeError, match="expected a Transform"):
        analysis.every(lambda ctx: 0, 2)


# Composition: requirements, order and state, through the Analyzer.


def test_chain_checks_requirements_and_names_before_any_work():
    with pytest.raises(ValueError, match="'f_top' requires 'gradient'.*analysis.gradient()"):
        analysis.chain(analysis.eigenpairs(k=4), analysis.f_top(k=2))
    with pytest.raises(ValueError, match="'f_top' requires 'eigenpairs'"):
        analysis.chain(analysis.gradient(), analysis.f_top(k=2), analysis.eigenpairs(k=4))
    with pytest.raises(ValueError, match="named 'gradient'"):
        analysis.chain(analysis.gradient(), analysis.gradient())
    with pytest.raises(ValueError, match="'mine' requires 'nothing_here'"):
        analysis.chain(analysis.transform("mine", lambda ctx: 1.0, requires=("nothing_here",)))
    with pytest.raises(TypeError, match="chain"):
        analysis.chain("f_top")
    with pytest.raises(ValueError, match="`k` must be an int >= 1"):
        analysis.eigenpairs(k=-3)
    # Nested chains flatten; a bare function of the context is a transform named after it.
    def norm_of_params(ctx):
        return {"param_norm": float(jnp.linalg.norm(flatten_util.ravel_pytree(ctx["params"])[0]))}
    pipe = analysis.chain(analysis.chain(analysis.loss(), analysis.gradient()), norm_of_params)
    assert pipe.names == ("loss", "gradient", "norm_of_params")


def test_order_is_respected_and_missing_entries_name_the_transform(tmp_path):
    model, ds, params, _ = tiny_problem()
    loss = tasks.cross_entropy_loss(model)
    seen = []

    def first(ctx):
        seen.append("first")
        return {"a": 1.0}

    def second(ctx):
        seen.append("second")
        return {"b": ctx["a"] + 1.0}  # reads what `first` put in the context

    analyzer = analysis.Analyzer(analysis.chain(first, second), loss, data=ds,
                                 results=analysis.Results(progress=False))
    record = analyzer.process(0, params)
    assert seen == ["first", "second"] and record["b"] == 2.0
    # A function that reads an entry nobody provides (and did not declare it): a clear error.
    sneaky = analysis.transform("sneaky", lambda ctx: ctx["eigenpairs"].eigenvalues[0])
    analyzer = analysis.Analyzer(analysis.chain(sneaky), loss, data=ds,
                                 results=analysis.Results(str(tmp_path / "r"), progress=False))
    with pytest.raises(analysis.MissingEntry, match="transform 'sneaky' asked for 'eigenpairs'"):
        analyzer.process(0, params)
    assert not (tmp_path / "r").exists()  # nothing was written


def test_a_stateful_user_transform_and_single_value_outputs():
    analysis_set, params = acceptance_problem()

    def count(ctx, state):
        return {"calls": int(state) + 1}, state + 1

    pipe = analysis.chain(
        analysis.transform("calls", count, init=lambda ctx: np.asarray(0)),
        analysis.transform("param_norm", lambda ctx: float(jnp.linalg.norm(ctx["params"]["w1"]))))
    analyzer = analysis.Analyzer(pipe, user_loss(0.0), data=analysis_set,
                                 results=analysis.Results(progress=False))
    records = [analyzer.process(t, params) for t in (0, 5, 9)]
    assert [r["calls"] for r in records] == [1, 2, 3]
    np.testing.assert_allclose(records[0]["param_norm"], float(jnp.linalg.norm(params["w1"])))
