"""Figs. 2, 3, 9-11: how the top subspace moves (eq. 5 across steps) and the gradient's overlap with
each eigenvector (c_i², eq. 12)."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from hessian_subspace.paper.figures import _common as _c
from hessian_subspace.paper.figures._common import Record


def seed_curve(seeds: Sequence[Sequence[Record]], t1: int, key: str) -> tuple:
    """``(t2 − t1, mean, std, min, max, n)`` of ``subspace_overlap[t1][key]`` over the runs of
    several seeds, at the t2 − t1 every run has."""
    return _c.stack_seeds([_c.overlap_table(_c.ok(r), t1, key) for r in seeds])


def fig2_subspace_overlap(records: Sequence[Record], t1_steps: Sequence[int],
                          k: int | None = None, *, log_x: bool = True,
                          seeds: Sequence[Sequence[Record]] | None = None,
                          title: str = "") -> Figure:
    """Paper Fig. 2: overlap (eq. 5) of the subspaces at t1 and t2 against t2 − t1.

    Panel (a): top-k subspaces (``subspace_overlap[t1]["top{k}"]``); panel (b): the "next k"
    subspaces, eigenvectors k+1…2k (``["next"]``), for at most three t1 (first, middle, last:
    these overlaps are noisy and more curves hide each other). One line per t1 in
    ``t1_steps`` that is a reference step of the records; others are ignored. The t2 − t1
    axis is logarithmic by default: the next-k overlaps fall within the first tens of steps,
    where a linear axis stacks every curve on top of the others.

    With ``seeds`` (the records of runs that differ only in their seed), each line is the mean
    over the seeds at the t2 − t1 they share, with a ±std band and dotted min–max lines.

    Args:
        records: pipeline records with ``subspace_overlap`` (ignored when ``seeds`` is given).
        t1_steps: reference steps t1.
        k: subspace dimension for panel (a); default the records' ``k``.
        log_x: log-scale t2 − t1 axis.
        seeds: optional records of each seed's run.
        title: figure title.

    Returns:
        Two axes (one if no record has a "next" overlap).

    Raises:
        ValueError: if none of ``t1_steps`` has an overlap in the records.
    """
    runs = [_c.ok(r) for r in seeds] if seeds else [_c.ok(records)]
    recs = runs[0]
    k = k or _c.record_k(recs)
    if k is None:
        raise ValueError("fig2_subspace_overlap: k not given and not found in the records.")
    present = set.intersection(*(_c.reference_steps(r) for r in runs))
    t1s = [int(t) for t in t1_steps if int(t) in present]

    def curve(t, key):
        return seed_curve(runs, t, key)

    curves_top = {t: curve(t, f"top{k}") for t in t1s}
    curves_next = {t: curve(t, "next") for t in t1s}
    curves_top = {t: c for t, c in curves_top.items() if c[0].size}
    curves_next = {t: c for t, c in curves_next.items() if c[0].size}
    if len(curves_next) > 3:  # the next-k overlaps are noisy: three t1 keep them readable
        keep = list(curves_next)
        keep = [keep[0], keep[len(keep) // 2], keep[-1]]
        curves_next = {t: curves_next[t] for t in keep}
    if not curves_top and not curves_next:
        raise ValueError(f"fig2_subspace_overlap: no overlap with any of t1 = {list(t1_steps)} "
                         f"(reference steps in the records: {sorted(present)}).")
    panels = [(curves_top, f"top-{k} subspaces")]
    if curves_next:
        panels.append((curves_next, f'"next {k}" subspaces (eigenvectors {k + 1}…{2 * k})'))
    fig, axes = _c.figure(1, len(panels), sharey=True)
    colors = dict(zip(t1s, _c.colors(len(t1s)), strict=True))
    for i, (curves, what) in enumerate(panels):
        ax = axes[0, i]
        for t, stats in curves.items():
            _c.draw_band(ax, *stats, color=colors[t], label=rf"$t_1 = {t}$",
                         marker="-o" if i == 0 else "-", minmax=i == 0)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(r"$t_2 - t_1$" + (" (log scale)" if log_x else ""))
        if log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        _c.panel_label(ax, i, what)
    axes[0, 0].set_ylabel("subspace overlap (eq. 5)")
    if len(runs) > 1:
        fig.supxlabel(f"mean of {len(runs)} seeds, band ± std; dotted in (a): min–max",
                      fontsize=8)
    # One legend for both panels, outside the data.
    handles = {}
    for ax in axes.ravel():
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside right center",
               fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def fig3_overlap_vs_dim(records: Sequence[Record], t1: int | Sequence[int],
                        dims: Sequence[int] | None = None, k: int | None = None) -> Figure:
    """Paper Fig. 3 / 9 / 10: overlap of top-d subspaces, averaged over t2 > t1, against d.

    For each reference step t1 the mean (error bars: standard deviation) over all records with
    t2 > t1 of ``subspace_overlap[t1]["top{d}"]`` is drawn against d, with a vertical line at
    d = k where the paper finds a kink.

    Args:
        records: pipeline records with ``subspace_overlap``.
        t1: a reference step, or several (one line each).
        dims: subspace dimensions; default every ``top{d}`` stored (2…2k).
        k: number of classes, for the vertical line; default the records' ``k``.

    Returns:
        One axes.

    Raises:
        ValueError: if no overlap with t1 is stored.
    """
    recs = _c.ok(records)
    k = k or _c.record_k(recs)
    t1s = [int(t1)] if np.ndim(t1) == 0 else [int(t) for t in t1]
    if dims is None:
        found = set()
        for r in recs:
            so = r.get("subspace_overlap")
            for t in t1s:
                if isinstance(so, Mapping) and isinstance(so.get(str(t)), Mapping):
                    found.update(int(key[3:]) for key in so[str(t)]
                                 if key.startswith("top") and key[3:].isdigit())
        dims = sorted(found)
    fig, axes = _c.figure(1, 1, width=4.8, height=3.4)
    ax = axes[0, 0]
    colors = _c.colors(len(t1s))
    drawn = []
    # Error bars of several t1 are dodged sideways so that they stay apart.
    offsets = np.linspace(-0.12, 0.12, len(t1s)) if len(t1s) > 1 else [0.0]
    for t, color, off in zip(t1s, colors, offsets, strict=True):
        ds, means, stds, counts = [], [], [], []
        for d in dims:
            _, v = _c.overlap_table(recs, t, f"top{d}")
            if v.size:
                ds.append(d), means.append(v.mean()), stds.append(v.std()), counts.append(v.size)
        if ds:
            n = max(counts)
            ax.errorbar(np.asarray(ds, float) + off, np.asarray(means), yerr=np.asarray(stds),
                        fmt="-o", ms=4, capsize=2, elinewidth=0.9, color=color,
                        label=rf"$t_1 = {t}$ ({n} steps $t_2 > t_1$)")
            drawn.append((t, n))
    if not drawn:
        raise ValueError(f"fig3_overlap_vs_dim: no subspace overlap stored for t1 = {t1s}.")
    if k:
        ax.axvline(k, color="0.4", ls="--", lw=1)
        ax.text(k, 0.02, f" d = k = {k}", color="0.3", fontsize=8, va="bottom")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("subspace dimension d")
    ax.set_ylabel(r"top-$d$ subspace overlap (eq. 5)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    if len(drawn) == 1:
        t, n = drawn[0]
        ax.set_title(rf"$t_1 = {t}$; mean $\pm$ sd over {n} steps $t_2 > t_1$", fontsize=10)
    else:
        ax.set_title(r"mean $\pm$ sd over $t_2 > t_1$", fontsize=10)
        fig.legend(loc="outside right center", fontsize=8, frameon=False)
        fig.set_figwidth(fig.get_figwidth() + 2.2)
    return fig


def fig11_eigenvector_overlaps(records: Sequence[Record], steps: Sequence[int], *,
                               log_y: bool = False, sharey: bool = True) -> Figure:
    """Paper Fig. 11: c_i² = (v_i · g)² / ‖g‖² (eq. 12) against i = 1…2k.

    One panel per requested step that has ``c2`` (others are skipped), bars for each i, a
    dashed line between i = k and k + 1, and the sums Σ_{i≤k} c_i² (= f_top) and
    Σ_{k<i≤2k} c_i² written in the panel.

    Args:
        records: pipeline records with ``c2`` (2k values) and ``k``.
        steps: steps to show (the paper: 0, 50, 100, 200).
        log_y: log-scale c_i² axis.
        sharey: one c_i² scale for all panels (as in the paper); False scales each panel to
            its own bars.

    Returns:
        One axes per step found, each with 2k bars (None entries are left out).

    Raises:
        ValueError: if none of ``steps`` has ``c2``.
    """
    by_step = {r["step"]: r for r in _c.ok(records) if isinstance(r.get("c2"), list) and r["c2"]}
    chosen = [s for s in steps if s in by_step]
    if not chosen:
        raise ValueError(f"fig11_eigenvector_overlaps: no record with 'c2' at steps "
                         f"{list(steps)} (have {sorted(by_step)}).")
    n = len(chosen)
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    fig, axes = _c.figure(nrows, ncols, width=3.3 * ncols, height=3.3 * nrows, sharey=sharey)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    for j, step in enumerate(chosen):
        ax = axes.ravel()[j]
        r = by_step[step]
        c2 = r["c2"]
        k = r.get("k") if isinstance(r.get("k"), int) else len(c2) // 2
        pts = [(i + 1, float(c)) for i, c in enumerate(c2) if _c.finite(c)]
        idx = np.array([i for i, _ in pts])
        val = np.array([c for _, c in pts])
        if idx.size:
            ax.bar(idx, val, color=np.where(idx <= k, "C0", "C1"), width=0.75)
        ax.axvline(k + 0.5, color="0.4", ls="--", lw=1)
        s_top = float(np.sum(val[idx <= k])) if idx.size else float("nan")
        s_next = float(np.sum(val[idx > k])) if idx.size else float("nan")
        ax.text(0.97, 0.96, rf"$\Sigma_{{i\leq {k}}}\, c_i^2 = {s_top:.3f}$" "\n"
                rf"$\Sigma_{{{k}<i\leq {2 * k}}}\, c_i^2 = {s_next:.3f}$",
                transform=ax.transAxes, ha="right", va="top", fontsize=8,
                bbox=dict(boxstyle="round", fc="white", ec="0.8", alpha=0.9))
        ax.set_xlim(0.4, len(c2) + 0.6)
        ax.set_xticks(range(1, len(c2) + 1) if len(c2) <= 12 else
                      range(2, len(c2) + 1, 2 if len(c2) <= 24 else 4))
        ax.set_xlabel("eigenvector index i")
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
        ax.set_title(f"step {step}", loc="left", fontsize=10)
        if j % ncols == 0 or not sharey:
            ax.set_ylabel(r"$c_i^2 = (v_i\cdot g)^2 / \|g\|^2$")
        if not log_y and not sharey:
            ax.set_ylim(0, 1.45 * max(float(val.max()) if val.size else 0.0, 1e-12))
    if not log_y and sharey:
        top = max((float(c) for s in chosen for c in by_step[s]["c2"] if _c.finite(c)), default=1.0)
        axes[0, 0].set_ylim(0, 1.45 * max(top, 1e-12))  # room for the sums' box
    return fig
