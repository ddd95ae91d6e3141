"""Issue 12, bad input: cases that used to end in a deep JAX traceback, as a table of
input → error type and message fragment (the metrics' shape cases are in test_metrics.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hessian_subspace as hs


def _loss(p, batch):
    return jnp.mean((batch["x"] @ p["w"] - batch["y"]) ** 2)


_PARAMS = {"w": jnp.ones((3, 2))}
_DATA = {"x": jnp.asarray(np.random.default_rng(0).normal(size=(10, 3)), jnp.float32),
         "y": jnp.zeros((10, 2))}


def _op():
    return hs.dataset_hvp(_loss, _PARAMS, _DATA, batch_size=5)


_CASES = [
    ("hvp, loss not callable",
     lambda: hs.hvp(3.0, _PARAMS, _PARAMS, _DATA), TypeError, "`loss_fn` must be callable"),
    ("hvp, loss returns a vector",
     lambda: hs.hvp(lambda p, b: (b["x"] @ p["w"]).sum(1), _PARAMS, _PARAMS, _DATA),
     ValueError, "must return a scalar"),
    ("dataset_hvp, loss returns a vector",
     lambda: hs.dataset_hvp(lambda p, b: (b["x"] @ p["w"]).sum(1), _PARAMS, _DATA,
                            batch_size=5), ValueError, "must return a scalar"),
    ("top_eigenpairs, v0 of another tree",
     lambda: hs.top_eigenpairs(_op(), {"v": jnp.ones((3, 2))}, 2), ValueError,
     "`v0` must be shaped like the operator's vectors"),
    ("top_eigenpairs, flat v0 of another size for a pytree operator",
     lambda: hs.top_eigenpairs(_op(), jnp.ones(7), 2), ValueError,
     "hs.random_start_vector(key, op.like)"),
    ("lanczos, v0 of other shapes",
     lambda: hs.lanczos(_op(), {"w": jnp.ones((2, 3))}, 3), ValueError,
     "`v0` must be shaped like"),
]


@pytest.mark.parametrize("case, call, error, fragment", _CASES, ids=[c[0] for c in _CASES])
def test_bad_input_gets_a_clear_error(case, call, error, fragment):
    del case
    with pytest.raises(error, match=__import__("re").escape(fragment)):
        call()


def test_good_start_vectors_still_work():
    op = _op()
    v0 = hs.random_start_vector(jax.random.key(0), op.like)
    assert bool(np.all(hs.top_eigenpairs(op, v0, 2).converged))
    flat = hs.top_eigenpairs(lambda v: 2.0 * v, jnp.ones(6), 2)  # a flat operator: no `like`
    np.testing.assert_allclose(flat.eigenvalues, 2.0, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# The rest of issue 12's measured cases: data, keys, operators, metrics, models, training.

def _classifier():
    from hessian_subspace.paper import models
    from hessian_subspace.training import tasks

    model = models.build_model("fc", num_outputs=3, hidden=(4,))
    params, _ = tasks.init_variables(model, jax.random.key(0), jnp.ones((1, 5)))
    return model, params


def _analyzer(data, test_data=None, dtype="float32"):
    from hessian_subspace import analysis
    from hessian_subspace.training import tasks

    model, _ = _classifier()
    return analysis.Analyzer(
        [analysis.loss(), analysis.gradient()],
        tasks.inference_loss(model, "classification"), data=data, test_data=test_data,
        results=analysis.Results(progress=False),
        operator=analysis.Operator(dtype=dtype, output_fn=tasks.inference_outputs(model),
                                   output_loss=tasks.output_loss("classification")))


_X = np.random.default_rng(1).normal(size=(12, 5)).astype(np.float32)
_Y = np.arange(12, dtype=np.int32) % 3


def _process(data):
    _, params = _classifier()
    return _analyzer(data).process(0, params, {})


def _train(train_set):
    import optax

    from hessian_subspace.paper import models
    from hessian_subspace.training import loop

    import tempfile
    workdir = tempfile.mkdtemp()
    loop.train(model=models.build_model("fc", num_outputs=3, hidden=(4,)),
               task="classification", train_set=train_set, test_set=None,
               optimizer=optax.sgd(0.1), batch_size=4, num_steps=2, seed=0, workdir=workdir,
               progress=False)


_MORE_CASES = [
    ("analyzer, float labels", lambda: _process({"x": _X, "y": _Y.astype(np.float32)}),
     TypeError, "classification labels `y` must be integer class indices"),
    ("analyzer, wrong feature dimension", lambda: _process({"x": _X[:, :4], "y": _Y}),
     ValueError, "`loss_fn` cannot be evaluated on a batch of `data` (['x']: (12, 4)"),
    ("analyzer, batch without y", lambda: _process({"x": _X}),
     ValueError, "`loss_fn` cannot be evaluated on a batch of `data`"),
    ("analyzer, labels out of range", lambda: _process({"x": _X, "y": _Y + 1}),
     ValueError, "class indices in [0, 3)"),
    ("analyzer, uint8 images", lambda: _analyzer({"x": np.zeros((12, 5), np.uint8), "y": _Y}),
     TypeError, "`data['x']` holds uint8 values (raw image bytes?)"),
    ("analyzer, uint8 test images", lambda: _analyzer({"x": _X, "y": _Y}, test_data={
        "x": np.zeros((12, 5), np.uint8), "y": _Y}), TypeError, "`test_data['x']` holds uint8"),
    ("dataset_hvp, batch without y",
     lambda: hs.dataset_hvp(_loss, _PARAMS, {"x": _DATA["x"]}, batch_size=5), ValueError,
     "`loss_fn(params, batch)` fails on the batch"),
    ("dataset_hvp, wrong feature dimension",
     lambda: hs.dataset_hvp(_loss, _PARAMS, {"x": jnp.ones((10, 4)), "y": jnp.zeros((10, 2))},
                            batch_size=5), TypeError, "`loss_fn(params, batch)` fails"),
    ("random_start_vector, an int key", lambda: hs.random_start_vector(0, _PARAMS), TypeError,
     "`key` must be one JAX PRNG key"),
    ("top_eigenpairs, a batch of keys",
     lambda: hs.top_eigenpairs(_op(), hs.random_start_vector(jax.random.key(0), _PARAMS), 2,
                               key=jax.random.split(jax.random.key(0), 3)), TypeError,
     "`key` must be one JAX PRNG key"),
    ("slq, a float key",
     lambda: hs.slq_quadrature(_op(), jnp.ones(2), num_probes=2, num_steps=3), TypeError,
     "`key` must be one JAX PRNG key"),
    ("top_eigenpairs, operator returns the wrong shape",
     lambda: hs.top_eigenpairs(lambda v: jnp.ones(7), jnp.ones(6), 2), ValueError,
     "`matvec` must return a vector shaped like its input"),
    ("lanczos, operator returns another tree",
     lambda: hs.lanczos(lambda v: {"a": v}, jnp.ones(6), 3), ValueError,
     "`matvec` must return a vector shaped like its input"),
    ("gradient_fraction, zero gradient",
     lambda: hs.gradient_fraction(jnp.zeros(4), jnp.eye(4)[:2]), hs.UndefinedMetricError,
     "`g` is the zero vector"),
    ("hessian_gradient_overlap, zero Hg",
     lambda: hs.hessian_gradient_overlap(jnp.ones(4), jnp.zeros(4)), hs.UndefinedMetricError,
     "`hg` is the zero vector"),
    ("gradient_fraction, basis not orthonormal",
     lambda: hs.gradient_fraction(jnp.ones(4), 2.0 * jnp.eye(4)[:2]), ValueError,
     "`eigenvectors` must have orthonormal rows"),
    ("subspace_overlap, basis not orthonormal",
     lambda: hs.subspace_overlap(jnp.eye(4)[:2], jnp.ones((2, 4)) / 2), ValueError,
     "`basis_b` must have orthonormal rows"),
    ("model, uint8 images",
     lambda: _classifier()[0].apply({"params": _classifier()[1]}, np.zeros((2, 5), np.uint8)),
     TypeError, "MLP takes float inputs, got uint8"),
    ("train, uint8 images", lambda: _train({"x": np.zeros((8, 5), np.uint8), "y": _Y[:8]}),
     TypeError, "`train_set['x']` holds uint8 values"),
    ("train, float labels", lambda: _train({"x": _X, "y": _Y.astype(np.float32)}),
     TypeError, "classification labels must be integer class indices"),
    ("train, labels out of range", lambda: _train({"x": _X, "y": _Y + 5}),
     ValueError, "class indices in [0, 3) (the model has 3 outputs), found values in [5, 7]"),
    ("train, no labels", lambda: _train({"x": _X}), ValueError,
     "`train_set` must be a dict with inputs 'x' and targets 'y'"),
    ("model config, unknown initialiser",
     lambda: __import__("hessian_subspace.paper.models", fromlist=["x"]).build_model(
         "fc", num_outputs=3, initializer="xavier"), ValueError, "`initializer` must be one of"),
    ("training task, unknown",
     lambda: __import__("hessian_subspace.training.tasks", fromlist=["x"]).output_loss(
         "ranking"), ValueError, "`task`"),
    ("settings, k = 0", lambda: _settings(k=0), ValueError, "`config.k` must be an int >= 1"),
    ("settings, k = -3 says -3", lambda: _settings(k=-3), ValueError, "got -3"),
    ("settings, eigenpairs.num_steps = 0", lambda: _settings(eigenpairs=dict(num_steps=0)),
     ValueError, "config.eigenpairs: `num_steps` must be an int >= 1"),
    ("settings, a field the config lacks", lambda: _settings(eigenpairs=dict(nope=1)),
     ValueError, "`config.eigenpairs` has no field 'nope'"),
    ("settings, an unknown alias", lambda: _alias(lanczos=3), ValueError,
     "unknown analysis settings ['lanczos']"),
]


def _settings(**kw):
    from hessian_subspace.analysis import config as config_lib

    return config_lib.validate(kw)


def _alias(**flat):
    from hessian_subspace.analysis import config as config_lib

    return config_lib.apply_aliases(config_lib.default_config(), **flat)


@pytest.mark.parametrize("case, call, error, fragment", _MORE_CASES,
                         ids=[c[0] for c in _MORE_CASES])
def test_more_bad_input_gets_a_clear_error(case, call, error, fragment):
    del case
    with pytest.raises(error, match=__import__("re").escape(fragment)):
        call()


def test_float64_params_with_x64_off_warn_instead_of_a_silent_cast():
    params64 = {"w": np.ones((3, 2))}  # numpy float64
    with pytest.warns(UserWarning, match="`params` holds float64 arrays but jax_enable_x64"):
        hs.hvp(_loss, params64, params64, _DATA)
    with pytest.warns(UserWarning, match="`params` holds float64"):
        hs.dataset_hvp(_loss, params64, _DATA, batch_size=5)
    with jax.enable_x64(True):  # scoped float64: no warning, float64 out
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = hs.hvp(_loss, params64, params64, _DATA)
        assert out["w"].dtype == jnp.float64


def test_zero_gradient_fails_the_checkpoint_with_its_reason(tmp_path):
    from hessian_subspace import analysis

    # The loss is flat at w = 0 (quartic): g = 0 exactly, H = 0 too.
    loss = lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 4)  # noqa: E731
    analyzer = analysis.Analyzer(
        [analysis.gradient(), analysis.eigenpairs(2), analysis.f_top(1, num_minibatches=0)],
        loss, data={"x": _X}, results=str(tmp_path))
    record = analyzer.process(0, {"w": jnp.zeros(5)})
    assert record["status"] == "failed"
    assert "gradient is exactly zero" in record["reason"] and "f_top" in record["reason"]


def test_the_metrics_still_take_bases_at_float32_rounding():
    q = np.linalg.qr(np.random.default_rng(0).normal(size=(50, 5)))[0].T.astype(np.float32)
    g = jnp.ones(50)
    assert 0.0 <= float(hs.gradient_fraction(g, q)) <= 1.0
    # Under jit nothing is checked (values are not known): documented, NaN for g = 0.
    assert np.isnan(float(jax.jit(hs.gradient_fraction)(jnp.zeros(50), q)))


def test_the_analyzer_warns_on_float64_parameters_analysed_in_float32():
    """The core functions warn that JAX would cast float64 to float32; the analyzer casts to
    its `dtype` on purpose, and says so once (float64 analysis: dtype="float64")."""
    import warnings

    _, params = _classifier()
    params64 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
    analyzer = _analyzer({"x": _X, "y": _Y})
    with pytest.warns(UserWarning, match=r"`params` holds float64 arrays but the analysis runs "
                                         r"in float32 \(analysis.Operator\(dtype='float32'\)\)"):
        analyzer.process(0, params64, {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        analyzer.process(1, params64, {})  # once per analyzer
        _analyzer({"x": _X, "y": _Y}, dtype="float64").process(0, params64, {})
