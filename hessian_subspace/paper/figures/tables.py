"""Table 1 as markdown, and the toy model's figure (§3)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from hessian_subspace.paper.figures import _common as _c


def _fmt(x, digits: int) -> str:
    return f"{float(x):.{digits}f}" if _c.finite(x) else "—"


def table1_markdown(rows: Sequence[Mapping[str, Any]], *, digits: int = 2) -> str:
    """Paper Table 1 as markdown: mean overlap(g, Hg) (eq. 3), ours against the paper's.

    Args:
        rows: dicts with ``"experiment"``, ``"ours"``, ``"paper"`` and optionally ``"std"``
            (written as ``ours ± std``), ``"seeds"``, ``"min"``, ``"max"`` (over seeds: the
            header says so and a min–max column is added), ``"train_loss"`` (mean full-data
            train loss over the same checkpoints: a run that did not train shows here) and
            ``"steps"`` (columns added when any row has them).
            Missing or non-finite numbers print as "—".
        digits: decimals.

    Returns:
        The table, one line per row after the header, ending with a newline.

    Example:
        >>> print(table1_markdown([dict(experiment="MNIST Softmax", ours=0.9612, paper=0.96,
        ...                             std=0.012)]), end="")
        | Experiment | ours | paper |
        |---|---|---|
        | MNIST Softmax | 0.96 ± 0.01 | 0.96 |
    """
    with_steps = any(r.get("steps") is not None for r in rows)
    with_loss = any(r.get("train_loss") is not None for r in rows)
    seeds = {r.get("seeds") for r in rows if r.get("seeds")}
    ours_header = (f"ours (mean ± std over {'/'.join(map(str, sorted(seeds)))} seeds)"
                   if seeds else "ours")
    header = ([("Experiment"), ours_header, "paper"] + (["min–max"] if seeds else [])
              + (["train loss"] if with_loss else []) + (["steps"] if with_steps else []))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        ours = _fmt(r.get("ours"), digits)
        if _c.finite(r.get("ours")) and _c.finite(r.get("std")):
            ours += f" ± {_fmt(r['std'], digits)}"
        cells = [str(r.get("experiment", "")).replace("|", r"\|"), ours,
                 _fmt(r.get("paper"), digits)]
        if seeds:
            cells.append(f"{_fmt(r.get('min'), digits)}–{_fmt(r.get('max'), digits)}"
                         if _c.finite(r.get("min")) else "—")
        if with_loss:
            cells.append(_fmt(r.get("train_loss"), 3))
        if with_steps:
            st = r.get("steps")
            cells.append("—" if st is None else str(st))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def toy_model_figure(results: Mapping[str, Any]) -> Figure:
    """The toy model of §3 against its analytic late-time solution (App. E).

    Panels: (a) the top Hessian eigenvalue times ηt (analytic: 1) and the subspace overlap of
    the numerical top-2 eigenvectors with (μ₁, −μ₁), (μ₂, −μ₂), for k = 2, σ = 0, no bias;
    (b) f_top against ηt for every run (k, σ, biases); (c) the top eigenvalues at the last step,
    relative to the largest, for every run (biases: k − 1 large and one smaller).

    Args:
        results: the dict of :func:`hessian_subspace.paper.toy_claims.run_paper_configs` (or
            its JSON).

    Returns:
        A figure with three axes.
    """
    analytic = results["analytic"]
    recs = [r for r in analytic["records"] if r.get("eta_t")]
    comp = {c["step"]: c for c in analytic.get("comparison", [])}
    fig, axes = _c.figure(1, 3, width=13.5, height=3.8)
    ax = axes[0, 0]
    eta_t = np.array([r["eta_t"] for r in recs], float)
    lam_eta_t = np.array([r["eigenvalues"][0] * r["eta_t"] for r in recs], float)
    ax.semilogx(eta_t, lam_eta_t, "-o", ms=3, label=r"numerical $\eta t\,\lambda_1$")
    ax.axhline(1.0, color="k", ls="--", lw=1, label=r"analytic: $\lambda_1 = 1/(\eta t)$")
    overlap = [comp[r["step"]]["subspace_overlap"] for r in recs if r["step"] in comp]
    if overlap:
        ax2 = ax.twinx()
        ax2.semilogx([r["eta_t"] for r in recs if r["step"] in comp], overlap, "s:", ms=3,
                     color="C2", label="top-2 subspace overlap with analytic")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("subspace overlap (eq. 5)", color="C2")
    ax.set_xlabel(r"$\eta t$")
    ax.set_ylabel(r"$\eta t\,\lambda_1$")
    ax.legend(fontsize=7, loc="lower right")
    _c.panel_label(ax, 0, "k = 2, σ = 0, no bias")
    ax = axes[0, 1]
    runs = results.get("runs", [])
    colors = _c.colors(len(runs), "tab20")
    for color, run in zip(colors, runs, strict=True):
        pts = [(r["eta_t"], r["f_top"]) for r in run["records"]
               if r.get("eta_t") and _c.finite(r.get("f_top"))]
        if pts:
            x, y = zip(*pts, strict=True)
            ax.semilogx(x, y, "-", color=color, lw=1.2, label=run["name"])
    ax.set_xlabel(r"$\eta t$")
    ax.set_ylabel(r"$f_{top}$ (top-k subspace)")
    ax.set_ylim(-0.02, 1.02)
    _c.panel_label(ax, 1, "gradient in the top subspace")
    ax = axes[0, 2]
    for i, (color, run) in enumerate(zip(colors, runs, strict=True)):
        last = run["records"][-1]
        lam = np.sort(np.asarray([x for x in last["eigenvalues"] if _c.finite(x)], float))[::-1]
        k = run["config"]["num_classes"]
        lam = lam[: 2 * k] / lam[0]
        ax.semilogy(np.arange(1, lam.size + 1), np.clip(lam, 1e-12, None), "o-", ms=3,
                    color=color, lw=0.8, label=run["name"])
        del i
    ax.set_xlabel("eigenvalue index i (last step)")
    ax.set_ylabel(r"$\lambda_i / \lambda_1$")
    _c.panel_label(ax, 2, "top eigenvalues")
    handles, labels = axes[0, 1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=7)
    return fig
