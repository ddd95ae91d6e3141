"""Figs. 4, 5 and 8: the dense spectrum, the SLQ density, λ_max and the top eigenvalues over
training."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from matplotlib.figure import Figure

from hessian_subspace import spectrum

from hessian_subspace.paper.figures import _common as _c
from hessian_subspace.paper.figures._common import Record


def fig4_dense_spectrum(eigenvalues, title: str = "", *, k: int | None = None,
                        bins: int = 100, num_top: int | None = None) -> Figure:
    """Paper Fig. 4: histogram of every Hessian eigenvalue, and the top outliers by rank.

    Panel (a): histogram of all eigenvalues with a log count axis; the top k are marked with
    red ticks. Panel (b): the largest ``num_top`` eigenvalues against their rank (log scale
    when they are positive), the top k in red.

    Args:
        eigenvalues: (p,) all eigenvalues, any order (non-finite values are dropped).
        title: figure title.
        k: number of top outliers to mark (e.g. the number of classes); None marks none.
        bins: histogram bins.
        num_top: eigenvalues shown in panel (b); default ``max(3k, 20)`` capped at p.

    Returns:
        Two axes.

    Raises:
        ValueError: if no eigenvalue is finite.
    """
    ev = np.asarray(eigenvalues, float).ravel()
    ev = np.sort(ev[np.isfinite(ev)])[::-1]
    if ev.size == 0:
        raise ValueError("fig4_dense_spectrum: no finite eigenvalue.")
    num_top = min(ev.size, num_top or max(3 * (k or 0), 20))
    fig, axes = _c.figure(1, 2, width=9.0, height=3.4)
    ax = axes[0, 0]
    ax.hist(ev, bins=bins, log=True, color="C0", alpha=0.85)
    if k:
        for x in ev[:k]:
            ax.axvline(x, ymax=0.12, color="C3", lw=1.5)
        ax.plot([], [], color="C3", lw=1.5, label=f"top {k}")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("count")
    _c.panel_label(ax, 0, f"all {ev.size} eigenvalues")

    ax = axes[0, 1]
    top = ev[:num_top]
    rank = np.arange(1, num_top + 1)
    kk = min(k or 0, num_top)
    if kk:
        ax.plot(rank[:kk], top[:kk], "o", color="C3", label=f"top {k}")
    ax.plot(rank[kk:], top[kk:], "o", color="C0", ms=4, label="others" if kk else None)
    if k and kk < num_top:
        ax.axvline(kk + 0.5, color="0.5", ls="--", lw=1)
    if top[-1] > 0:
        ax.set_yscale("log")
    ax.set_xlabel("rank i")
    ax.set_ylabel(r"$\lambda_i$")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    if kk:
        ax.legend(loc="upper right", fontsize=8)
    _c.panel_label(ax, 1, f"top {num_top}")
    if title:
        fig.suptitle(title)
    return fig


def smoothed_density(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray,
                      sigma: float) -> np.ndarray:
    """:func:`hessian_subspace.spectrum.gaussian_smoothing` (float64) as a numpy array."""
    with jax.enable_x64(True):
        return np.asarray(spectrum.gaussian_smoothing(
            np.asarray(nodes, np.float64), np.asarray(weights, np.float64),
            np.asarray(grid, np.float64), float(sigma)))


def fig5_slq_density(nodes, weights, num_grid: int = 400, sigma: float | None = None,
                     log_eigenvalue: bool = True, *, decades: float = 3.0,
                     title: str = "") -> Figure:
    """Paper Fig. 5: Hessian spectral density from stochastic Lanczos quadrature.

    The density is ``φ(λ) = mean_probes Σ_j w_j N(λ; λ_j, σ²)`` (Ghorbani et al. 2019), with
    Gaussian smoothing on the axis drawn. With ``log_eigenvalue`` (as in the paper) two panels
    are drawn: (a) the whole spectrum on a linear axis, (b) the positive top of the spectrum,
    ``[λ_max 10^-decades, λ_max]``, smoothed in log10 λ (density per decade), which resolves the
    outliers that a linear axis squashes. Without it, only panel (a). Density axes are log.

    Args:
        nodes: (num_probes, m) or (m,) Lanczos Ritz values.
        weights: same shape; squared first components of the Ritz vectors (each probe's
            weights sum to 1).
        num_grid: grid points.
        sigma: kernel width, in eigenvalue units for the linear panel and in decades for the
            log panel; default 1/100 of the axis range (of the panel's own axis).
        log_eigenvalue: add the log-eigenvalue panel.
        decades: decades below the largest node shown in the log panel.
        title: figure title.

    Returns:
        Two axes (one without ``log_eigenvalue``).

    Raises:
        ValueError: on mismatched shapes or no finite node.
    """
    nodes = np.atleast_2d(np.asarray(nodes, float))
    weights = np.atleast_2d(np.asarray(weights, float))
    if nodes.shape != weights.shape:
        raise ValueError(f"fig5_slq_density: nodes {nodes.shape} and weights {weights.shape} "
                         "differ in shape.")
    good = np.isfinite(nodes) & np.isfinite(weights)
    if not good.any():
        raise ValueError("fig5_slq_density: no finite node.")
    weights = np.where(good, weights, 0.0)
    nodes = np.where(good, nodes, 0.0)
    lo, hi = float(nodes[good].min()), float(nodes[good].max())
    span = max(hi - lo, 1e-12)
    show_log = log_eigenvalue and hi > 0
    fig, axes = _c.figure(1, 2 if show_log else 1, width=9.0 if show_log else 4.8, height=3.4)

    ax = axes[0, 0]
    sig = sigma or span / 100
    grid = np.linspace(lo - 3 * sig, hi + 3 * sig, num_grid)
    dens = smoothed_density(nodes, weights, grid, sig)
    ax.plot(grid, dens, color="C0")
    ax.set_yscale("log")
    ax.set_ylim(max(dens.max() * 1e-6, 1e-300), dens.max() * 3)
    ax.set_xlabel(r"eigenvalue $\lambda$")
    ax.set_ylabel(r"density $\phi(\lambda)$")
    ax.grid(alpha=0.3)
    _c.panel_label(ax, 0, rf"full spectrum ($\sigma$ = {sig:.2g})")

    if show_log:
        ax = axes[0, 1]
        lmin = hi * 10.0 ** (-decades)
        keep = good & (nodes >= lmin)
        x = np.where(keep, np.log10(np.where(keep, nodes, 1.0)), 0.0)
        w = np.where(keep, weights, 0.0)
        lsig = sigma or decades / 100
        lgrid = np.linspace(math.log10(lmin), math.log10(hi) + 3 * lsig, num_grid)
        ldens = smoothed_density(x, w, lgrid, lsig)
        ax.plot(10.0 ** lgrid, ldens, color="C1")
        ax.set_xscale("log")
        ax.set_yscale("log")
        if ldens.max() > 0:
            ax.set_ylim(ldens.max() * 1e-5, ldens.max() * 3)
        ax.set_xlabel(r"eigenvalue $\lambda$ (log scale)")
        ax.set_ylabel(r"density per decade of $\lambda$")
        ax.grid(alpha=0.3)
        mass = float(np.mean(np.sum(w, axis=1)))
        _c.panel_label(ax, 1, rf"top {decades:g} decades (mass {mass:.2f}, "
                            rf"$\sigma$ = {lsig:.2g} decades)")
    if title:
        fig.suptitle(title)
    return fig


def fig8_lambda_max(records: Sequence[Record], *, log_y: bool = False,
                    log_x: bool = False) -> Figure:
    """Paper Fig. 8: the largest Hessian eigenvalue λ_max against step.

    Args:
        records: pipeline records (``lambda_max``, or else ``eigenvalues[0]``).
        log_y: log-scale λ axis (positive values only).
        log_x: log-scale step axis.

    Returns:
        One axes.

    Raises:
        ValueError: if no record has λ_max.
    """
    recs = _c.ok(records)
    pts = []
    for r in recs:
        lam = r.get("lambda_max")
        if not _c.finite(lam) and isinstance(r.get("eigenvalues"), list) and r["eigenvalues"]:
            lam = r["eigenvalues"][0]
        if _c.finite(lam) and (not log_y or float(lam) > 0):
            pts.append((r["step"], float(lam)))
    if not pts:
        raise ValueError("fig8_lambda_max: no record has 'lambda_max' or 'eigenvalues'.")
    s, lam = map(np.asarray, zip(*pts, strict=True))
    fig, axes = _c.figure(1, 1, width=4.8, height=3.4)
    ax = axes[0, 0]
    ax.plot(s, lam, "-o", ms=3, color="C0")
    ax.set_xlabel("step")
    ax.set_ylabel(r"$\lambda_{\max}$")
    if log_y:
        ax.set_yscale("log")
    if log_x:
        _c.set_log_x(ax, s)
    ax.grid(alpha=0.3, which="both" if log_y else "major")
    ax.set_title("largest Hessian eigenvalue", fontsize=10)
    return fig


def eigenvalues_over_time(records: Sequence[Record], *, log_y: bool = False,
                          log_x: bool = False, include_next: bool = False) -> Figure:
    """The top-k Hessian eigenvalues λ_1 ≥ … ≥ λ_k against step (one line each).

    Companion of Fig. 8: shows whether the outliers separate from the bulk, and, with
    ``include_next``, the "next k" eigenvalues λ_{k+1…2k} as dashed grey lines.

    Args:
        records: analysis records with ``eigenvalues`` (the top k, then the next k, with the
            record's ``k``; without ``k`` all of them count as the top).
        log_y: log-scale eigenvalue axis (non-positive values dropped).
        log_x: log-scale step axis.
        include_next: also draw λ_{k+1}…λ_{2k}.

    Returns:
        One axes with k lines (2k with ``include_next``).

    Raises:
        ValueError: if no record has eigenvalues.
    """
    recs = _c.ok(records)
    k = _c.record_k(recs)

    def columns(lo, hi):
        cols = []
        for i in range(lo, hi):
            pts = [(r["step"], float(r["eigenvalues"][i])) for r in recs
                   if isinstance(r.get("eigenvalues"), list) and len(r["eigenvalues"]) > i
                   and _c.finite(r["eigenvalues"][i])
                   and (not log_y or float(r["eigenvalues"][i]) > 0)]
            cols.append(tuple(map(np.asarray, zip(*pts, strict=True))) if pts else None)
        while cols and cols[-1] is None:
            cols.pop()
        return cols

    top = columns(0, k or 0)
    if not any(c is not None for c in top):
        raise ValueError("eigenvalues_over_time: no record has 'eigenvalues'.")
    fig, axes = _c.figure(1, 1, width=5.4, height=3.6)
    ax = axes[0, 0]
    colors = _c.colors(len(top), "plasma")
    steps = []
    for i, (c, color) in enumerate(zip(top, colors, strict=True)):
        if c is not None:
            ax.plot(*c, "-o", ms=2.5, color=color, label=rf"$\lambda_{{{i + 1}}}$")
            steps.append(c[0])
    if include_next:
        nxt = columns(k, 2 * k)
        label = rf"$\lambda_{{{len(top) + 1}}}\ldots\lambda_{{{len(top) + len(nxt)}}}$"
        for i, c in enumerate(nxt):
            if c is not None:
                ax.plot(*c, "--", color="0.55", lw=1, label=label if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("Hessian eigenvalue")
    if log_y:
        ax.set_yscale("log")
    if log_x:
        _c.set_log_x(ax, np.concatenate(steps))
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_title(f"top {len(top)} eigenvalues", fontsize=10)
    return fig
