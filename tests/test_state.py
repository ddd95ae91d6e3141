"""Transform state by name: ``analysis.state.named``/``rebuild`` round trips, a user's stateful
transform resumed from the store (a NamedTuple state keeps its type, a growing dict comes back
as it was), and a state that could not be restored by name is refused as a failed record."""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest

from hessian_subspace import analysis
from hessian_subspace.analysis import state as state_lib

from _pipeline import acceptance_problem, user_loss


class Running(NamedTuple):
    count: np.ndarray
    total: np.ndarray


def test_named_and_rebuild_round_trip():
    states = {"a": Running(np.asarray(2), np.ones(3)),
              "b": {"previous": {"step": np.asarray(4), "v": np.zeros((2, 5), np.float32)},
                    "references": {"0": {"v": np.ones((2, 5), np.float32)}}},
              "c": np.arange(4.0), "d": None}
    templates = {"a": Running(np.asarray(0), np.zeros(3)),
                 "b": {"previous": {"step": np.asarray(-1)}, "references": {}},
                 "c": np.zeros(4), "d": None}
    leaves = state_lib.named(states, templates)
    assert sorted(leaves) == ["a/count", "a/total", "b/previous/step", "b/previous/v",
                              "b/references/0/v", "c"]
    back = state_lib.rebuild(leaves, templates)
    assert isinstance(back["a"], Running) and int(back["a"].count) == 2
    np.testing.assert_array_equal(back["b"]["references"]["0"]["v"], np.ones((2, 5)))
    assert back["b"]["previous"]["v"].dtype == np.float32
    np.testing.assert_array_equal(back["c"], np.arange(4.0))
    assert back["d"] is None
    # The initial state of every transform when nothing was stored.
    initial = state_lib.rebuild({}, templates)
    assert all(initial[name] is templates[name] for name in templates)


def test_a_state_that_cannot_come_back_by_name_is_refused():
    with pytest.raises(analysis.checks.TransformContractError, match="'grows'.*nested dicts"):
        state_lib.named({"grows": [np.ones(2), np.ones(3)]}, {"grows": [np.ones(2)]})
    # Same structure as its init state: any pytree is fine.
    assert set(state_lib.named({"t": (np.ones(2),)}, {"t": (np.zeros(2),)})) == {"t/0"}


def _counting():
    """A user's stateful metrics: a NamedTuple running mean of the gradient norm, and a dict
    that grows by one entry per checkpoint."""

    def running(ctx, state):
        count, total = state.count + 1, state.total + ctx["grad_norm"]
        return {"mean_grad_norm": float(total / count)}, Running(count, total)

    def seen(ctx, state):
        state = dict(state, **{str(ctx.step): np.asarray(ctx["grad_norm"])})
        return {"steps_seen": len(state)}, state

    return analysis.chain(
        analysis.gradient(),
        analysis.transform("running", running, requires=("grad_norm",),
                           init=lambda ctx: Running(np.asarray(0), np.asarray(0.0))),
        analysis.transform("seen", seen, requires=("grad_norm",), init=lambda ctx: {}))


def test_a_users_state_is_resumed_from_the_store(tmp_path):
    data, params = acceptance_problem()
    loss = user_loss(1e-3)
    steps = {t: {k: v * (1 + 0.1 * t) for k, v in params.items()} for t in range(4)}

    def analyzer(directory):
        return analysis.Analyzer(_counting(), loss, data=data, batch_size=64,
                                 results=analysis.Results(str(directory), progress=False))

    whole = analyzer(tmp_path / "whole").run(analysis.in_memory(steps))
    first = analyzer(tmp_path / "split").run(analysis.in_memory({t: steps[t] for t in (0, 1)}))
    rest = analyzer(tmp_path / "split").run(analysis.in_memory(steps))  # a new process
    assert [r["step"] for r in first + rest] == [0, 1, 2, 3]
    for a, b in zip(whole, first + rest, strict=True):
        assert a["mean_grad_norm"] == b["mean_grad_norm"]
        assert a["steps_seen"] == b["steps_seen"] == a["step"] + 1
    assert rest[0]["state_from"]["step"] == 1 and rest[0]["state_from"]["values"] is True
    saved = analysis.ResultStore(str(tmp_path / "split")).state(3)
    assert set(saved) == {"running/count", "running/total", "seen/0", "seen/1", "seen/2", "seen/3"}
    np.testing.assert_allclose(saved["running/total"], sum(r["grad_norm"] for r in whole),
                               rtol=1e-6)


def test_a_state_the_store_cannot_name_fails_the_checkpoint():
    data, params = acceptance_problem()

    def grows(ctx, state):
        return {"n": len(state) + 1}, list(state) + [jnp.ones(2)]

    analyzer = analysis.Analyzer(
        analysis.chain(analysis.transform("grows", grows, init=lambda ctx: [])),
        user_loss(0.0), data=data, batch_size=64, results=analysis.Results(progress=False))
    record = analyzer.process(0, params)
    assert record["status"] == "failed" and "'grows'" in record["reason"]
    assert "nested dicts" in record["reason"]


def test_a_stored_output_may_not_take_the_state_folder():
    data, params = acceptance_problem()
    clash = analysis.transform("clash", lambda ctx: {"state": analysis.Stored(v=np.ones(2))})
    ctx = analysis.step.context(0, params, user_loss(0.0), data)
    with pytest.raises(analysis.checks.TransformContractError,
                       match="under 'state'.*directory keeps"):
        analysis.step.apply(analysis.chain(clash), ctx, {"clash": None})
    inside = analysis.transform("inside", lambda ctx: {"state/arrays": analysis.Stored(v=1)})
    with pytest.raises(analysis.checks.TransformContractError, match="not a plain folder name"):
        analysis.step.apply(analysis.chain(inside), ctx, {"inside": None})
    # A transform's name may not hold the separator of its state's names.
    with pytest.raises(ValueError, match="'ov/a' holds '/'"):
        analysis.chain(analysis.transform("ov/a", lambda ctx: 1.0))
    with pytest.raises(ValueError, match="ResultStore.state"):
        analysis.ResultStore("unused").stored("state", 0)
