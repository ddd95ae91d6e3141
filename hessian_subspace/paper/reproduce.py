"""Reproduce the paper: experiments are named sets of runs (train, then analyse) plus the figures
and numbers made from their result files.

An experiment config (``launch/configs/paper.py``) has a ``kind`` (which figure or table), a
dict of ``runs`` (each a training config from :func:`experiment.default_config` with an
``analysis`` block: :func:`hessian_subspace.analysis.config.default_config` plus which steps
to analyse) and ``plot``
options; :mod:`.summaries` turns a kind's results into figures and numbers. Runs are stored
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

import ml_collections
import numpy as np
from absl import logging

from hessian_subspace import _io, analysis
from hessian_subspace.analysis import config as analysis_config_lib
from hessian_subspace.paper import experiment, summaries
from hessian_subspace.paper import figures as plots
from hessian_subspace import checkpoints as ckpt_lib
from hessian_subspace.training import loop as train_lib

ConfigDict = ml_collections.ConfigDict

# The run's analysis block beyond the analysis config: which checkpoints, and how.
ANALYSIS_DRIVER = dict(
    steps=None,  # analyse only these checkpoint steps (None: all)
    min_step=None,  # analyse only checkpoints at or after this step
    test_metrics=False,
    live=False,  # analyse each checkpoint inside the training loop, as it is saved
)


def analysis_block() -> ConfigDict:
    """A run's ``analysis`` block: the analysis config (dense spectra up to 30,000
    parameters) and :data:`ANALYSIS_DRIVER`."""
    block = analysis_config_lib.default_config()
    block.dense_spectrum.max_params = 30000
    block.steps = ml_collections.config_dict.placeholder(tuple)
    block.min_step = ml_collections.config_dict.placeholder(int)
    block.test_metrics = False
    block.live = False
    return block


def make_run(**fields) -> ConfigDict:
    """A run config: :func:`experiment.default_config` updated with ``fields`` (nested dicts
    are merged) and an ``analysis`` block."""
    config = experiment.default_config()
    config.analysis = analysis_block()
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


def analysis_identity(analysis_config: ConfigDict) -> dict:
    """What names an analysis directory: every field of the analysis config and the store's
    layout version (results of an older pipeline are not mixed in)."""
    return dict(analysis_config_lib.to_json(analysis_config),
                layout=analysis.runner.LAYOUT_VERSION)


def _train_part(run: ConfigDict) -> ConfigDict:
    config = copy.deepcopy(run)
    del config["analysis"]
    return config


def analysis_config_of(run: ConfigDict) -> ConfigDict:
    """The analysis config of a run (its ``analysis`` block less the driver fields, with what
    the run decides filled in: :func:`experiment.with_run_settings`), checked: a
    ``ValueError`` naming the field."""
    block = run.analysis.to_dict()
    fields = {key: value for key, value in block.items()
              if key not in ANALYSIS_DRIVER and key != "refine"}
    return analysis_config_lib.validate(experiment.with_run_settings(
        analysis_config_lib.as_config(fields), run))


# --------------------------------------------------------------------------------------------
# Overrides: offline data sets and smoke sizes.


def override_dataset(run: ConfigDict, dataset: str) -> ConfigDict:
    """The same run on another data set: "idx:DIR" (MNIST-format files, e.g. Fashion-MNIST),
    "gaussian_mixture" (§3's mixture with the run's number of classes and input size), or a
    tfds name. Regression runs (the sine task) and language models (text) keep their data."""
    run = copy.deepcopy(run)
    if run.task == "regression" or run.data.name.startswith("text:"):
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
    full_batch = bool(run.data.num_train) and run.batch_size >= run.data.num_train
    if run.data.name == "gaussian_mixture":
        run.data.kwargs.num_examples = 512
        if run.data.num_train:  # a subset of the mixture's 512 examples
            run.data.num_train = min(run.data.num_train, 512)
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
    if full_batch:  # full-batch gradient descent stays full-batch, on 256 examples
        run.data.num_train = run.batch_size = 256
    if run.model.name == "convnet":
        run.model.kwargs.width = 0.125
    elif run.model.name == "resnet18":
        run.model.kwargs = ConfigDict(dict(width=2))
    elif run.model.name == "fc" and "dense_spectrum" in run.analysis.transforms:
        run.model.kwargs.hidden = (4, 4)  # a dense spectrum in seconds
    elif run.model.name == "fc" and max(run.model.kwargs.get("hidden", (0,)) or (0,)) > 64:
        run.model.kwargs.hidden = tuple(32 for _ in run.model.kwargs.hidden)
    a = run.analysis
    a.k = min(a.k or 10, 10)  # CIFAR-100 runs: 10, not 100, eigenpairs at smoke size
    a.eigenpairs.num_steps = None  # the default, 6 x 2k: the next-k pairs sit in the bulk
    run.data.num_analysis = 256
    a.operator.batch_size = 256
    for section in (a.eigenpairs, a.ggn, a.block_spectra, a.adam):
        section.tol = 1e-2
    a.f_top.num_minibatches = 2
    a.subspace_overlap.reference_steps = tuple(SMOKE_REFERENCE_STEPS)
    a.slq.num_probes, a.slq.num_steps = 2, 10
    a.steps = (0, 5, 10, 30)
    a.min_step = None if a.min_step is None else 10
    if run.model.name in ("convnet", "resnet18"):
        # XLA:CPU runs convolution gradients inside loops ~10-30x slower than outside
        # (jax-ml/jax#12868), and every HVP here is inside a loop: keep the solve tiny.
        run.data.num_analysis = 64
        a.operator.batch_size = 64
        a.k, a.eigenpairs.num_steps = 2, 16
        a.f_top.num_minibatches = 1
        a.steps = (0, 30)
    if run.model.name == "gpt":  # one block of width 16 on 16-byte contexts
        run.data.kwargs = ConfigDict(dict(context=16))
        run.model.kwargs = ConfigDict(dict(context=16, width=16, depth=1, heads=2))
        run.data.num_analysis = 64
        a.operator.batch_size = 64
        a.k = 4
        a.f_top_curve.ks = (2, 4)
        a.block_spectra.steps = (0, 30)
        a.block_spectra.slq_probes, a.block_spectra.slq_steps, a.adam.k = 2, 8, 2
        a.eigenpairs.memory_budget = None
        a.steps = (0, 10, 30)
    if "loss_decrease" in a.transforms:  # consecutive steps: ΔL of each is the next change
        a.steps = (*range(8), 10, 30)
    a.slq.steps = (30,) if a.slq.steps else ()
    a.dense_spectrum.steps = (30,) if a.dense_spectrum.steps else ()
    return run


# --------------------------------------------------------------------------------------------
# Running.


class RunResult(dict):
    """``workdir``, ``results`` (directories), ``records`` and ``train_log`` of a run."""


def run_one(run: ConfigDict, root: str, name: str, *, progress: bool = True,
            mesh=None) -> RunResult:
    """Trains (or resumes) a run and analyses its checkpoints (skipping those done), on
    ``mesh`` if given (training on this host's devices; the analysis on all of them)."""
    train_config = _train_part(run)
    identity = experiment.config_to_json(train_config)
    identity = {k: v for k, v in identity.items() if k not in ("log_every",)}
    workdir = os.path.join(root, "runs", f"{name}-{_hash(identity)}")
    acfg = analysis_config_of(run)
    results = os.path.join(workdir, f"analysis-{_hash(analysis_identity(acfg))}")
    start = time.perf_counter()
    logging.info("run %s: training in %s", name, workdir)
    train_mesh = mesh if mesh is None or mesh.is_fully_addressable else None
    a = run.analysis
    callbacks = []
    if a.get("live"):
        # The pipeline's hook in the training loop: each checkpoint is analysed when it is
        # saved (warm-started from the previous one); the offline pass below finds them done.
        loaded = experiment.load_data(train_config)
        live = experiment.analyzer_for(
            train_config, loaded["num_outputs"], loaded["analysis"], results,
            analysis_config=acfg, record_fields=dict(
                k=acfg.k or loaded["num_outputs"],
                config=experiment.config_to_json(train_config)), progress=False, mesh=mesh)
        if "loss_decrease" in analysis_config_lib.names(acfg):  # its step: state, next batch
            nxt = experiment.next_batches(train_config, loaded["train"])
            callbacks.append(lambda step, state: live(
                step, state.params, state.model_state,
                extras={"optimizer": state.opt_state, **nxt(step)}))
        else:
            callbacks.append(lambda step, state: live(step, state.params, state.model_state))
    experiment.train_from_config(train_config, workdir, progress=progress, mesh=train_mesh,
                                 callbacks=callbacks)
    train_seconds = time.perf_counter() - start
    steps = None if a.steps is None else list(a.steps)
    if a.min_step is not None:
        available = ckpt_lib.list_steps(os.path.join(workdir, train_lib.CHECKPOINT_DIR))
        steps = [s for s in (steps or available) if s >= a.min_step]
    start = time.perf_counter()
    logging.info("run %s: analysing into %s", name, results)
    experiment.analyze_run(workdir, results, analysis_config=acfg, steps=steps,
                           num_analysis=run.data.num_analysis, test_metrics=a.test_metrics,
                           progress=progress, mesh=mesh)
    if a.get("refine"):
        refine_checkpoints(train_config, workdir, results, analysis_config=acfg,
                           num_analysis=run.data.num_analysis, test_metrics=a.test_metrics,
                           progress=progress, mesh=mesh, **a.refine)
    return RunResult(workdir=workdir, results=results,
                     records=analysis.read_results(results),
                     train_log=train_lib.read_train_log(workdir),
                     train_seconds=round(train_seconds, 1),
                     analysis_seconds=round(time.perf_counter() - start, 1))


def refine_checkpoints(train_config: ConfigDict, workdir: str, results: str, *,
                       key: str = "f_top", threshold: float = 0.2, max_rounds: int = 6,
                       **analyze_kwargs) -> list[int]:
    """Adds checkpoints where a recorded quantity moves: between two analysed checkpoints
    whose ``key`` differs by more than ``threshold``, the run is trained again from the earlier
    one to the step halfway (bit-identical to the uninterrupted run: the batch order and the
    dropout keys are functions of the step), that checkpoint is added to the run and analysed;
    repeated (bisection) until no such pair is more than one step apart, or ``max_rounds``.

    Returns:
      The steps added.
    """
    import shutil
    import tempfile

    ckpt_dir = os.path.join(workdir, train_lib.CHECKPOINT_DIR)
    added: list[int] = []
    for _ in range(max_rounds):
        values = [(r["step"], r[key]) for r in summaries.ok_records(
            analysis.read_results(results)) if isinstance(r.get(key), (int, float))]
        mids = sorted({(a + b) // 2 for (a, x), (b, y) in zip(values[:-1], values[1:], strict=True)
                       if b - a > 1 and abs(y - x) > threshold})
        if not mids:
            break
        logging.info("%s moves by more than %g between checkpoints: adding steps %s", key,
                     threshold, mids)
        have = ckpt_lib.list_steps(ckpt_dir)
        for mid in mids:
            start = max(s for s in have if s < mid)
            with tempfile.TemporaryDirectory(dir=workdir, prefix=".refine-") as tmp:
                shutil.copytree(os.path.join(ckpt_dir, str(start)),
                                os.path.join(tmp, train_lib.CHECKPOINT_DIR, str(start)))
                config = copy.deepcopy(train_config)
                config.num_steps, config.checkpoint_schedule = mid, str(mid)
                experiment.train_from_config(config, tmp, progress=False)
                # Into the run under a name orbax does not list, then renamed (atomic).
                staging = os.path.join(ckpt_dir, f".refine-{mid}")
                shutil.copytree(os.path.join(tmp, train_lib.CHECKPOINT_DIR, str(mid)), staging)
                os.replace(staging, os.path.join(ckpt_dir, str(mid)))
        experiment.analyze_run(workdir, results, steps=mids, **analyze_kwargs)
        added += mids
    return sorted(added)


def check_seeds(seeds) -> list[int] | None:
    """``seeds`` as a list of distinct ints >= 0 (None: one run with the config's seed)."""
    if seeds is None:
        return None
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
        raise ValueError(f"`seeds` must be a sequence of ints, got {seeds!r}")
    out = []
    for s in seeds:
        try:
            value = int(s)
        except (TypeError, ValueError):
            raise ValueError(f"`seeds` must be ints >= 0, got {s!r}") from None
        if value < 0 or str(value) != str(s).strip():
            raise ValueError(f"`seeds` must be ints >= 0, got {s!r}")
        out.append(value)
    if not out or len(set(out)) != len(out):
        raise ValueError(f"`seeds` must be distinct and non-empty, got {list(seeds)}")
    return out


def with_seed(run: ConfigDict, seed: int) -> ConfigDict:
    """The run with another seed: initialisation, data order, label shuffles, the analysis
    subset, and the analysis's own randomness (start vectors, mini-batches)."""
    run = copy.deepcopy(run)
    run.seed = int(seed)
    run.analysis.operator.seed = int(seed)
    return run


def run_experiment(config: ConfigDict, root: str, *, dataset: str | None = None,
                   smoke_size: bool = False, num_analysis: int | None = None,
                   only_runs=None, progress: bool = True, mesh=None,
                   seeds=None) -> dict:
    """Runs every run of an experiment, then makes its figures and summary.

    Args:
      config: an experiment config (``launch/configs/paper.py``).
      root: output root; figures and ``summary.json`` go to ``root/NAME``.
      dataset: optional data set override for every run (see :func:`override_dataset`).
      smoke_size: shrink every run (see :func:`smoke`).
      num_analysis: override the analysis-set size of every classification run (the sine
        regression data keep theirs, as with ``dataset``).
      only_runs: run only these of the experiment's runs (the others are reported as not run).
      seeds: run every run once per seed (:func:`with_seed`); the figures and numbers then
        report the mean and spread over the seeds (:func:`hessian_subspace.analysis.
        aggregate_runs`). None: one run with the config's seed.

    Returns:
      The summary dict (also written to ``summary.json``).
    """
    start = time.perf_counter()
    seeds = check_seeds(seeds)
    unknown = set(only_runs or ()) - set(config.runs)
    if unknown:
        raise ValueError(f"unknown runs {sorted(unknown)} for {config.name}: "
                         f"{sorted(config.runs)}")
    out_dir = os.path.join(root, config.name)
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    for name in summaries.run_order(config):
        run = config.runs[name]
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
        if seeds is None:
            results[name] = run_one(run, root, name, progress=progress, mesh=mesh)
            continue
        per_seed = [run_one(with_seed(run, s), root, name, progress=progress, mesh=mesh)
                    for s in seeds]
        results[name] = RunResult(per_seed[0], seeds=seeds, seed_runs=per_seed)
    plot_config = smoke_plot(config) if smoke_size else config
    figures, numbers = summaries.KINDS[config.kind](plot_config, results, out_dir)
    summary = dict(
        experiment=config.name, description=config.description, kind=config.kind,
        dataset=dataset or "as configured", smoke=smoke_size,
        seconds=round(time.perf_counter() - start, 1),
        seeds=seeds,
        runs={name: _run_summary(r) for name, r in results.items()},
        not_run=[n for n in config.runs if n not in results],
        figures=figures, numbers=numbers, paper=config.get("paper", {}).to_dict()
        if isinstance(config.get("paper"), ConfigDict) else config.get("paper", {}))
    _io.write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary


def _run_summary(r: RunResult) -> dict:
    one = lambda x: dict(  # noqa: E731
        workdir=x["workdir"], results=x["results"], train_seconds=x["train_seconds"],
        analysis_seconds=x["analysis_seconds"], checkpoints_analysed=len(x["records"]),
        failed=[y["step"] for y in x["records"] if y.get("status") != "ok"])
    if "seed_runs" not in r:
        return one(r)
    return dict(one(r), seeds={str(s): one(x) for s, x in zip(r["seeds"], r["seed_runs"],
                                                              strict=True)})


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
    from hessian_subspace.paper import toy_claims

    start = time.perf_counter()
    exp = copy.deepcopy(fig1_config)
    exp.name = "fig1_gaussian_mixture"
    for name in list(exp.runs):
        run = override_dataset(exp.runs[name], "gaussian_mixture")
        # Every 10 steps until 300, and more where f_top moves by more than 0.2 between two
        # checkpoints: on the mixture it rises from 0.01 to 0.99 within ten steps near step
        # 200 (a checkpoint every 50 there missed the rise).
        run.checkpoint_schedule = "1:20,10:300,50"
        run.analysis.refine = dict(key="f_top", threshold=0.2, max_rounds=6)
        run.data.num_analysis = 2000
        exp.runs[name] = run
    fig1 = run_experiment(exp, root, smoke_size=quick, progress=progress)
    (run_name, numbers), = fig1["numbers"].items()
    records = summaries.ok_records(analysis.read_results(fig1["runs"][run_name]["results"]))
    overlaps = [r["overlap_g_hg"] for r in records[-5:] if r.get("overlap_g_hg") is not None]

    logging.info("toy model of §3 against its analytic solution")
    toy_dir = os.path.join(root, "toy_model")
    sizes = dict(dim=30, num_examples=120, measure_at=(0, 10, 100, 300)) if quick else dict(
        dim=200, num_examples=500, measure_at=(0, 1, 3, 10, 30, 100, 300, 1000, 3000))
    toy = toy_claims.run_paper_configs(classes=(2, 5, 10), **sizes)
    _io.write_json(os.path.join(toy_dir, "toy_model.json"), toy)
    toy_fig = summaries.save(plots.toy_model_figure(toy), toy_dir, "toy_model")
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
    _io.write_json(os.path.join(root, "summary.json"), summary)
    _io.write_text(os.path.join(root, "summary.md"), _main_summary_markdown(summary))
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
