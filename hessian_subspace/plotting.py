"""Figures of Gur-Ari, Roberts & Dyer (2018), "Gradient Descent Happens in a Tiny Subspace".

Every function takes plain Python/numpy results (the records of
:func:`hessian_subspace.pipeline.read_results`, the bases and spectra of
:class:`hessian_subspace.pipeline.ResultStore`, the log of
:func:`hessian_subspace.train.read_train_log`) and returns a :class:`matplotlib.figure.Figure`.
No JAX computation happens here, and no global pyplot state is touched: figures are built with
``matplotlib.figure.Figure`` directly, so they render headless (Agg) and need no ``plt.close``.

Records are skipped unless ``status == "ok"`` (a record without ``status`` counts as ok), and
``None`` or non-finite values are skipped point by point, so a failed checkpoint leaves a gap
instead of an exception. A function raises ``ValueError`` only when nothing at all can be drawn.

Figure numbers follow the paper (arXiv 1812.04754): Fig. 1 (f_top with loss/accuracy), Fig. 2
(subspace overlap against t2 − t1), Fig. 3/9/10 (overlap against subspace dimension), Fig. 4
(dense spectrum), Fig. 5 (SLQ density), Fig. 6-7 (top eigenvector by layer), Fig. 8 (λ_max),
Fig. 11 (c_i²), Fig. 12 (f_top of variants), Table 1 (overlap(g, Hg)).

Example:
    >>> recs = [dict(status="ok", step=s, k=2, f_top=0.1 * s) for s in range(5)]
    >>> fig = fig1_ftop(recs)
    >>> len(fig.axes)
    1

References:
    Gur-Ari, Roberts, Dyer. Gradient Descent Happens in a Tiny Subspace. arXiv:1812.04754, 2018.
    Ghorbani, Krishnan, Xiao. An Investigation into Neural Net Optimization via Hessian
    Eigenvalue Density. ICML 2019 (SLQ densities).
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

Record = Mapping[str, Any]

_PANEL_W, _PANEL_H = 4.2, 3.2  # inches per panel


# --------------------------------------------------------------------------------------------
# Helpers.


def _ok(records: Iterable[Record]) -> list[Record]:
    """The ``status == "ok"`` records (missing status counts as ok), sorted by step."""
    out = [r for r in records if isinstance(r, Mapping) and r.get("status", "ok") == "ok"
           and _finite(r.get("step"))]
    return sorted(out, key=lambda r: r["step"])


def _finite(x) -> bool:
    if x is None or isinstance(x, bool):
        return False
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _series(records: Sequence[Record], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a scalar key, skipping records where it is missing or non-finite."""
    pts = [(r["step"], float(r[key])) for r in records if _finite(r.get(key))]
    if not pts:
        return np.zeros(0), np.zeros(0)
    s, v = zip(*pts, strict=True)
    return np.asarray(s, float), np.asarray(v, float)


def _record_k(records: Sequence[Record]) -> int | None:
    for r in records:
        if isinstance(r.get("k"), int) and r["k"] > 0:
            return int(r["k"])
    for r in records:
        if isinstance(r.get("eigenvalues"), list) and r["eigenvalues"]:
            return len(r["eigenvalues"])
    return None


def _figure(nrows: int, ncols: int, *, width: float | None = None,
            height: float | None = None, **subplot_kw) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width or _PANEL_W * ncols, height or _PANEL_H * nrows),
                 layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    return fig, axes


def _panel_label(ax, i: int, text: str = "") -> None:
    label = f"({'abcdefghijklmnopqrstuvwxyz'[i % 26]})"
    ax.set_title(f"{label} {text}".strip(), loc="left", fontsize=10)


def _colors(n: int, cmap: str = "viridis") -> list:
    if n <= 0:
        return []
    cm = colormaps[cmap]
    if n == 1:
        return [cm(0.1)]
    return [cm(0.9 * i / (n - 1)) for i in range(n)]


def _set_log_x(ax, steps: np.ndarray) -> None:
    """Log-scale step axis; symlog when step 0 is plotted (linear up to 1, log above)."""
    if steps.size and np.min(steps) <= 0:
        ax.set_xscale("symlog", linthresh=1.0, linscale=0.5)
        ax.set_xlim(left=0, right=max(float(np.max(steps)) * 1.3, 2.0))
    else:
        ax.set_xscale("log")


def _running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing running mean; the first ``window - 1`` points average what is available."""
    if window <= 1 or values.size == 0:
        return values
    c = np.cumsum(np.insert(values, 0, 0.0))
    n = np.arange(1, values.size + 1)
    lo = np.maximum(n - window, 0)
    return (c[n] - c[lo]) / (n - lo)


def _default_window(n: int) -> int:
    return int(min(100, max(1, round(n / 25))))


def _overlap_table(records: Sequence[Record], t1: int, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(t2 − t1, overlap) for every record t2 > t1 that stores ``subspace_overlap[t1][key]``."""
    pts = []
    for r in records:
        so = r.get("subspace_overlap")
        if not isinstance(so, Mapping) or r["step"] <= t1:
            continue
        entry = so.get(str(t1))
        if isinstance(entry, Mapping) and _finite(entry.get(key)):
            pts.append((r["step"] - t1, float(entry[key])))
    if not pts:
        return np.zeros(0), np.zeros(0)
    d, v = zip(*pts, strict=True)
    return np.asarray(d, float), np.asarray(v, float)


def _reference_steps(records: Sequence[Record]) -> set[int]:
    out = set()
    for r in records:
        so = r.get("subspace_overlap")
        if isinstance(so, Mapping):
            out.update(int(t) for t in so if str(t).lstrip("-").isdigit())
    return out


# --------------------------------------------------------------------------------------------
# Output.


def save(fig: Figure, path: str) -> tuple[str, str]:
    """Writes ``path.png`` (150 dpi) and ``path.pdf``, each to a temporary file then renamed.

    Args:
        fig: the figure.
        path: output path without extension (a trailing ``.png`` or ``.pdf`` is dropped);
            missing directories are created.

    Returns:
        ``(png_path, pdf_path)``.
    """
    root, ext = os.path.splitext(path)
    if ext.lower() in (".png", ".pdf"):
        path = root
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    out = []
    for fmt in ("png", "pdf"):
        final = f"{path}.{fmt}"
        fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=f".{fmt}", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                fig.savefig(f, format=fmt, dpi=150)
            os.replace(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        out.append(final)
    return out[0], out[1]


# --------------------------------------------------------------------------------------------
# Fig. 1 and 12: fraction of the gradient in the top subspace.


def fig1_ftop(records: Sequence[Record], train_log: Sequence[Record] | None = None,
              title: str = "", *, log_x: bool = False, window: int | None = None) -> Figure:
    """Paper Fig. 1: f_top = ‖P_top g‖² / ‖g‖² (eq. 2) and the training curves.

    Panel (a): f_top of the full-data gradient against step, and the mean f_top of the fixed
    mini-batch gradients (``f_top_minibatch_mean``) where the records have it. Panel (b), when
    any loss is available: training loss (left axis) and accuracy (right axis, when present)
    against step, from the ``"train"`` events of ``train_log`` smoothed by a trailing running
    mean (the raw mini-batch values are drawn faintly behind), or else from the records'
    full-data ``train_loss`` / ``train_accuracy``.

    Args:
        records: pipeline records (failed ones and ``None`` values are skipped).
        train_log: optional :func:`hessian_subspace.train.read_train_log` output.
        title: figure title.
        log_x: log-scale step axes (symlog when step 0 is present).
        window: running-mean window in steps for the train log; default ``len / 25``
            clipped to [1, 100].

    Returns:
        The figure: 1 axes (no losses anywhere), 2 (loss only) or 3 (loss + twin accuracy axis).

    Raises:
        ValueError: if no record has a finite ``f_top``.
    """
    recs = _ok(records)
    s_top, f_top = _series(recs, "f_top")
    s_mb, f_mb = _series(recs, "f_top_minibatch_mean")
    if s_top.size == 0 and s_mb.size == 0:
        raise ValueError("fig1_ftop: no record has a finite 'f_top' (run the f_top transform).")

    # Loss/accuracy source: the train log if it has train events, else the records.
    raw_loss = raw_acc = None
    events = [e for e in (train_log or []) if isinstance(e, Mapping)
              and e.get("event", "train") == "train" and _finite(e.get("step"))]
    if events:
        events = sorted(events, key=lambda e: e["step"])
        s_loss, loss = _series(events, "loss")
        s_acc, acc = _series(events, "accuracy")
        w = window or _default_window(len(events))
        raw_loss, raw_acc = (s_loss, loss), (s_acc, acc)
        loss, acc = _running_mean(loss, w), _running_mean(acc, w)
        source = f"mini-batch, running mean of {w}" if w > 1 else "mini-batch"
    else:
        s_loss, loss = _series(recs, "train_loss")
        s_acc, acc = _series(recs, "train_accuracy")
        source = "full training set"
    has_loss = s_loss.size > 0 or s_acc.size > 0

    fig, axes = _figure(1, 2 if has_loss else 1)
    ax = axes[0, 0]
    if s_top.size:
        ax.plot(s_top, f_top, "-o", ms=3, color="C0", label="full-data gradient")
    if s_mb.size:
        ax.plot(s_mb, f_mb, "--s", ms=3, color="C1", alpha=0.9, label="mini-batch gradients (mean)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel(r"$f_{\rm top} = \|P_{\rm top}\, g\|^2 / \|g\|^2$")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8, framealpha=0.85)
    _panel_label(ax, 0, "gradient in the top subspace")
    if log_x:
        _set_log_x(ax, np.concatenate([s_top, s_mb]))

    if has_loss:
        ax = axes[0, 1]
        handles = []
        if s_loss.size:
            if raw_loss is not None:
                ax.plot(*raw_loss, color="C3", alpha=0.2, lw=0.6)
            handles += ax.plot(s_loss, loss, color="C3", label="loss")
            ax.set_ylabel("train loss", color="C3")
            ax.tick_params(axis="y", colors="C3")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if log_x:
            _set_log_x(ax, np.concatenate([s_loss, s_acc]))
        if s_acc.size:
            ax2 = ax.twinx()
            if raw_acc is not None:
                ax2.plot(*raw_acc, color="C2", alpha=0.2, lw=0.6)
            handles += ax2.plot(s_acc, acc, color="C2", label="accuracy")
            ax2.set_ylabel("train accuracy", color="C2")
            ax2.tick_params(axis="y", colors="C2")
            ax2.set_ylim(-0.02, 1.02)
        ax.legend(handles=handles, loc="center right", fontsize=8, framealpha=0.85)
        _panel_label(ax, 1, f"training ({source})")
    if title:
        fig.suptitle(title)
    return fig


def fig12_variants(runs: Mapping[str, Sequence[Record]], *, log_x: bool = False,
                   title: str = "") -> Figure:
    """Paper Fig. 12 / App. D: f_top against step for several training variants.

    Args:
        runs: ``{label: records}``; runs without any finite f_top are left out of the plot.
        log_x: log-scale step axis.
        title: axes title.

    Returns:
        One axes, one line per run with data.

    Raises:
        ValueError: if no run has a finite f_top.
    """
    fig, axes = _figure(1, 1, width=5.6, height=3.6)
    ax = axes[0, 0]
    all_steps = []
    colors = _colors(len(runs), "turbo") if len(runs) > 10 else [f"C{i}" for i in range(len(runs))]
    for (label, recs), color in zip(runs.items(), colors, strict=True):
        s, f = _series(_ok(recs), "f_top")
        if s.size:
            ax.plot(s, f, "-o", ms=2.5, color=color, label=str(label))
            all_steps.append(s)
    if not all_steps:
        raise ValueError("fig12_variants: no run has a finite 'f_top'.")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel(r"$f_{\rm top}$")
    ax.grid(alpha=0.3)
    if log_x:
        _set_log_x(ax, np.concatenate(all_steps))
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_title(title or "gradient in the top subspace, by variant", fontsize=10)
    return fig


# --------------------------------------------------------------------------------------------
# Fig. 2, 3: overlaps of top subspaces across steps.


def fig2_subspace_overlap(records: Sequence[Record], t1_steps: Sequence[int],
                          k: int | None = None, *, log_x: bool = False) -> Figure:
    """Paper Fig. 2: overlap (eq. 5) of the subspaces at t1 and t2 against t2 − t1.

    Panel (a): top-k subspaces (``subspace_overlap[t1]["top{k}"]``); panel (b): the "next k"
    subspaces, eigenvectors k+1…2k (``["next"]``). One line per t1 in ``t1_steps`` that is a
    reference step of the records; others are ignored.

    Args:
        records: pipeline records with ``subspace_overlap``.
        t1_steps: reference steps t1.
        k: subspace dimension for panel (a); default the records' ``k``.
        log_x: log-scale t2 − t1 axis.

    Returns:
        Two axes (one if no record has a "next" overlap).

    Raises:
        ValueError: if none of ``t1_steps`` has an overlap in the records.
    """
    recs = _ok(records)
    k = k or _record_k(recs)
    if k is None:
        raise ValueError("fig2_subspace_overlap: k not given and not found in the records.")
    present = _reference_steps(recs)
    t1s = [int(t) for t in t1_steps if int(t) in present]
    curves_top = {t: _overlap_table(recs, t, f"top{k}") for t in t1s}
    curves_next = {t: _overlap_table(recs, t, "next") for t in t1s}
    curves_top = {t: c for t, c in curves_top.items() if c[0].size}
    curves_next = {t: c for t, c in curves_next.items() if c[0].size}
    if not curves_top and not curves_next:
        raise ValueError(f"fig2_subspace_overlap: no overlap with any of t1 = {list(t1_steps)} "
                         f"(reference steps in the records: {sorted(present)}).")
    panels = [(curves_top, f"top-{k} subspaces")]
    if curves_next:
        panels.append((curves_next, f'"next {k}" subspaces (eigenvectors {k + 1}…{2 * k})'))
    fig, axes = _figure(1, len(panels), sharey=True)
    colors = dict(zip(t1s, _colors(len(t1s)), strict=True))
    for i, (curves, what) in enumerate(panels):
        ax = axes[0, i]
        for t, (dt, v) in curves.items():
            ax.plot(dt, v, "-o", ms=2.5, color=colors[t], label=rf"$t_1 = {t}$")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(r"$t_2 - t_1$")
        if log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        _panel_label(ax, i, what)
    axes[0, 0].set_ylabel("subspace overlap (eq. 5)")
    # One legend for both panels, outside the data.
    handles = {}
    for ax in axes.ravel():
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside right center",
               fontsize=8, frameon=False)
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
    recs = _ok(records)
    k = k or _record_k(recs)
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
    fig, axes = _figure(1, 1, width=4.8, height=3.4)
    ax = axes[0, 0]
    colors = _colors(len(t1s))
    drawn = []
    # Error bars of several t1 are dodged sideways so that they stay apart.
    offsets = np.linspace(-0.12, 0.12, len(t1s)) if len(t1s) > 1 else [0.0]
    for t, color, off in zip(t1s, colors, offsets, strict=True):
        ds, means, stds, counts = [], [], [], []
        for d in dims:
            _, v = _overlap_table(recs, t, f"top{d}")
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


# --------------------------------------------------------------------------------------------
# Fig. 4, 5: spectra.


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
    fig, axes = _figure(1, 2, width=9.0, height=3.4)
    ax = axes[0, 0]
    ax.hist(ev, bins=bins, log=True, color="C0", alpha=0.85)
    if k:
        for x in ev[:k]:
            ax.axvline(x, ymax=0.12, color="C3", lw=1.5)
        ax.plot([], [], color="C3", lw=1.5, label=f"top {k}")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("count")
    _panel_label(ax, 0, f"all {ev.size} eigenvalues")

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
    _panel_label(ax, 1, f"top {num_top}")
    if title:
        fig.suptitle(title)
    return fig


def _smoothed_density(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray,
                      sigma: float) -> np.ndarray:
    """Mean over probes of Σ_j w_j N(grid; node_j, σ²); nodes/weights (num_probes, m)."""
    z = (grid[None, None, :] - nodes[..., None]) / sigma
    kernel = np.exp(-0.5 * z ** 2) / (sigma * math.sqrt(2 * math.pi))
    return np.mean(np.sum(weights[..., None] * kernel, axis=1), axis=0)


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
    fig, axes = _figure(1, 2 if show_log else 1, width=9.0 if show_log else 4.8, height=3.4)

    ax = axes[0, 0]
    sig = sigma or span / 100
    grid = np.linspace(lo - 3 * sig, hi + 3 * sig, num_grid)
    dens = _smoothed_density(nodes, weights, grid, sig)
    ax.plot(grid, dens, color="C0")
    ax.set_yscale("log")
    ax.set_ylim(max(dens.max() * 1e-6, 1e-300), dens.max() * 3)
    ax.set_xlabel(r"eigenvalue $\lambda$")
    ax.set_ylabel(r"density $\phi(\lambda)$")
    ax.grid(alpha=0.3)
    _panel_label(ax, 0, rf"full spectrum ($\sigma$ = {sig:.2g})")

    if show_log:
        ax = axes[0, 1]
        lmin = hi * 10.0 ** (-decades)
        keep = good & (nodes >= lmin)
        x = np.where(keep, np.log10(np.where(keep, nodes, 1.0)), 0.0)
        w = np.where(keep, weights, 0.0)
        lsig = sigma or decades / 100
        lgrid = np.linspace(math.log10(lmin), math.log10(hi) + 3 * lsig, num_grid)
        ldens = _smoothed_density(x, w, lgrid, lsig)
        ax.plot(10.0 ** lgrid, ldens, color="C1")
        ax.set_xscale("log")
        ax.set_yscale("log")
        if ldens.max() > 0:
            ax.set_ylim(ldens.max() * 1e-5, ldens.max() * 3)
        ax.set_xlabel(r"eigenvalue $\lambda$ (log scale)")
        ax.set_ylabel(r"density per decade of $\lambda$")
        ax.grid(alpha=0.3)
        mass = float(np.mean(np.sum(w, axis=1)))
        _panel_label(ax, 1, rf"top {decades:g} decades (mass {mass:.2f}, "
                            rf"$\sigma$ = {lsig:.2g} decades)")
    if title:
        fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------------------------
# Fig. 6-8: the top eigenvector and eigenvalue.


def fig6_eigenvector_anatomy(vectors: Mapping[int, Any],
                             layer_slices: Sequence[Sequence]) -> Figure:
    """Paper Fig. 6-7: components of the top eigenvector v_1 against parameter index.

    One panel per step (stacked, shared x), components coloured by parameter leaf, with light
    lines at leaf boundaries. The sign of each vector is fixed so that its largest-magnitude
    component is positive (eigenvectors are defined up to sign).

    Args:
        vectors: ``{step: (p,) flat v_1}`` in ``ravel_pytree`` order, e.g.
            ``ResultStore(d).basis(step)["eigenvectors"][0]``.
        layer_slices: ``[[name, start, stop], ...]`` as in the records' ``layer_slices``.

    Returns:
        One axes per step.

    Raises:
        ValueError: if ``vectors`` is empty.
    """
    if not vectors:
        raise ValueError("fig6_eigenvector_anatomy: no vectors given.")
    slices = [(str(n), int(a), int(b)) for n, a, b in layer_slices]
    steps = sorted(vectors)
    n = len(steps)
    fig, axes = _figure(n, 1, width=8.0, height=max(2.0 * n, 2.6), sharex=True)
    colors = [f"C{i % 10}" for i in range(len(slices))]
    for i, step in enumerate(steps):
        ax = axes[i, 0]
        v = np.asarray(vectors[step], float).ravel()
        if v.size and np.isfinite(v).any():
            j = int(np.nanargmax(np.abs(v)))
            if v[j] < 0:
                v = -v
        idx = np.arange(v.size)
        covered = np.zeros(v.size, bool)
        for (name, a, b), color in zip(slices, colors, strict=True):
            a, b = max(a, 0), min(b, v.size)
            if b <= a:
                continue
            covered[a:b] = True
            ax.plot(idx[a:b], v[a:b], ".", ms=2.0, color=color, label=name, rasterized=True)
            if a > 0:
                ax.axvline(a - 0.5, color="0.85", lw=0.6, zorder=0)
        if not covered.all():
            ax.plot(idx[~covered], v[~covered], ".", ms=2.0, color="0.5", label="other",
                    rasterized=True)
        ax.axhline(0, color="0.6", lw=0.6, zorder=0)
        ax.set_ylabel(r"$v_1$ component")
        ax.set_title(f"step {step}", loc="left", fontsize=10)
        ax.set_xlim(-0.5, v.size - 0.5)
    axes[-1, 0].set_xlabel("parameter index")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8, markerscale=4,
               frameon=False, title="layer", title_fontsize=8)
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
    recs = _ok(records)
    pts = []
    for r in recs:
        lam = r.get("lambda_max")
        if not _finite(lam) and isinstance(r.get("eigenvalues"), list) and r["eigenvalues"]:
            lam = r["eigenvalues"][0]
        if _finite(lam) and (not log_y or float(lam) > 0):
            pts.append((r["step"], float(lam)))
    if not pts:
        raise ValueError("fig8_lambda_max: no record has 'lambda_max' or 'eigenvalues'.")
    s, lam = map(np.asarray, zip(*pts, strict=True))
    fig, axes = _figure(1, 1, width=4.8, height=3.4)
    ax = axes[0, 0]
    ax.plot(s, lam, "-o", ms=3, color="C0")
    ax.set_xlabel("step")
    ax.set_ylabel(r"$\lambda_{\max}$")
    if log_y:
        ax.set_yscale("log")
    if log_x:
        _set_log_x(ax, s)
    ax.grid(alpha=0.3, which="both" if log_y else "major")
    ax.set_title("largest Hessian eigenvalue", fontsize=10)
    return fig


def eigenvalues_over_time(records: Sequence[Record], *, log_y: bool = False,
                          log_x: bool = False, include_next: bool = False) -> Figure:
    """The top-k Hessian eigenvalues λ_1 ≥ … ≥ λ_k against step (one line each).

    Companion of Fig. 8: shows whether the outliers separate from the bulk, and, with
    ``include_next``, the "next k" eigenvalues λ_{k+1…2k} as dashed grey lines.

    Args:
        records: pipeline records with ``eigenvalues`` (and ``next_eigenvalues``).
        log_y: log-scale eigenvalue axis (non-positive values dropped).
        log_x: log-scale step axis.
        include_next: also draw λ_{k+1}…λ_{2k}.

    Returns:
        One axes with k lines (2k with ``include_next``).

    Raises:
        ValueError: if no record has eigenvalues.
    """
    recs = _ok(records)

    def columns(key):
        n = max((len(r[key]) for r in recs if isinstance(r.get(key), list)), default=0)
        cols = []
        for i in range(n):
            pts = [(r["step"], float(r[key][i])) for r in recs
                   if isinstance(r.get(key), list) and len(r[key]) > i and _finite(r[key][i])
                   and (not log_y or float(r[key][i]) > 0)]
            cols.append(tuple(map(np.asarray, zip(*pts, strict=True))) if pts else None)
        return cols

    top = columns("eigenvalues")
    if not any(c is not None for c in top):
        raise ValueError("eigenvalues_over_time: no record has 'eigenvalues'.")
    fig, axes = _figure(1, 1, width=5.4, height=3.6)
    ax = axes[0, 0]
    colors = _colors(len(top), "plasma")
    steps = []
    for i, (c, color) in enumerate(zip(top, colors, strict=True)):
        if c is not None:
            ax.plot(*c, "-o", ms=2.5, color=color, label=rf"$\lambda_{{{i + 1}}}$")
            steps.append(c[0])
    if include_next:
        nxt = columns("next_eigenvalues")
        label = rf"$\lambda_{{{len(top) + 1}}}\ldots\lambda_{{{len(top) + len(nxt)}}}$"
        for i, c in enumerate(nxt):
            if c is not None:
                ax.plot(*c, "--", color="0.55", lw=1, label=label if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("Hessian eigenvalue")
    if log_y:
        ax.set_yscale("log")
    if log_x:
        _set_log_x(ax, np.concatenate(steps))
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_title(f"top {len(top)} eigenvalues", fontsize=10)
    return fig


# --------------------------------------------------------------------------------------------
# Fig. 11: per-eigenvector overlaps with the gradient.


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
    by_step = {r["step"]: r for r in _ok(records) if isinstance(r.get("c2"), list) and r["c2"]}
    chosen = [s for s in steps if s in by_step]
    if not chosen:
        raise ValueError(f"fig11_eigenvector_overlaps: no record with 'c2' at steps "
                         f"{list(steps)} (have {sorted(by_step)}).")
    n = len(chosen)
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    fig, axes = _figure(nrows, ncols, width=3.3 * ncols, height=3.3 * nrows, sharey=sharey)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    for j, step in enumerate(chosen):
        ax = axes.ravel()[j]
        r = by_step[step]
        c2 = r["c2"]
        k = r.get("k") if isinstance(r.get("k"), int) else len(c2) // 2
        pts = [(i + 1, float(c)) for i, c in enumerate(c2) if _finite(c)]
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
        top = max((float(c) for s in chosen for c in by_step[s]["c2"] if _finite(c)), default=1.0)
        axes[0, 0].set_ylim(0, 1.45 * max(top, 1e-12))  # room for the sums' box
    return fig


# --------------------------------------------------------------------------------------------
# Table 1.


def _fmt(x, digits: int) -> str:
    return f"{float(x):.{digits}f}" if _finite(x) else "—"


def table1_markdown(rows: Sequence[Mapping[str, Any]], *, digits: int = 2) -> str:
    """Paper Table 1 as markdown: mean overlap(g, Hg) (eq. 3), ours against the paper's.

    Args:
        rows: dicts with ``"experiment"``, ``"ours"``, ``"paper"`` and optionally ``"std"``
            (written as ``ours ± std``), ``"train_loss"`` (mean full-data train loss over the
            same checkpoints: a run that did not train shows here) and ``"steps"`` (columns
            added when any row has them).
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
    header = (["Experiment", "ours", "paper"] + (["train loss"] if with_loss else [])
              + (["steps"] if with_steps else []))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        ours = _fmt(r.get("ours"), digits)
        if _finite(r.get("ours")) and _finite(r.get("std")):
            ours += f" ± {_fmt(r['std'], digits)}"
        cells = [str(r.get("experiment", "")).replace("|", r"\|"), ours,
                 _fmt(r.get("paper"), digits)]
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
        results: the dict of :func:`hessian_subspace.toy_model.run_paper_configs` (or its JSON).

    Returns:
        A figure with three axes.
    """
    analytic = results["analytic"]
    recs = [r for r in analytic["records"] if r.get("eta_t")]
    comp = {c["step"]: c for c in analytic.get("comparison", [])}
    fig, axes = _figure(1, 3, width=13.5, height=3.8)
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
    _panel_label(ax, 0, "k = 2, σ = 0, no bias")
    ax = axes[0, 1]
    runs = results.get("runs", [])
    colors = _colors(len(runs), "tab20")
    for color, run in zip(colors, runs, strict=True):
        pts = [(r["eta_t"], r["f_top"]) for r in run["records"]
               if r.get("eta_t") and _finite(r.get("f_top"))]
        if pts:
            x, y = zip(*pts, strict=True)
            ax.semilogx(x, y, "-", color=color, lw=1.2, label=run["name"])
    ax.set_xlabel(r"$\eta t$")
    ax.set_ylabel(r"$f_{top}$ (top-k subspace)")
    ax.set_ylim(-0.02, 1.02)
    _panel_label(ax, 1, "gradient in the top subspace")
    ax = axes[0, 2]
    for i, (color, run) in enumerate(zip(colors, runs, strict=True)):
        last = run["records"][-1]
        lam = np.sort(np.asarray([x for x in last["eigenvalues"] if _finite(x)], float))[::-1]
        k = run["config"]["num_classes"]
        lam = lam[: 2 * k] / lam[0]
        ax.semilogy(np.arange(1, lam.size + 1), np.clip(lam, 1e-12, None), "o-", ms=3,
                    color=color, lw=0.8, label=run["name"])
        del i
    ax.set_xlabel("eigenvalue index i (last step)")
    ax.set_ylabel(r"$\lambda_i / \lambda_1$")
    _panel_label(ax, 2, "top eigenvalues")
    handles, labels = axes[0, 1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=7)
    return fig


def training_curves(logs: Mapping[str, Sequence[Record]], *, window: int | None = None,
                    title: str = "") -> Figure:
    """Training loss and accuracy of several runs (e.g. SGD vs Dom-SGD vs Bulk-SGD).

    Args:
        logs: {label: train_log} (``train_log.jsonl`` records); "train" events give the
            mini-batch curves (running mean), "checkpoint" events the test loss/accuracy.
        window: running-mean window (default: a few percent of the steps).
        title: figure title.

    Returns:
        A figure with two axes: loss (log scale) and accuracy, against step.
    """
    fig, axes = _figure(1, 2, width=10.5, height=3.6)
    colors = _colors(len(logs), "tab10")
    drew = False
    for color, (label, log) in zip(colors, logs.items(), strict=True):
        train = [r for r in log if r.get("event") == "train" and _finite(r.get("loss"))]
        test = [r for r in log if r.get("event") == "checkpoint" and _finite(r.get("test_loss"))]
        if train:
            s = np.array([r["step"] for r in train])
            w = window or _default_window(len(train))
            axes[0, 0].plot(s, _running_mean(np.array([r["loss"] for r in train]), w),
                            color=color, label=f"{label} (train)")
            if all(_finite(r.get("accuracy")) for r in train):
                axes[0, 1].plot(s, _running_mean(np.array([r["accuracy"] for r in train]), w),
                                color=color)
            drew = True
        if test:
            s = np.array([r["step"] for r in test])
            axes[0, 0].plot(s, [r["test_loss"] for r in test], "o--", ms=3, color=color,
                            lw=0.8, label=f"{label} (test)")
            if all(_finite(r.get("test_accuracy")) for r in test):
                axes[0, 1].plot(s, [r["test_accuracy"] for r in test], "o--", ms=3,
                                color=color, lw=0.8)
            drew = True
    if not drew:
        raise ValueError("training_curves: no finite loss in any log.")
    axes[0, 0].set_yscale("log")
    axes[0, 0].set_xlabel("step")
    axes[0, 0].set_ylabel("loss")
    axes[0, 1].set_xlabel("step")
    axes[0, 1].set_ylabel("accuracy")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
