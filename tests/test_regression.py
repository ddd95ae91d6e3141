"""The rebuilt pipeline against the records of the one it replaced.

``tests/fixtures/pipeline_v1`` holds what the pre-issue-9 ``Pipeline`` wrote (commit 7c2aa8c,
``make.py`` there) for six checkpoints of a 75-parameter MLP, in three analyses: the default
transform set in float32 with an SLQ density and a dense spectrum; float64 with the GGN beside
the Hessian and 2k + 1 pairs; the GGN on the last layer's block. The same settings through
:func:`analysis.presets.paper_chain` must give the same numbers to round-off.
"""

import json
import os

import jax
import numpy as np
import pytest

from hessian_subspace import analysis
from hessian_subspace.analysis import presets
from hessian_subspace.paper import models
from hessian_subspace.training import tasks

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "pipeline_v1")
STEPS = (0, 1, 2, 4, 8, 12)
ANALYSES = {
    "default_f32": dict(reference_steps=(0, 4), batch_size=50, num_minibatches=2,
                        minibatch_size=16, tol=1e-3, slq_steps=(12,), slq_probes=3,
                        slq_lanczos_steps=12, dense_steps=(12,),
                        transforms=presets.TRANSFORMS[:10]),  # the transforms it had then
    "ggn_also_f64": dict(dtype="float64", tol=1e-8, also_ggn=True, next_bound=True,
                         reference_steps=(0,), batch_size=50, num_minibatches=2,
                         minibatch_size=16),
    "ggn_block_f32": dict(curvature="ggn", block="dense_1", reference_steps=(0,),
                          batch_size=120, num_minibatches=0, tol=1e-3,
                          transforms=("loss", "gradient", "eigenpairs", "f_top",
                                      "overlap_g_hg", "c2", "layers", "subspace_overlap")),
}
# Keys of the old records that the new ones do not carry in the same form.
_NOT_COMPARED = {"settings", "config", "k", "next_eigenvalues", "seconds", "versions"}


def _problem():
    z = np.load(os.path.join(FIXTURE, "problem.npz"))
    params = {}
    for key in z.files:
        if key.startswith("params/"):
            _, step, layer, leaf = key.split("/")
            params.setdefault(int(step), {}).setdefault(layer, {})[leaf] = z[key]
    model = models.build_model("fc", num_outputs=3, hidden=(6,), activation="softplus")
    template = models.init_params(model, jax.random.key(0), z["x"][:1])
    shaped = {t: jax.tree_util.tree_map(lambda ref, flat: flat.reshape(ref.shape), template, p)
              for t, p in params.items()}
    return model, {"x": z["x"], "y": z["y"]}, shaped


def _assert_close(new, old, path, dtype):
    rtol, atol = (1e-12, 1e-14) if dtype == "float64" else (1e-6, 1e-8)
    if isinstance(old, dict):
        assert isinstance(new, dict) and set(old) <= set(new), (path, sorted(old), sorted(new))
        for key in old:
            _assert_close(new[key], old[key], f"{path}/{key}", dtype)
    elif isinstance(old, list) and old and isinstance(old[0], (str, list)) and \
            not isinstance(np.asarray(old, object).flat[0], (int, float)):
        assert new == old, path
    elif isinstance(old, (list, float, int)) and not isinstance(old, bool):
        np.testing.assert_allclose(np.asarray(new, float), np.asarray(old, float), rtol=rtol,
                                   atol=atol, err_msg=path)
    else:
        assert new == old, (path, new, old)


def _analyzer(model, data, settings, tmp_path):
    """The paper's chain for ``settings`` on the fixture's model, as the old Pipeline ran it."""
    return analysis.Analyzer(
        presets.paper_chain(settings, k=3,
                            metrics_fn=tasks.inference_metrics(model, "classification")),
        tasks.inference_loss(model, "classification"), data=data,
        output_fn=tasks.inference_outputs(model), output_loss=tasks.output_loss("classification"),
        results_dir=str(tmp_path), progress=False, **presets.analyzer_options(settings))


@pytest.mark.parametrize("name", sorted(ANALYSES))
def test_the_rebuilt_pipeline_reproduces_the_old_records(name, tmp_path):
    model, data, params = _problem()
    # The fixture was recorded by forward-over-reverse products; the cached linearisation
    # (default "auto") computes the same numbers in another order, compared within float32
    # round-off in tests/test_fast_paths.py. Here the old arithmetic, to the last bits.
    settings = presets.Settings(**ANALYSES[name], hvp_cache=False)
    analyzer = _analyzer(model, data, settings, tmp_path)
    with open(os.path.join(FIXTURE, f"records_{name}.json")) as f:
        old_records = json.load(f)
    for step, old in zip(STEPS, old_records, strict=True):
        new = analyzer.process(step, params[step], {})
        assert new["status"] == old["status"] == "ok"
        k = old["k"]
        lam = old["eigenvalues"] + old["next_eigenvalues"]
        _assert_close(new["eigenvalues"][:2 * k], lam, f"{name}/{step}/eigenvalues",
                      settings.dtype)
        for key in set(old) - _NOT_COMPARED - {"eigenvalues"}:
            assert key in new, (name, step, key)
            _assert_close(new[key], old[key], f"{name}/{step}/{key}", settings.dtype)
    if name == "default_f32":
        store = analysis.ResultStore(str(tmp_path))
        spectra = store.stored("spectra", 12)
        old_spectra = np.load(os.path.join(FIXTURE, "spectra_default_f32_step12.npz"))
        for key in ("slq_nodes", "slq_weights", "dense_eigenvalues"):
            np.testing.assert_allclose(spectra[key], old_spectra[key], rtol=2e-5, atol=1e-6)
        basis = store.stored("bases", 12)["eigenvectors"]
        old_basis = np.load(os.path.join(FIXTURE, "bases_default_f32_step12.npz"))["eigenvectors"]
        np.testing.assert_allclose(np.abs(basis @ old_basis.T), np.eye(6), atol=1e-4)


@pytest.mark.parametrize("name", ["default_f32", "ggn_also_f64"])
def test_the_cached_linearisation_reproduces_the_old_records_to_round_off(name, tmp_path):
    """The default operators linearise once per solve (issue 11): another order of the same
    operations, so the records agree to the dtype's round-off (residual-sized numbers near
    float32's rounding unit included, hence the absolute floor)."""
    model, data, params = _problem()
    settings = presets.Settings(**ANALYSES[name], hvp_cache=True)
    analyzer = _analyzer(model, data, settings, tmp_path)
    assert analyzer.settings["analyzer"]["hvp_cache"] is True
    rtol, atol = (1e-10, 1e-13) if settings.dtype == "float64" else (1e-4, 1e-6)
    with open(os.path.join(FIXTURE, f"records_{name}.json")) as f:
        old_records = json.load(f)
    for step, old in zip(STEPS, old_records, strict=True):
        new = analyzer.process(step, params[step], {})
        lam = old["eigenvalues"] + old["next_eigenvalues"]
        np.testing.assert_allclose(new["eigenvalues"][:2 * old["k"]], lam, rtol=rtol)
        for key in ("f_top", "f_next", "overlap_g_hg", "lambda_max", "c2"):
            if key in old:
                np.testing.assert_allclose(new[key], old[key], rtol=rtol, atol=atol,
                                           err_msg=f"{name}/{step}/{key}")
