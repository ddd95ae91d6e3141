"""Figures and numbers of each kind of experiment, from the result files of its runs.

``KINDS[kind](config, results, out_dir) -> (figure files, numbers)``: ``results`` maps run names
to :class:`hessian_subspace.paper.reproduce.RunResult` (``records``, ``train_log``, ``results``
directory); figures go to ``out_dir``.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import ml_collections
import numpy as np

from hessian_subspace import _io, metrics
from hessian_subspace.analysis import aggregate as aggregate_lib
from hessian_subspace.analysis import store as store_lib
from hessian_subspace.paper import figures as plots

ConfigDict = ml_collections.ConfigDict


def top_and_next(record: dict) -> tuple[list, list]:
    """The top-k and next-k eigenvalues of a record (``k``: the record's, else half of them)."""
    lam = list(record.get("eigenvalues") or [])
    k = record.get("k") if isinstance(record.get("k"), int) else len(lam) // 2
    return lam[:k], lam[k:2 * k]



def ok_records(records):
    """The records with status "ok"."""
    return [r for r in records if r.get("status") == "ok"]


def _at(records, step, key):
    """Value of ``key`` at the analysed step closest to ``step`` (None past the last step)."""
    ok = [r for r in ok_records(records) if r.get(key) is not None]
    if not ok or step > ok[-1]["step"]:
        return None
    best = min(ok, key=lambda r: abs(r["step"] - step))
    return dict(step=best["step"], value=best[key])


def save(fig, out_dir, name, title: str | None = None) -> list[str]:
    """Writes the figure (PNG and PDF) under ``out_dir``; ``title`` (what was run: data,
    model, steps, seeds) becomes its suptitle, below any title it has."""
    import matplotlib.pyplot as plt
    if title:
        old = fig.get_suptitle()
        fig.suptitle(f"{old}\n{title}" if old and old not in title else title, fontsize=9)
    paths = plots.save(fig, os.path.join(out_dir, name))
    plt.close(fig)
    return [os.path.relpath(p, out_dir) for p in paths]


def _data_name(name: str) -> str:
    if name.startswith("idx:"):
        base = os.path.basename(os.path.normpath(name[4:]))
        return {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST"}.get(base, base)
    return {"mnist": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100",
            "gaussian_mixture": "Gaussian mixture", "sine": "sine regression"}.get(name, name)


def describe_run(r: dict) -> str:
    """One line naming what a run is: data set, model, optimizer, steps (and seeds), from the
    config its records carry; "" when they carry none."""
    config = next((x.get("config") for x in r.get("records", []) if isinstance(
        x.get("config"), dict)), None)
    if config is None:
        return ""
    data, model, opt = config.get("data", {}), config.get("model", {}), config.get(
        "optimizer", {})
    kwargs = model.get("kwargs") or {}
    name = model.get("name", "?")
    if name in ("fc", "fc_regression"):
        hidden = kwargs.get("hidden") or []
        net = f"FC {'-'.join(str(h) for h in hidden)} {kwargs.get('activation', 'relu')}"
    elif name == "softmax":
        net = "softmax regression"
    else:
        net = name
    if kwargs.get("initializer"):
        net += f", {kwargs['initializer']} init"
    labels = {"shuffle": ", random labels", "even_odd": ", even/odd labels"}.get(
        data.get("label_transform") or "", "")
    text = (f"{net} on {_data_name(data.get('name', '?'))}{labels}; "
            f"{str(opt.get('name', 'sgd')).upper()} lr {opt.get('learning_rate')}, "
            f"batch {config.get('batch_size')}, {config.get('num_steps')} steps")
    seeds = r.get("seeds")
    if seeds:
        text += f"; {len(seeds)} seeds ({', '.join(map(str, seeds))})"
    return text


def _seed_records(r: dict) -> list | None:
    """The records of each seed's run, or None for a single run."""
    return [x["records"] for x in r["seed_runs"]] if r.get("seed_runs") else None


def _over_seeds(r: dict, value) -> dict | None:
    """:func:`hessian_subspace.analysis.aggregate.summarize` of ``value(records)`` over the
    seeds (None for a single run), with the per-seed values."""
    per = _seed_records(r)
    if per is None:
        return None
    values = [value(ok_records(x)) for x in per]
    stats = aggregate_lib.summarize([v for v in values if v is not None])
    return None if stats is None else dict(stats, values=values)


def _fig1(config, results, out_dir):
    figures, numbers = [], {}
    for name, r in results.items():
        figures += save(plots.fig1_ftop(r["records"], r["train_log"],
                                        seeds=_seed_records(r)), out_dir, f"fig1_{name}",
                        describe_run(r) or name)
        ok = ok_records(r["records"])
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
            eigenvalues_final=top_and_next(last)[0],
            overlap_g_hg_final=last.get("overlap_g_hg"),
            all_converged=all(x.get("all_converged", False) for x in ok))
        if r.get("seed_runs"):
            final = lambda key: lambda rs: rs[-1].get(key) if rs else None  # noqa: E731
            numbers[name]["over_seeds"] = dict(
                seeds=r["seeds"], f_top_final=_over_seeds(r, final("f_top")),
                f_top_at={str(t): _over_seeds(r, lambda x, t=t: (_at(x, t, "f_top") or {}).get(
                    "value")) for t in (10, 50, 100, 200, 500, 1000)},
                train_accuracy_final=_over_seeds(r, final("train_accuracy")),
                overlap_g_hg_final=_over_seeds(r, final("overlap_g_hg")),
                f_top_bound_max=_over_seeds(r, lambda x: max(
                    (y["f_top_bound"] for y in x if y.get("f_top_bound") is not None),
                    default=None)))
    return figures, numbers


def run_order(config: ml_collections.ConfigDict) -> list[str]:
    """The experiment's run names in the paper's order (``config.order``; ConfigDict sorts
    its keys), then any others."""
    order = [n for n in (config.get("order") or []) if n in config.runs]
    return order + sorted(n for n in config.runs if n not in order)


def _table1(config, results, out_dir):
    rows, numbers = [], {}
    for name in run_order(config):
        if name not in results:
            rows.append(dict(experiment=config.labels.get(name, name), ours=None,
                             paper=config.paper.get(name), steps="not run"))
            continue
        r = results[name]
        ok = [x for x in ok_records(r["records"]) if x.get("overlap_g_hg") is not None]
        values = [x["overlap_g_hg"] for x in ok]
        paper = config.paper.get(name)
        row = dict(experiment=config.labels.get(name, name),
                   ours=float(np.mean(values)) if values else None,
                   std=float(np.std(values)) if values else None, paper=paper,
                   train_loss=float(np.mean([x["train_loss"] for x in ok]))
                   if ok and all("train_loss" in x for x in ok) else None,
                   steps=f"{ok[0]['step']}-{ok[-1]['step']} ({len(ok)} checkpoints)"
                   if ok else "none")
        if r.get("seed_runs"):
            # Mean over seeds of each seed's mean over its checkpoints; the spread is over
            # seeds (the within-run std over checkpoints is kept beside it).
            def run_mean(x):
                v = [y["overlap_g_hg"] for y in x if y.get("overlap_g_hg") is not None]
                return float(np.mean(v)) if v else None

            stats = _over_seeds(r, run_mean)
            if stats is not None:
                row.update(ours=stats["mean"], std=stats["std"], min=stats["min"],
                           max=stats["max"], seeds=len(stats["values"]),
                           per_seed=stats["values"], std_over_checkpoints=row["std"])
        rows.append(row)
        numbers[name] = dict(row, random_vertex=_random_vertex(ok))
    _io.write_text(os.path.join(out_dir, "table1.md"), plots.table1_markdown(rows))
    return ["table1.md"], numbers


def _random_vertex(records):
    lam = [x.get("eigenvalues") for x in records if x.get("eigenvalues")]
    if not lam:
        return None
    return float(np.mean([float(metrics.random_vertex_overlap(np.asarray(v))) for v in lam]))


def _fig2(config, results, out_dir):
    (name, r), = results.items()
    t1s = list(config.plot.t1)
    fig = plots.fig2_subspace_overlap(r["records"], t1s, seeds=_seed_records(r))
    numbers = {}
    ok = ok_records(r["records"])
    k = ok[0].get("k") if ok else None
    for t1 in t1s:
        later = [x for x in ok if str(t1) in x.get("subspace_overlap", {})]
        if later:
            numbers[str(t1)] = dict(
                (str(x["step"] - t1), dict(top=x["subspace_overlap"][str(t1)].get(f"top{k}"),
                                           next=x["subspace_overlap"][str(t1)].get("next")))
                for x in later[:: max(1, len(later) // 6)])
    if r.get("seed_runs"):
        numbers["over_seeds"] = {}
        for t1 in t1s:
            for key, label in ((f"top{k}", "top"), ("next", "next")):
                dt, mean, std, lo, hi, n = plots.seed_curve(_seed_records(r), t1, key)
                for i in range(0, dt.size, max(1, dt.size // 6)):
                    numbers["over_seeds"].setdefault(str(t1), {}).setdefault(
                        str(int(dt[i])), {})[label] = dict(mean=float(mean[i]),
                                                           std=float(std[i]), min=float(lo[i]),
                                                           max=float(hi[i]), n=n)
    return save(fig, out_dir, "fig2_subspace_overlap", describe_run(r)), numbers


def _fig3(config, results, out_dir):
    (name, r), = results.items()
    figures, numbers = [], {}
    for t1 in config.plot.t1:
        figures += save(plots.fig3_overlap_vs_dim(r["records"], t1), out_dir,
                        f"fig3_overlap_vs_dim_t1_{t1}", describe_run(r))
        ok = [x for x in ok_records(r["records"]) if str(t1) in x.get("subspace_overlap", {})]
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
    fig = plots.fig11_eigenvector_overlaps(r["records"], steps)
    numbers = {}
    for t in steps:
        hit = _at(r["records"], t, "c2")
        if hit:
            c2 = np.asarray(hit["value"], float)
            k = len(c2) // 2
            numbers[str(t)] = dict(step=hit["step"], sum_top=float(c2[:k].sum()),
                                   sum_next=float(c2[k:].sum()))
    return save(fig, out_dir, "fig11_eigenvector_overlaps", describe_run(r)), numbers


def _fig12(config, results, out_dir):
    runs = {config.labels.get(n, n): r["records"] for n, r in results.items()}
    numbers = {}
    for n, r in results.items():
        ok = ok_records(r["records"])
        if ok:
            numbers[config.labels.get(n, n)] = dict(
                f_top_final=ok[-1].get("f_top"),
                f_top_at={str(t): _at(ok, t, "f_top") for t in (10, 100, 500)})
    base = describe_run(next(iter(results.values()))) if results else ""
    return save(plots.fig12_variants(runs), out_dir, "fig12_variants",
                f"variants of: {base}" if base else None), numbers


def _fig8(config, results, out_dir):
    (name, r), = results.items()
    figures = save(plots.fig8_lambda_max(r["records"]), out_dir, "fig8_lambda_max",
                   describe_run(r))
    figures += save(plots.eigenvalues_over_time(r["records"]), out_dir,
                    "fig8_top_eigenvalues", describe_run(r))
    ok = ok_records(r["records"])
    numbers = {str(x["step"]): x.get("lambda_max") for x in ok[:: max(1, len(ok) // 10)]}
    return figures, numbers


def _fig6(config, results, out_dir):
    (name, r), = results.items()
    store = store_lib.ResultStore(r["results"])
    vectors, slices, numbers = {}, None, {}
    for t in config.plot.steps:
        hit = _at(r["records"], t, "layer_slices")
        if not hit:
            continue
        step = hit["step"]
        state = store.state(step, "eigenpairs/eigenvectors")
        if not state:
            continue
        vectors[step] = state["eigenpairs/eigenvectors"][0]
        slices = hit["value"]
        numbers[str(step)] = store.record(step).get("top_eigenvector_layer_mass")
    if not vectors:
        return [], numbers
    fig = plots.fig6_eigenvector_anatomy(vectors, slices)
    return save(fig, out_dir, "fig6_eigenvector_anatomy", describe_run(r)), numbers


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
        store = store_lib.ResultStore(r["results"])
        for step in reversed(store.steps("ok")):
            spec = store.stored("spectra", step)
            if spec is None:
                continue
            if "dense_eigenvalues" in spec:
                lam = spec["dense_eigenvalues"]
                figures += save(plots.fig4_dense_spectrum(lam, title=f"{name}, step {step}"),
                                out_dir, f"fig4_dense_spectrum_{name}", describe_run(r))
                numbers[f"{name}_dense"] = dict(
                    step=step, num=int(lam.size), top=np.sort(lam)[::-1][:12].round(5).tolist(),
                    outliers=_outliers(np.sort(lam)[::-1][:50]),
                    fraction_negative=float(np.mean(lam < 0)))
            if "slq_nodes" in spec:
                figures += save(plots.fig5_slq_density(spec["slq_nodes"],
                                                           spec["slq_weights"]),
                                out_dir, f"fig5_slq_density_{name}", describe_run(r))
                numbers[f"{name}_slq"] = dict(step=step, probes=int(spec["slq_nodes"].shape[0]))
            break
        ok = ok_records(r["records"])
        if ok:
            lam = sum(top_and_next(ok[-1]), [])
            numbers[f"{name}_lanczos_top2k"] = dict(step=ok[-1]["step"], eigenvalues=lam,
                                                    outliers=_outliers(lam))
    return figures, numbers


def _labels(config, results, out_dir):
    figures, numbers = [], {}
    for name, r in results.items():
        figures += save(plots.eigenvalues_over_time(r["records"]), out_dir,
                        f"eigenvalues_{name}", describe_run(r))
        ok = ok_records(r["records"])
        if ok:
            last = ok[-1]
            lam = sum(top_and_next(last), [])
            numbers[name] = dict(step=last["step"], k=last.get("k"), eigenvalues=lam,
                                 outliers=_outliers(lam), f_top=last.get("f_top"),
                                 train_accuracy=last.get("train_accuracy"))
    return figures, numbers


def _optim(config, results, out_dir):
    """Training curves, f_top and lambda_max of runs that differ only in the optimizer, and
    whether Song et al.'s finding holds: Dom-SGD stalls while Bulk-SGD trains like SGD."""
    label = lambda n: config.labels.get(n, n)  # noqa: E731
    figures = save(plots.training_curves({label(n): r["train_log"]
                                              for n, r in results.items()},
                                             title=config.name), out_dir, "training_curves")
    figures += save(plots.fig12_variants({label(n): r["records"]
                                              for n, r in results.items()}), out_dir, "f_top")
    numbers = {}
    for n, r in results.items():
        checkpoints = [x for x in r["train_log"] if x.get("event") == "checkpoint"]
        ok = ok_records(r["records"])
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


def _transformer(config, results, out_dir):
    """The transformer experiment: f_top against k, per-block spectra, Adam's geometry."""
    (name, r), = results.items()
    ok = ok_records(r["records"])
    figures, numbers = [], {}
    lr = None
    if ok and isinstance(ok[-1].get("config"), dict):
        lr = ok[-1]["config"].get("optimizer", {}).get("learning_rate")
    for make, file in ((lambda: plots.transformer.f_top_vs_k(ok, title=name), "f_top_vs_k"),
                       (lambda: plots.transformer.adam_sharpness(ok, lr, title=name),
                        "adam_sharpness")):
        try:
            figures += save(make(), out_dir, file)
        except ValueError as e:  # a transform the (smoke) analysis did not run
            numbers[f"{file}_skipped"] = str(e)
    with_blocks = [x for x in ok if isinstance(x.get("block_spectra"), dict)]
    if with_blocks:
        last = with_blocks[-1]
        stored = store_lib.ResultStore(r["results"]).stored("block_slq", last["step"]) or {}
        densities = {b: (stored[f"{b}.nodes"], stored[f"{b}.weights"])
                     for b in last["block_spectra"] if f"{b}.nodes" in stored}
        figures += save(plots.transformer.block_spectra(with_blocks, densities, title=name),
                        out_dir, "block_spectra")
        numbers["block_top_eigenvalue"] = {
            b: (v.get("eigenvalues") or [None])[0] for b, v in last["block_spectra"].items()}
        numbers["block_spectra_step"] = last["step"]
    if ok:
        last = ok[-1]
        numbers.update(
            steps=[x["step"] for x in ok], train_loss_start=ok[0].get("train_loss"),
            train_loss_final=last.get("train_loss"), f_top_final=last.get("f_top"),
            f_top_at_final=last.get("f_top_at"), k_saturation_final=last.get("k_saturation"),
            k_saturation=[x.get("k_saturation") for x in ok],
            lambda_max=[(x.get("eigenvalues") or [None])[0] for x in ok],
            adam_lambda_max=[(x.get("adam_eigenvalues") or [None])[0] for x in ok],
            adam_f_top=[x.get("adam_f_top") for x in ok],
            all_converged=all(x.get("all_converged", False) for x in ok))
    return figures, numbers


def _sharpness(config, results, out_dir):
    """Full-batch GD at several step sizes: λ_max against 2/η, the loss, and f_top."""
    runs, numbers = {}, {}
    for name in run_order(config):
        if name not in results:
            continue
        r = results[name]
        ok = ok_records(r["records"])
        lr = (ok[0].get("config") or {}).get("optimizer", {}).get("learning_rate") if ok \
            else None
        if lr is None:
            continue
        runs[config.labels.get(name, name)] = (r["records"], float(lr))
        numbers[name] = dict(learning_rate=float(lr),
                             **plots.sharpness.sharpness_numbers(r["records"], float(lr)))
    if not runs:
        return [], numbers
    first = next(iter(results.values()))
    config_json = next(x["config"] for x in ok_records(first["records"]) if "config" in x)
    title = (f"{describe_run(first).split('; ')[0]}; full-batch GD on "
             f"{config_json.get('batch_size')} examples, {config_json.get('num_steps')} steps")
    figures = save(plots.sharpness.edge_of_stability(runs), out_dir, "edge_of_stability", title)
    return figures, numbers


def decrease_numbers(records) -> dict:
    """What ``loss_decrease`` says over a run: per analysed step the three loss changes, and
    over all steps (and the second half of the run) the bulk's share of the total decrease,
    Σ bulk / Σ (top + bulk), how often the top part alone increased the loss, and the mean
    fraction of the step's squared norm in the top subspace."""
    kind = plots.directions.update_kind(records)
    if kind is None:
        return {}
    entries = [(r["step"], r["loss_decrease"][kind]) for r in ok_records(records)
               if isinstance((r.get("loss_decrease") or {}).get(kind), dict)]
    last = entries[-1][0] if entries else 0

    def over(part):
        top = sum(e["top"] for _, e in part)
        bulk = sum(e["bulk"] for _, e in part)
        return dict(checkpoints=len(part), full=sum(e["full"] for _, e in part), top=top,
                    bulk=bulk, bulk_share=bulk / (top + bulk) if top + bulk else None,
                    top_increases_loss=sum(e["top"] > e["roundoff"] for _, e in part),
                    top_fraction_mean=float(np.mean([e["top_fraction"] for _, e in part
                                                     if e["top_fraction"] is not None]))
                    if part else None)

    # Maximal runs of >= 10 consecutive analysed steps (an even number): every step summed, so
    # Σ full is the loss change over the window when the step is the run's own.
    windows = []
    run: list = []
    for item in entries + [(None, None)]:
        if run and item[0] == run[-1][0] + 1:
            run.append(item)
            continue
        run = run[:len(run) - len(run) % 2]  # even: a period-2 oscillation sums to ~0
        if len(run) >= 10:
            windows.append(dict(start=run[0][0], stop=run[-1][0] + 1, **over(run),
                                loss_start=run[0][1]["loss"]))
        run = [item] if item[0] is not None else []
    return dict(update=kind, steps=[s for s, _ in entries], windows=windows,
                full=[e["full"] for _, e in entries], top=[e["top"] for _, e in entries],
                bulk=[e["bulk"] for _, e in entries],
                bulk_share=[e["bulk_share"] for _, e in entries],
                all_steps=over(entries),
                second_half=over([x for x in entries if x[0] >= last / 2]))


def _loss_decrease(config, results, out_dir):
    """Where the loss decreases: the step's top-k and bulk parts over training, per run."""
    runs, numbers = {}, {}
    for name in run_order(config):
        if name not in results:
            continue
        r = results[name]
        label = config.labels.get(name, name)
        desc = describe_run(r)
        runs[label] = r["records"]
        numbers[name] = dict(run=desc, **decrease_numbers(r["records"]))
    if not runs:
        return [], numbers
    lines = [f"{config.labels.get(n, n)}: {describe_run(results[n])}" for n in results]
    figures = save(plots.directions.loss_decrease(runs), out_dir, "loss_decrease",
                   "Where the loss decreases: ΔL of one step u and of its top-k and bulk "
                   "parts (exact, analysis set)\n" + "\n".join(lines))
    return figures, numbers


def _landscape(config, results, out_dir):
    """Loss slices and surfaces along top, bulk, random and gradient directions."""
    figures, numbers = [], {}
    for name in run_order(config):
        if name not in results:
            continue
        r = results[name]
        ok = [x for x in ok_records(r["records"]) if isinstance(x.get("loss_landscape"), dict)]
        store = store_lib.ResultStore(r["results"])
        surfaces = {x["step"]: store.stored("loss_landscape_surfaces", x["step"]) or {}
                    for x in ok}
        if not ok:
            continue
        figures += save(plots.directions.landscape(ok, surfaces), out_dir,
                        f"loss_landscape_{name}", describe_run(r))
        numbers[name] = {str(x["step"]): {
            d: dict(curvature=s["curvature"], curvature_fd=s["curvature_fd"],
                    change_at_radius=max(s["change"][0], s["change"][-1]))
            for d, s in x["loss_landscape"]["slices"].items()} for x in ok}
    return figures, numbers


def _classes(config, results, out_dir):
    """Why k: Papyan's class/cross-class parts and the class-mean gradients against the top-k
    Hessian and Gauss-Newton subspaces."""
    runs, numbers, lines = {}, {}, []
    for name in run_order(config):
        if name not in results:
            continue
        r = results[name]
        ok = [x for x in ok_records(r["records"])
              if isinstance(x.get("class_mean_subspace"), dict)]
        if not ok:
            continue
        label = config.labels.get(name, name)
        runs[label] = ok
        lines.append(f"{label}: {describe_run(r)}")
        numbers[name] = {str(x["step"]): dict(
            hessian_top=(x.get("eigenvalues") or [])[:2 * int(x.get("k") or 1)],
            **{f"{m}_captured": {s: v["captured"] for s, v in x["class_mean_subspace"]
                                 .get(m, {}).items()} for m in ("hessian", "ggn")},
            class_means_G1=x["class_mean_subspace"]["eigenvalues"].get("G1"),
            cross_class_G2_top=(x["class_mean_subspace"]["eigenvalues"].get("G2") or [])[:4],
            ggn_top=x["class_mean_subspace"].get("ggn_eigenvalues")) for x in ok}
    if not runs:
        return [], numbers
    figures = save(plots.structure.class_structure(runs), out_dir, "class_mean_subspace",
                   "Why k: the top-k subspace against the class structure (Papyan)\n"
                   + "\n".join(lines))
    return figures, numbers


def _galore(config, results, out_dir):
    """GaLore's gradient projectors against the Hessian's diagonal blocks."""
    runs, numbers, lines = {}, {}, []
    for name in run_order(config):
        if name not in results:
            continue
        r = results[name]
        ok = [x for x in ok_records(r["records"]) if isinstance(x.get("galore_subspace"), dict)]
        if not ok:
            continue
        label = config.labels.get(name, name)
        runs[label] = ok
        lines.append(f"{label}: {describe_run(r)}")
        numbers[name] = {str(x["step"]): dict(
            mean=x["galore_subspace"]["mean"],
            layers={n: {k: e.get(k) for k in ("captured", "captured_random", "side_overlap",
                                              "gradient_energy", "block_f_top")}
                    | ({"stale_overlap": e["stale"]["overlap"],
                        "stale_steps": e["stale"]["steps"]} if "stale" in e else {})
                    for n, e in x["galore_subspace"]["layers"].items()}) for x in ok}
    if not runs:
        return [], numbers
    figures = save(plots.structure.galore(runs), out_dir, "galore_subspace",
                   "GaLore's gradient subspace against the Hessian's diagonal blocks\n"
                   + "\n".join(lines))
    return figures, numbers


KINDS: dict[str, Callable[[ConfigDict, dict, str], tuple[list, dict]]] = {
    "fig1": _fig1, "table1": _table1, "fig2": _fig2, "fig3": _fig3, "fig11": _fig11,
    "fig12": _fig12, "fig8": _fig8, "fig6": _fig6, "spectrum": _spectrum, "labels": _labels,
    "optim": _optim, "transformer": _transformer, "sharpness": _sharpness,
    "loss_decrease": _loss_decrease, "landscape": _landscape, "classes": _classes,
    "galore": _galore,
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



