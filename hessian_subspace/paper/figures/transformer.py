"""The transformer experiment's figures (beyond the paper): f_top as a function of k, the
spectrum of each parameter block, and the Hessian against its Adam-preconditioned version."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from hessian_subspace.paper.figures import _common as _c
from hessian_subspace.paper.figures._common import Record
from hessian_subspace.paper.figures.spectra import smoothed_density


def f_top_vs_k(records: Sequence[Record], title: str = "") -> Figure:
    """(a) f_top of the top-k subspace over training for each k of ``f_top_at``; (b) f_top as
    a function of k (``f_top_curve``) at a few steps, with the saturation k marked.

    Raises:
        ValueError: if no record has ``f_top_curve``.
    """
    recs = [r for r in _c.ok(records) if isinstance(r.get("f_top_curve"), list)]
    if not recs:
        raise ValueError("f_top_vs_k: no record has 'f_top_curve'.")
    fig, axes = _c.figure(1, 2, width=9.0)
    ax = axes[0, 0]
    ks = sorted({int(k) for r in recs for k in r.get("f_top_at", {})})
    for k, color in zip(ks, _c.colors(len(ks), "viridis"), strict=True):
        steps, f = _c.series([dict(r, value=r["f_top_at"].get(str(k))) for r in recs], "value")
        ax.plot(steps, f, "-o", ms=3, color=color, label=f"k = {k}")
    _c.set_log_x(ax, np.asarray([r["step"] for r in recs]))
    ax.set_xlabel("step")
    ax.set_ylabel(r"$f_{top}$")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _c.panel_label(ax, 0, "fraction of g in the top-k subspace")
    ax = axes[0, 1]
    chosen = recs[:: max(1, len(recs) // 4)] + ([recs[-1]] if len(recs) > 1 else [])
    chosen = list({r["step"]: r for r in chosen}.values())
    for r, color in zip(chosen, _c.colors(len(chosen), "plasma"), strict=True):
        curve = np.asarray([x if _c.finite(x) else np.nan for x in r["f_top_curve"]], float)
        k = np.arange(1, curve.size + 1)
        ax.plot(k, curve, color=color, label=f"step {r['step']}")
        ks_ = r.get("k_saturation")
        if isinstance(ks_, int) and 1 <= ks_ <= curve.size:
            ax.plot([ks_], [curve[ks_ - 1]], "o", color=color, ms=5)
    ax.set_xlabel("k (dots: where f_top saturates)")
    ax.set_ylabel(r"$f_{top}(k)$")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _c.panel_label(ax, 1, "f_top against k")
    if title:
        fig.suptitle(title)
    return fig


def block_spectra(records: Sequence[Record], densities: Mapping[str, tuple] | None = None,
                  title: str = "") -> Figure:
    """(a) The top eigenvalue of each parameter block at the steps that measured them
    (``block_spectra``); (b) the blocks' SLQ densities at the last of them (``densities``:
    ``{block: (nodes, weights)}``, from the stored ``block_slq`` arrays).

    Raises:
        ValueError: if no record has ``block_spectra``.
    """
    recs = [r for r in _c.ok(records) if isinstance(r.get("block_spectra"), Mapping)]
    if not recs:
        raise ValueError("block_spectra: no record has 'block_spectra'.")
    names = list(recs[-1]["block_spectra"])
    fig, axes = _c.figure(1, 2, width=11.0, height=3.8)
    ax = axes[0, 0]
    width = 0.8 / len(recs)
    for i, (r, color) in enumerate(zip(recs, _c.colors(len(recs), "viridis"), strict=True)):
        top = [(r["block_spectra"].get(n, {}).get("eigenvalues") or [np.nan])[0]
               for n in names]
        top = [x if _c.finite(x) and x > 0 else np.nan for x in top]
        ax.bar(np.arange(len(names)) + i * width, top, width, color=color,
               label=f"step {r['step']}")
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=70, fontsize=7)
    ax.set_ylabel(r"top eigenvalue of the block, $\lambda_1$")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    _c.panel_label(ax, 0, "per-block sharpness")
    ax = axes[0, 1]
    if densities:
        span = [np.nanmax([np.max(n) for n, _ in densities.values()]),
                np.nanmin([np.min(n) for n, _ in densities.values()])]
        grid = np.linspace(span[1] - 0.05 * abs(span[1]), span[0] * 1.05, 300)
        sigma = max((span[0] - span[1]) / 100, 1e-12)
        for (name, (nodes, weights)), color in zip(
                densities.items(), _c.colors(len(densities), "tab20"), strict=True):
            dens = smoothed_density(nodes, weights, grid, sigma)
            ax.plot(grid, np.maximum(dens, 1e-12), color=color, lw=1, label=name)
        ax.set_yscale("log")
        ax.set_ylim(bottom=1e-6)
        ax.legend(fontsize=6, ncol=2)
    ax.set_xlabel(r"eigenvalue $\lambda$")
    ax.set_ylabel("SLQ density")
    ax.grid(alpha=0.3)
    _c.panel_label(ax, 1, f"block densities, step {recs[-1]['step']}")
    if title:
        fig.suptitle(title)
    return fig


def adam_sharpness(records: Sequence[Record], learning_rate: float | None = None,
                   title: str = "") -> Figure:
    """(a) The top Hessian eigenvalue and the top eigenvalue of the Adam-preconditioned Hessian
    :math:`D^{-1/2} H D^{-1/2}` over training (with :math:`38/\\eta`, the stability threshold
    of Adam with :math:`\\beta_1 = 0.9`, when the learning rate is given); (b) f_top in the
    plain and in the preconditioned geometry.

    Raises:
        ValueError: if no record has ``adam_eigenvalues``.
    """
    recs = [r for r in _c.ok(records) if isinstance(r.get("adam_eigenvalues"), list)]
    if not recs:
        raise ValueError("adam_sharpness: no record has 'adam_eigenvalues'.")
    fig, axes = _c.figure(1, 2, width=9.0)
    ax = axes[0, 0]
    first = lambda key: [dict(r, value=(r.get(key) or [np.nan])[0]) for r in recs]  # noqa: E731
    for key, label, color in (("eigenvalues", r"$\lambda_{max}(H)$", "C0"),
                              ("adam_eigenvalues", r"$\lambda_{max}(D^{-1/2}HD^{-1/2})$", "C3")):
        steps, lam = _c.series(first(key), "value")
        ax.plot(steps, lam, "-o", ms=3, color=color, label=label)
    if learning_rate:
        ax.axhline(38 / learning_rate, color="0.4", ls="--", lw=1, label=r"$38/\eta$")
    ax.set_yscale("log")
    _c.set_log_x(ax, np.asarray([r["step"] for r in recs]))
    ax.set_xlabel("step")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _c.panel_label(ax, 0, "sharpness, plain and preconditioned")
    ax = axes[0, 1]
    for key, label, color in (("f_top", "f_top (H)", "C0"),
                              ("adam_f_top", r"f_top ($D^{-1/2}HD^{-1/2}$, $D^{-1/2}g$)", "C3")):
        steps, f = _c.series(recs, key)
        if steps.size:
            ax.plot(steps, f, "-o", ms=3, color=color, label=label)
    _c.set_log_x(ax, np.asarray([r["step"] for r in recs]))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _c.panel_label(ax, 1, "gradient in the top subspace")
    if title:
        fig.suptitle(title)
    return fig
