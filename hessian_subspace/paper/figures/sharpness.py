"""Progressive sharpening and the edge of stability (Cohen et al. 2021) beside f_top.

For full-batch gradient descent with step size η on a loss whose top Hessian eigenvalue is
λ_max, the quadratic model is stable only while λ_max < 2/η. Cohen et al. observe that λ_max
rises during training (progressive sharpening) until it reaches 2/η and then hovers there
while the loss keeps falling, non-monotonically (the edge of stability).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from hessian_subspace.paper.figures import _common as _c
from hessian_subspace.paper.figures._common import Record


def lambda_max_series(records: Sequence[Record]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, λ_max) from the records' first eigenvalue."""
    pts = [(r["step"], float(r["eigenvalues"][0])) for r in _c.ok(records)
           if isinstance(r.get("eigenvalues"), list) and r["eigenvalues"]
           and _c.finite(r["eigenvalues"][0])]
    if not pts:
        return np.zeros(0), np.zeros(0)
    s, v = zip(*pts, strict=True)
    return np.asarray(s, float), np.asarray(v, float)


def edge_of_stability(runs: Mapping[str, tuple[Sequence[Record], float]], *,
                      title: str = "") -> Figure:
    """λ_max against step for full-batch GD at several step sizes, with 2/η; the loss; f_top.

    Args:
        runs: ``{label: (records, learning_rate)}``; records with ``eigenvalues`` (λ_max is
            the first), ``train_loss`` and ``f_top``.
        title: figure title.

    Returns:
        A figure with three axes: (a) λ_max and the stability threshold 2/η (dashed) per run,
        log scale; (b) the full-data training loss; (c) f_top.

    Raises:
        ValueError: if no run has a λ_max.
    """
    fig, axes = _c.figure(1, 3, width=14.0, height=3.8)
    colors = [f"C{i}" for i in range(len(runs))]
    drew = False
    for color, (label, (records, lr)) in zip(colors, runs.items(), strict=True):
        s, lam = lambda_max_series(records)
        if not s.size:
            continue
        drew = True
        axes[0, 0].plot(s, lam, "-", color=color, lw=1.2, label=label)
        axes[0, 0].axhline(2.0 / lr, color=color, ls="--", lw=0.9)
        s_loss, loss = _c.series(_c.ok(records), "train_loss")
        axes[0, 1].plot(s_loss, loss, "-", color=color, lw=1.2, label=label)
        s_top, f_top = _c.series(_c.ok(records), "f_top")
        axes[0, 2].plot(s_top, f_top, "-", color=color, lw=1.2, label=label)
    if not drew:
        raise ValueError("edge_of_stability: no run has eigenvalues (run 'eigenpairs').")
    ax = axes[0, 0]
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(r"$\lambda_{\max}$ (full-batch Hessian)")
    _c.panel_label(ax, 0, r"sharpness; dashed: $2/\eta$")
    ax = axes[0, 1]
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (full batch)")
    _c.panel_label(ax, 1, "loss")
    ax = axes[0, 2]
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel(r"$f_{\rm top}$")
    _c.panel_label(ax, 2, "gradient in the top subspace")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def sharpness_numbers(records: Sequence[Record], lr: float) -> dict:
    """What the edge-of-stability figure shows, as numbers: the threshold 2/η, λ_max at the
    start and its largest value, the first step where λ_max ≥ 0.9 · 2/η (None: never), the
    mean of λ_max · η / 2 and of f_top over the checkpoints from then on (the edge of
    stability) and over the last half of the run, and the loss at the start and end."""
    s, lam = lambda_max_series(records)
    ok = _c.ok(records)
    threshold = 2.0 / lr
    if not s.size:
        return dict(threshold=threshold)
    reached = np.nonzero(lam >= 0.9 * threshold)[0]
    first = float(s[reached[0]]) if reached.size else None
    f_of = {r["step"]: r["f_top"] for r in ok if _c.finite(r.get("f_top"))}
    loss = [r["train_loss"] for r in ok if _c.finite(r.get("train_loss"))]
    half = s >= s[-1] / 2

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return float(np.mean(xs)) if xs else None

    at_edge = s >= first if first is not None else np.zeros_like(s, bool)
    return dict(
        threshold=threshold, lambda_max_start=float(lam[0]), lambda_max_max=float(lam.max()),
        first_step_at_0p9_threshold=first,
        lambda_max_over_threshold_at_edge=mean(lam[at_edge] / threshold),
        lambda_max_over_threshold_last_half=mean(lam[half] / threshold),
        f_top_at_edge=mean([f_of.get(x) for x in s[at_edge]]),
        f_top_before_edge=mean([f_of.get(x) for x in s[~at_edge]]),
        f_top_last_half=mean([f_of.get(x) for x in s[half]]),
        train_loss_start=loss[0] if loss else None, train_loss_final=loss[-1] if loss else None,
        checkpoints=int(s.size))
