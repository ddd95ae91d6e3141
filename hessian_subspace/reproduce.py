"""Reproduce the paper: experiments are named sets of runs (train, then analyse) plus the figures
and numbers made from their result files.

An experiment config (``launch/configs/paper.py``) has a ``kind`` (which figure or table), a
dict of ``runs`` (each a training config from :func:`experiment.default_config` with an
``analysis`` block of :class:`pipeline.Settings` fields) and ``plot`` options. Runs are stored
under ``ROOT/runs/NAME-HASH`` (HASH of the run's identity), so experiments that share a run
(Fig. 1, 2, 3, 6, 8 and 11 all use the FC net on MNIST) train and analyse it once; everything is
resumable. Figures go to ``ROOT/EXPERIMENT/*.png|pdf`` and the numbers to
``ROOT/EXPERIMENT/summary.json``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from typing import Callable

import ml_collections
import numpy as np
from absl import logging

from hessian_subspace import experiment, pipeline, plotting
from hessian_subspace import train as train_lib

ConfigDict = ml_collections.ConfigDict

ANALYSIS_DEFAULTS = dict(
    transforms=list(pipeline.DEFAULT_TRANSFORMS), k=None, lanczos_steps=None, tol=1e-3,
    block_size=1, dtype="float32", precision=None, batch_size=1000, num_minibatches=4,
    minibatch_size=64, reference_steps=[0, 10, 50, 100, 200, 500, 1000], warm_start=True,
    slq_steps=[], slq_probes=10, slq_lanczos_steps=80, dense_steps=[],
    dense_max_params=30000, seed=0,
    steps=None,  # analyse only these checkpoint steps (None: all)
    min_step=None,  # analyse only checkpoints at or after this step
    test_metrics=False,
)


def make_run(**fields) -> ConfigDict:
    """A run config: :func:`experiment.default_config` updated with ``fields`` (nested dicts
    are merged) and an ``analysis`` block."""
    config = experiment.default_config()
    config.analysis = ConfigDict(ANALYSIS_DEFAULTS)
    _merge(config, fields)
    return config


def _merge(config: ConfigDict, fields: dict) -> None:
    for key, value in fields.items():
        if key == "kwargs":  # model/data options are replaced as a whole, never merged
            config[key] = ConfigDict(dict(value))
        elif isinstance(value, dict) and key in config and isinstance(config[key], ConfigDict):
            _merge(config[key], value)
        else:
            config[key] = value


def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


# Analysis settings added after result directories existed. At their defaults they are left out
# of the directory name, so a rerun finds and resumes the analyses made before they existed.
_LATER_SETTINGS = ("curvature", "also_ggn", "block", "next_bound", "tracker", "tracker_blocks")


def analysis_identity(settings: pipeline.Settings) -> dict:
    """What names an analysis directory: the settings, less later additions at their defaults."""
    current, defaults = settings.to_json(), pipeline.Settings().to_json()
    return {k: v for k, v in current.items()
            if not (k in _LATER_SETTINGS and v == defaults[k])}


def _train_part(run: ConfigDict) -> ConfigDict:
    config = copy.deepcopy(run)
    del config["analysis"]
    return config


def settings_of(run: ConfigDict) -> pipeline.Settings:
    a = run.analysis
    fields = {f: a[f] for f in pipeline.Settings.__dataclass_fields__ if f in a}
    for f in ("transforms", "reference_steps", "slq_steps", "dense_steps"):
        fields[f] = tuple(fields[f])
    return pipeline.Settings(**fields)


# --------------------------------------------------------------------------------------------
# Overrides: offline data sets and smoke sizes.


def override_dataset(run: ConfigDict, dataset: str) -> ConfigDict:
    """The same run on another data set: "idx:DIR" (MNIST-format files, e.g. Fashion-MNIST),
    "gaussian_mixture" (§3's mixture with the run's number of classes and input size), or a
    tfds name. Regression runs (the sine task) keep their data."""
    run = copy.deepcopy(run)
    if run.task == "regression":
        return run
    image_runs = run.model.name in ("convnet", "resnet18", "small_convnet")
    if dataset == "gaussian_mixture":
        classes = 100 if run.data.name == "cifar100" else 10
        shape = (32, 32, 3) if run.data.name.startswith("cifar") else (28, 28, 1)
        run.data.name = "gaussian_mixture"
        run.data.kwargs = ConfigDict(dict(num_classes=classes, dim=int(np.prod(shape)),
                                          num_examples=10000, sigma=0.1, seed=run.seed))
        run.data.input_shape = shape if image_runs else None
    else:
        run.data.name = dataset
        run.data.input_shape = None
    return run


SMOKE_REFERENCE_STEPS = (0, 5, 10)


def smoke_plot(config: ConfigDict) -> ConfigDict:
    """An experiment's plot options at smoke size: reference steps t1 that a smoke run stores
    (the paper's t1 = 100, 200 lie beyond its 30 steps)."""
    config = copy.deepcopy(config)
    if "plot" in config and "t1" in config.plot:
        kept = [t for t in config.plot.t1 if t in SMOKE_REFERENCE_STEPS]
        config.plot.t1 = kept or list(SMOKE_REFERENCE_STEPS[:2])
    return config


def smoke(run: ConfigDict) -> ConfigDict:
    """A CPU-seconds version of a run: small data, few steps, small conv nets, loose solves."""
    run = copy.deepcopy(run)
    if run.data.name == "gaussian_mixture":
        run.data.kwargs.num_examples = 512
        shape = run.data.get("input_shape")
        small = None if not shape else (12, 12, tuple(shape)[-1])  # convnet needs >= 10
        run.data.kwargs.dim = int(np.prod(small)) if small else 64
        run.data.input_shape = small
    elif run.data.name != "sine":
        run.data.num_train = 512
    else:
        run.data.kwargs = ConfigDict(dict(num_examples=256))
    run.data.num_test = 256
    run.num_steps = 30
    run.batch_size = min(run.batch_size, 64)
    if run.optimizer.get("curvature_examples"):
        run.optimizer.curvature_examples = 128
        run.optimizer.curvature_batch_size = 128
    run.checkpoint_schedule = "1:10,5"
    run.log_every = 10
    if run.model.name == "convnet":
        run.model.kwargs.width = 0.125
    elif run.model.name == "resnet18":
        run.model.kwargs = ConfigDict(dict(width=2))
    elif run.model.name == "fc" and run.analysis.dense_steps:
        run.model.kwargs.hidden = (4, 4)  # a dense spectrum in seconds
    elif run.model.name == "fc" and max(run.model.kwargs.get("hidden", (0,)) or (0,)) > 64:
        run.model.kwargs.hidden = tuple(32 for _ in run.model.kwargs.hidden)
    a = run.analysis
    a.k = min(a.k or 10, 10)  # CIFAR-100 runs: 10, not 100, eigenpairs at smoke size
    a.lanczos_steps = None  # the default, 6 x 2k: the next-k pairs sit in the bulk
    run.data.num_analysis = 256
    a.batch_size = 256
    a.tol = 1e-2
    a.num_minibatches = 2
    a.reference_steps = list(SMOKE_REFERENCE_STEPS)
    a.slq_probes, a.slq_lanczos_steps = 2, 10
    a.steps = [0, 5, 10, 30]
    a.min_step = None if a.min_step is None else 10
    if run.model.name in ("convnet", "resnet18"):
        # XLA:CPU runs convolution gradients inside loops ~10-30x slower than outside
        # (jax-ml/jax#12868), and every HVP here is inside a loop: keep the solve tiny.
        run.data.num_analysis = 64
        a.batch_size = 64
        a.k, a.lanczos_steps = 2, 16
        a.num_minibatches = 1
        a.steps = [0, 30]
    a.slq_steps = [30] if a.slq_steps else []
    a.dense_steps = [30] if a.dense_steps else []
    return run


# --------------------------------------------------------------------------------------------
# Running.


class RunResult(dict):
    """``workdir``, ``results`` (directories), ``records`` and ``train_log`` of a run."""


def run_one(run: ConfigDict, root: str, name: str, *, progress: bool = True) -> RunResult:
    """Trains (or resumes) a run and analyses its checkpoints (skipping those done)."""
    train_config = _train_part(run)
    identity = experiment.config_to_json(train_config)
    identity = {k: v for k, v in identity.items() if k not in ("log_every",)}
    workdir = os.path.join(root, "runs", f"{name}-{_hash(identity)}")
    settings = settings_of(run)
    results = os.path.join(workdir, f"analysis-{_hash(analysis_identity(settings))}")
    start = time.perf_counter()
    logging.info("run %s: training in %s", name, workdir)
    experiment.train_from_config(train_config, workdir, progress=progress)
    train_seconds = time.perf_counter() - start
    a = run.analysis
    steps = None if a.steps is None else list(a.steps)
    if a.min_step is not None:
        from hessian_subspace import checkpoint as ckpt_lib
        available = ckpt_lib.list_steps(os.path.join(workdir, train_lib.CHECKPOINT_DIR))
        steps = [s for s in (steps or available) if s >= a.min_step]
    start = time.perf_counter()
    logging.info("run %s: analysing into %s", name, results)
    experiment.analyze_run(workdir, results, settings=settings, steps=steps,
                           num_analysis=run.data.num_analysis, test_metrics=a.test_metrics,
                           progress=progress)
    return RunResult(workdir=workdir, results=results,
                     records=pipeline.read_results(results),
                     train_log=train_lib.read_train_log(workdir),
                     train_seconds=round(train_seconds, 1),
                     analysis_seconds=round(time.perf_counter() - start, 1))


def run_experiment(config: ConfigDict, root: str, *, dataset: str | None = None,
                   smoke_size: bool = False, num_analysis: int | None = None,
                   only_runs=None, progress: bool = True) -> dict:
    """Runs every run of an experiment, then makes its figures and summary.

    Args:
      config: an experiment config (``launch/configs/paper.py``).
      root: output root; figures and ``summary.json`` go to ``root/NAME``.
      dataset: optional data set override for every run (see :func:`override_dataset`).
      smoke_size: shrink every run (see :func:`smoke`).
      num_analysis: override the analysis-set size of every classification run (the sine
        regression data keep theirs, as with ``dataset``).
      only_runs: run only these of the experiment's runs (the others are reported as not run).

    Returns:
      The summary dict (also written to ``summary.json``).
    """
    start = time.perf_counter()
    out_dir = os.path.join(root, config.name)
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    unknown = set(only_runs or ()) - set(config.runs)
    if unknown:
        raise ValueError(f"unknown runs {sorted(unknown)} for {config.name}: "
                         f"{sorted(config.runs)}")
    for name, run in config.runs.items():
        if only_runs and name not in only_runs:
            continue
        if dataset:
            run = override_dataset(run, dataset)
        if num_analysis is not None and run.task != "regression":
            # Like --dataset, not for the sine task: its 1,000 examples are all analysed.
            run = copy.deepcopy(run)
            run.data.num_analysis = num_analysis
        if smoke_size:
            run = smoke(run)
        results[name] = run_one(run, root, name, progress=progress)
    plot_config = smoke_plot(config) if smoke_size else config
    figures, numbers = KINDS[config.kind](plot_config, results, out_dir)
    summary = dict(
        experiment=config.name, description=config.description, kind=config.kind,
        dataset=dataset or "as configured", smoke=smoke_size,
        seconds=round(time.perf_counter() - start, 1),
        runs={name: dict(workdir=r["workdir"], results=r["results"],
                         train_seconds=r["train_seconds"],
                         analysis_seconds=r["analysis_seconds"],
                         checkpoints_analysed=len(r["records"]),
                         failed=[x["step"] for x in r["records"] if x.get("status") != "ok"])
              for name, r in results.items()},
        not_run=[n for n in config.runs if n not in results],
        figures=figures, numbers=numbers, paper=config.get("paper", {}).to_dict()
        if isinstance(config.get("paper"), ConfigDict) else config.get("paper", {}))
    pipeline.write_json(os.path.join(out_dir, "summary.json"), pipeline._to_jsonable(summary))
    return summary


# --------------------------------------------------------------------------------------------
# Figures and numbers per kind.


def _ok(records):
    return [r for r in records if r.get("status") == "ok"]


def _at(records, step, key):
    """Value of ``key`` at the analysed step closest to ``step`` (None past the last step)."""
    ok = [r for r in _ok(records) if r.get(key) is not None]
    if not ok or step > ok[-1]["step"]:
        return None
    best = min(ok, key=lambda r: abs(r["step"] - step))
    return dict(step=best["step"], value=best[key])


def _save(fig, out_dir, name) -> list[str]:
    import matplotlib.pyplot as plt
    paths = plotting.save(fig, os.path.join(out_dir, name))
    plt.close(fig)
    return [os.path.relpath(p, out_dir) for p in paths]


def _fig1(config, results, out_dir):
    figures, numbers = [], {}
    for name, r in results.items():
        figures += _save(plotting.fig1_ftop(r["records"], r["train_log"], title=name), out_dir,
                         f"fig1_{name}")
        ok = _ok(r["records"])
        if not ok:
            continue
        last = ok[-1]
        numbers[name] = dict(
            f_top_start=ok[0].get("f_top"),
            f_top_at={str(t): _at(ok, t, "f_top") for t in (10, 50, 100, 200, 500, 1000)},
            f_top_final=last.get("f_top"), f_top_minibatch_final=last.get(
                "f_top_minibatch_mean"),
            # Largest finite Ritz-residual error bar on f_top over the run, and the number of
            # checkpoints with no bound at all (no gap after the k-th Ritz value: stored as None).
            f_top_bound_max=max((x["f_top_bound"] for x in ok
                                 if x.get("f_top_bound") is not None), default=None),
            f_top_unbounded=sum(1 for x in ok
                                if x.get("f_top") is not None and x.get("f_top_bound") is None),
            train_loss_final=last.get("train_loss"),
            train_accuracy_final=last.get("train_accuracy"),
            eigenvalues_final=last.get("eigenvalues"),
            overlap_g_hg_final=last.get("overlap_g_hg"),
            all_converged=all(x.get("all_converged", False) for x in ok))
    return figures, numbers


def _table1(config, results, out_dir):
    rows, numbers = [], {}
    for name in config.runs:
        if name not in results:
            rows.append(dict(experiment=config.labels.get(name, name), ours=None,
                             paper=config.paper.get(name), steps="not run"))
            continue
        r = results[name]
        ok = [x for x in _ok(r["records"]) if x.get("overlap_g_hg") is not None]
        values = [x["overlap_g_hg"] for x in ok]
        paper = config.paper.get(name)
        row = dict(experiment=config.labels.get(name, name),
                   ours=float(np.mean(values)) if values else None,
                   std=float(np.std(values)) if values else None, paper=paper,
                   train_loss=float(np.mean([x["train_loss"] for x in ok]))
                   if ok and all("train_loss" in x for x in ok) else None,
                   steps=f"{ok[0]['step']}-{ok[-1]['step']} ({len(ok)} checkpoints)"
                   if ok else "none")
        rows.append(row)
        numbers[name] = dict(row, random_vertex=_random_vertex(ok))
    text = plotting.table1_markdown(rows)
    path = os.path.join(out_dir, "table1.md")
    pipeline._atomic_write(path, lambda f: f.write(text.encode()))
    return ["table1.md"], numbers


def _random_vertex(records):
    lam = [x.get("eigenvalues") for x in records if x.get("eigenvalues")]
    if not lam:
        return None
    from hessian_subspace import metrics
    return float(np.mean([float(metrics.random_vertex_overlap(np.asarray(v))) for v in lam]))


def _fig2(config, results, out_dir):
    (name, r), = results.items()
    t1s = list(config.plot.t1)
    fig = plotting.fig2_subspace_overlap(r["records"], t1s)
    numbers = {}
    ok = _ok(r["records"])
    k = ok[0]["k"] if ok else None
    for t1 in t1s:
        later = [x for x in ok if str(t1) in x.get("subspace_overlap", {})]
        if later:
            numbers[str(t1)] = dict(
                (str(x["step"] - t1), dict(top=x["subspace_overlap"][str(t1)].get(f"top{k}"),
                                           next=x["subspace_overlap"][str(t1)].get("next")))
                for x in later[:: max(1, len(later) // 6)])
    return _save(fig, out_dir, "fig2_subspace_overlap"), numbers


def _fig3(config, results, out_dir):
    (name, r), = results.items()
    figures, numbers = [], {}
    for t1 in config.plot.t1:
        figures += _save(plotting.fig3_overlap_vs_dim(r["records"], t1), out_dir,
                         f"fig3_overlap_vs_dim_t1_{t1}")
        ok = [x for x in _ok(r["records"]) if str(t1) in x.get("subspace_overlap", {})]
        if ok:
            dims = sorted({int(key[3:]) for x in ok for key in x["subspace_overlap"][str(t1)]
                           if key.startswith("top") and key[3:].isdigit()})
            numbers[str(t1)] = {str(d): float(np.mean([
                x["subspace_overlap"][str(t1)][f"top{d}"] for x in ok
                if f"top{d}" in x["subspace_overlap"][str(t1)]])) for d in dims}
    return figures, numbers


def _fig11(config, results, out_dir):
    (name, r), = results.items()
    steps = list(config.plot.steps)
    fig = plotting.fig11_eigenvector_overlaps(r["records"], steps)
    numbers = {}
    for t in steps:
        hit = _at(r["records"], t, "c2")
        if hit:
            c2 = np.asarray(hit["value"], float)
            k = len(c2) // 2
            numbers[str(t)] = dict(step=hit["step"], sum_top=float(c2[:k].sum()),
                                   sum_next=float(c2[k:].sum()))
    return _save(fig, out_dir, "fig11_eigenvector_overlaps"), numbers


def _fig12(config, results, out_dir):
    runs = {config.labels.get(n, n): r["records"] for n, r in results.items()}
    numbers = {}
    for n, r in results.items():
        ok = _ok(r["records"])
        if ok:
            numbers[config.labels.get(n, n)] = dict(
                f_top_final=ok[-1].get("f_top"),
                f_top_at={str(t): _at(ok, t, "f_top") for t in (10, 100, 500)})
    return _save(plotting.fig12_variants(runs), out_dir, "fig12_variants"), numbers


def _fig8(config, results, out_dir):
    (name, r), = results.items()
    figures = _save(plotting.fig8_lambda_max(r["records"]), out_dir, "fig8_lambda_max")
    figures += _save(plotting.eigenvalues_over_time(r["records"]), out_dir,
                     "fig8_top_eigenvalues")
    ok = _ok(r["records"])
    numbers = {str(x["step"]): x.get("lambda_max") for x in ok[:: max(1, len(ok) // 10)]}
    return figures, numbers


def _fig6(config, results, out_dir):
    (name, r), = results.items()
    store = pipeline.ResultStore(r["results"])
    vectors, slices, numbers = {}, None, {}
    for t in config.plot.steps:
        hit = _at(r["records"], t, "layer_slices")
        if not hit:
            continue
        step = hit["step"]
        basis = store.basis(step)
        if basis is None:
            continue
        vectors[step] = basis["eigenvectors"][0]
        slices = hit["value"]
        numbers[str(step)] = store.record(step).get("top_eigenvector_layer_mass")
    if not vectors:
        return [], numbers
    fig = plotting.fig6_eigenvector_anatomy(vectors, slices)
    return _save(fig, out_dir, "fig6_eigenvector_anatomy"), numbers


def _outliers(eigenvalues) -> int:
    """Number of outliers: position of the largest ratio between consecutive eigenvalues."""
    lam = np.sort(np.asarray([x for x in eigenvalues if x is not None], float))[::-1]
    lam = lam[lam > 0]
    if lam.size < 2:
        return int(lam.size)
    return int(np.argmax(lam[:-1] / lam[1:]) + 1)


def _spectrum(config, results, out_dir):
    figures, numbers = [], {}
    for name, r in results.items():
        store = pipeline.ResultStore(r["results"])
        for step in reversed(store.done_steps()):
            spec = store.spectrum(step)
            if spec is None:
                continue
            if "dense_eigenvalues" in spec:
                lam = spec["dense_eigenvalues"]
                figures += _save(plotting.fig4_dense_spectrum(lam, title=f"{name}, step {step}"),
                                 out_dir, f"fig4_dense_spectrum_{name}")
                numbers[f"{name}_dense"] = dict(
                    step=step, num=int(lam.size), top=np.sort(lam)[::-1][:12].round(5).tolist(),
                    outliers=_outliers(np.sort(lam)[::-1][:50]),
                    fraction_negative=float(np.mean(lam < 0)))
            if "slq_nodes" in spec:
                figures += _save(plotting.fig5_slq_density(spec["slq_nodes"],
                                                           spec["slq_weights"]),
                                 out_dir, f"fig5_slq_density_{name}")
                numbers[f"{name}_slq"] = dict(step=step, probes=int(spec["slq_nodes"].shape[0]))
            break
        ok = _ok(r["records"])
        if ok:
            lam = list(ok[-1].get("eigenvalues") or []) + list(ok[-1].get("next_eigenvalues")
                                                               or [])
            numbers[f"{name}_lanczos_top2k"] = dict(step=ok[-1]["step"], eigenvalues=lam,
                                                    outliers=_outliers(lam))
    return figures, numbers


def _labels(config, results, out_dir):
    figures, numbers = [], {}
    for name, r in results.items():
        figures += _save(plotting.eigenvalues_over_time(r["records"]), out_dir,
                         f"eigenvalues_{name}")
        ok = _ok(r["records"])
        if ok:
            last = ok[-1]
            lam = list(last.get("eigenvalues") or []) + list(last.get("next_eigenvalues") or [])
            numbers[name] = dict(step=last["step"], k=last["k"], eigenvalues=lam,
                                 outliers=_outliers(lam), f_top=last.get("f_top"),
                                 train_accuracy=last.get("train_accuracy"))
    return figures, numbers


def _optim(config, results, out_dir):
    """Training curves, f_top and lambda_max of runs that differ only in the optimizer, and
    whether Song et al.'s finding holds: Dom-SGD stalls while Bulk-SGD trains like SGD."""
    label = lambda n: config.labels.get(n, n)  # noqa: E731
    figures = _save(plotting.training_curves({label(n): r["train_log"]
                                              for n, r in results.items()},
                                             title=config.name), out_dir, "training_curves")
    figures += _save(plotting.fig12_variants({label(n): r["records"]
                                              for n, r in results.items()}), out_dir, "f_top")
    numbers = {}
    for n, r in results.items():
        checkpoints = [x for x in r["train_log"] if x.get("event") == "checkpoint"]
        ok = _ok(r["records"])
        numbers[n] = dict(
            test_loss_start=checkpoints[0].get("test_loss") if checkpoints else None,
            test_loss_final=checkpoints[-1].get("test_loss") if checkpoints else None,
            test_accuracy_final=checkpoints[-1].get("test_accuracy") if checkpoints else None,
            train_loss_final=ok[-1].get("train_loss") if ok else None,
            f_top_final=ok[-1].get("f_top") if ok else None,
            lambda_max_final=(ok[-1].get("eigenvalues") or [None])[0] if ok else None)
    if {"sgd", "dom_sgd", "bulk_sgd"} <= set(numbers):
        sgd, dom, bulk = (numbers[n] for n in ("sgd", "dom_sgd", "bulk_sgd"))
        if None not in (sgd["test_loss_start"], sgd["test_loss_final"], dom["test_loss_final"],
                        bulk["test_loss_final"]):
            drop = lambda x: sgd["test_loss_start"] - x  # noqa: E731
            numbers["song_et_al_2024"] = dict(
                claim="Dom-SGD stalls while Bulk-SGD trains",
                dom_fraction_of_sgd_loss_drop=drop(dom["test_loss_final"]) / drop(
                    sgd["test_loss_final"]),
                bulk_fraction_of_sgd_loss_drop=drop(bulk["test_loss_final"]) / drop(
                    sgd["test_loss_final"]),
                holds=bool(drop(dom["test_loss_final"]) < 0.2 * drop(sgd["test_loss_final"])
                           and drop(bulk["test_loss_final"]) > 0.8 * drop(
                               sgd["test_loss_final"])))
    return figures, numbers


KINDS: dict[str, Callable[[ConfigDict, dict, str], tuple[list, dict]]] = {
    "fig1": _fig1, "table1": _table1, "fig2": _fig2, "fig3": _fig3, "fig11": _fig11,
    "fig12": _fig12, "fig8": _fig8, "fig6": _fig6, "spectrum": _spectrum, "labels": _labels,
    "optim": _optim,
}


def summary_markdown(summary: dict) -> str:
    """A short human-readable digest of an experiment summary."""
    lines = [f"## {summary['experiment']}", "", summary.get("description", ""), "",
             f"data: {summary['dataset']}{' (smoke size)' if summary['smoke'] else ''}; "
             f"{summary['seconds']:.0f} s", ""]
    for fig in summary.get("figures", []):
        if fig.endswith(".png"):
            lines.append(f"![{fig}]({fig})")
    lines += ["", "```json", json.dumps(summary.get("numbers", {}), indent=1)[:4000], "```", ""]
    return "\n".join(lines)



def main_job(fig1_config: ConfigDict, root: str = "results", *, quick: bool = False,
             progress: bool = True) -> dict:
    """The toolkit's built-in default job (no network, a few minutes on a 2-core CPU).

    1. The paper's Fig. 1 experiment with the FC net, on §3's Gaussian mixture (10 classes,
       784 dimensions), checkpoints analysed on a fixed 2,000-example subset;
    2. the toy model of §3 against its analytic late-time solution (d = 200 here; the paper's
       d = 1000 is ``python -m launch.toy_model``);
    3. ``root/summary.md`` and ``root/summary.json``: final f_top, mean overlap(g, Hg), top
       eigenvalues, the toy model's errors and claims, and links to the figures.

    Args:
      fig1_config: the ``fig1_fc_mnist`` experiment config.
      root: output directory.
      quick: smoke sizes (seconds; for tests).
      progress: progress bars.
    """
    from hessian_subspace import toy_model

    start = time.perf_counter()
    exp = copy.deepcopy(fig1_config)
    exp.name = "fig1_gaussian_mixture"
    for name in list(exp.runs):
        run = override_dataset(exp.runs[name], "gaussian_mixture")
        run.checkpoint_schedule = "1:20,10:100,50"
        run.data.num_analysis = 2000
        exp.runs[name] = run
    fig1 = run_experiment(exp, root, smoke_size=quick, progress=progress)
    (run_name, numbers), = fig1["numbers"].items()
    records = _ok(pipeline.read_results(fig1["runs"][run_name]["results"]))
    overlaps = [r["overlap_g_hg"] for r in records[-5:] if r.get("overlap_g_hg") is not None]

    logging.info("toy model of §3 against its analytic solution")
    toy_dir = os.path.join(root, "toy_model")
    sizes = dict(dim=30, num_examples=120, measure_at=(0, 10, 100, 300)) if quick else dict(
        dim=200, num_examples=500, measure_at=(0, 1, 3, 10, 30, 100, 300, 1000, 3000))
    toy = toy_model.run_paper_configs(classes=(2, 5, 10), **sizes)
    pipeline.write_json(os.path.join(toy_dir, "toy_model.json"), toy)
    toy_fig = _save(plotting.toy_model_figure(toy), toy_dir, "toy_model")
    late = toy["analytic"]["comparison"][-1]
    summary = dict(
        seconds=round(time.perf_counter() - start, 1),
        fig1=dict(data="Gaussian mixture, 10 classes, " + (
            "d = 64, sigma = 0.1, n = 512 (quick)" if quick else
            "d = 784, sigma = 0.1, n = 10,000"),
                  model="FC 784-100-100-10, SGD lr 0.1, batch 64",
                  checkpoints=len(records), f_top_start=numbers.get("f_top_start"),
                  f_top_final=numbers.get("f_top_final"),
                  f_top_at=numbers.get("f_top_at"),
                  f_top_bound_max=numbers.get("f_top_bound_max"),
                  mean_overlap_g_hg_last5=float(np.mean(overlaps)) if overlaps else None,
                  top_eigenvalues_final=numbers.get("eigenvalues_final"),
                  train_accuracy_final=numbers.get("train_accuracy_final"),
                  figures=[os.path.join(exp.name, f) for f in fig1["figures"]]),
        toy_model=dict(config=toy["config"], late_time_vs_analytic=late,
                       claims={k: v.get("reproduced") for k, v in toy["claims"].items()
                               if isinstance(v, dict) and "claim" in v},
                       figures=[os.path.join("toy_model", f) for f in toy_fig]),
    )
    pipeline.write_json(os.path.join(root, "summary.json"), pipeline._to_jsonable(summary))
    text = _main_summary_markdown(summary)
    pipeline._atomic_write(os.path.join(root, "summary.md"), lambda f: f.write(text.encode()))
    return summary


def _main_summary_markdown(s: dict) -> str:
    f1, toy = s["fig1"], s["toy_model"]
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    lam = ", ".join(f"{x:.3g}" for x in (f1["top_eigenvalues_final"] or []))
    late = toy["late_time_vs_analytic"]
    bound = "n/a" if f1.get("f_top_bound_max") is None else f"{f1['f_top_bound_max']:.1e}"
    lines = [
        "# hessian_subspace: built-in default job", "",
        f"{s['seconds']:.0f} s. Fig. 1 of Gur-Ari et al. (2018) on {f1['data']}; "
        f"{f1['model']}; {f1['checkpoints']} checkpoints analysed.", "",
        f"- f_top (fraction of the gradient in the top-10 Hessian subspace): "
        f"{fmt(f1['f_top_start'])} at step 0 -> {fmt(f1['f_top_final'])} at the end "
        f"(largest error bar over the run, from the Ritz residuals: {bound})",
        f"- mean overlap(g, Hg) over the last 5 checkpoints: {fmt(f1['mean_overlap_g_hg_last5'])}",
        f"- top-10 Hessian eigenvalues at the end: {lam}",
        f"- train accuracy at the end: {fmt(f1['train_accuracy_final'])}", "",
        "Toy model (softmax regression on a Gaussian mixture, §3) against the analytic "
        f"late-time solution at eta*t = {late['eta_t']:.0f}: top eigenvalue relative error "
        f"{late['eigenvalue_rel_error']:.2e}, top-2 subspace overlap "
        f"{late['subspace_overlap']:.6f}, gradient cosine {late['gradient_cosine']:.6f}.",
        "Claims of §3 reproduced: " + ", ".join(f"{k}: {v}" for k, v in toy["claims"].items()),
        "",
    ]
    lines += [f"![{p}]({p})" for p in f1["figures"] + toy["figures"] if p.endswith(".png")]
    return "\n".join(lines) + "\n"
