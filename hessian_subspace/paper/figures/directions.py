"""Where the loss goes along chosen directions (beyond the paper): the loss change of the
optimizer's step split into its top-k and bulk parts (Song, Ahn & Yun 2024), and loss
landscapes along top, bulk, random and gradient directions (Li et al. 2018).

Inputs are the records of :func:`hessian_subspace.analysis.loss_decrease` and
:func:`hessian_subspace.analysis.loss_landscape` (``loss_decrease``, ``loss_landscape``) and
the surfaces the latter stores.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from hessian_subspace.paper.figures import _common as _c
from hessian_subspace.paper.figures._common import Record

PARTS = (("full", "the step u", "k"), ("top", r"$P_{\rm top}u$", "C3"),
         ("bulk", r"$P_{\rm bulk}u$", "C0"))


def update_kind(records: Sequence[Record]) -> str | None:
    """The update the records measure: the optimizer's own ``step`` when there, else ``gd``."""
    kinds = {k for r in _c.ok(records) for k in (r.get("loss_decrease") or {})}
    return "step" if "step" in kinds else ("gd" if "gd" in kinds else None)


def decrease_series(records: Sequence[Record], kind: str, key: str
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(steps, value) of ``loss_decrease[kind][key]``, skipping missing and non-finite ones."""
    pts = [(r["step"], float(r["loss_decrease"][kind][key])) for r in _c.ok(records)
           if isinstance((r.get("loss_decrease") or {}).get(kind), dict)
           and _c.finite(r["loss_decrease"][kind].get(key))]
    if not pts:
        return np.zeros(0), np.zeros(0)
    s, v = zip(*pts, strict=True)
    return np.asarray(s, float), np.asarray(v, float)


def longest_window(steps: np.ndarray, minimum: int = 10) -> tuple[int, int] | None:
    """(first, last) of the longest run of consecutive steps, cut to an even number of steps
    (a period-2 oscillation then sums to about 0, as in :func:`summaries.decrease_numbers`),
    if it has at least ``minimum``."""
    best, start = None, 0
    for j in range(1, len(steps) + 1):
        if j == len(steps) or steps[j] != steps[j - 1] + 1:
            n = (j - start) - (j - start) % 2
            if n >= minimum and (best is None or n > best[1] - best[0] + 1):
                best = (int(steps[start]), int(steps[start]) + n - 1)
            start = j
    return best


def loss_decrease(runs: Mapping[str, Sequence[Record]], *, title: str = "") -> Figure:
    """Per run (a row): (a) the loss change of one step u and of its top-k and bulk parts
    (measured: solid; second-order prediction gᵀd + ½dᵀHd: dashed), symlog scale; (b) the
    same at every step of the longest window of consecutive analysed steps, with their sums
    (without such a window: the bulk's share bulk / (top + bulk) per step); (c) the fraction
    of the step's squared norm in the top subspace, ‖P_top u‖²/‖u‖².

    Raises:
        ValueError: if no run has a ``loss_decrease`` record.
    """
    rows = [(label, recs, update_kind(recs)) for label, recs in runs.items()]
    rows = [row for row in rows if row[2] is not None]
    if not rows:
        raise ValueError("loss_decrease: no run has loss_decrease records")
    fig, axes = _c.figure(len(rows), 3, width=14.0, height=3.6 * len(rows))
    for i, (label, recs, kind) in enumerate(rows):
        ax = axes[i, 0]
        for part, text, color in PARTS:
            s, v = decrease_series(recs, kind, part)
            ax.plot(s, v, "-o", ms=2.5, lw=1.2, color=color, label=f"ΔL of {text}")
            s, v = decrease_series(recs, kind, f"predicted_{part}")
            ax.plot(s, v, "--", lw=0.9, color=color)
        s, v = decrease_series(recs, kind, "roundoff")
        if s.size:
            ax.set_yscale("symlog", linthresh=max(float(np.max(v)) * 10, 1e-7))
        else:
            ax.set_yscale("symlog", linthresh=1e-6)
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel("step")
        ax.set_ylabel("loss change over one step")
        what = "optimizer's step u" if kind == "step" else r"step $u = -\eta g$"
        _c.panel_label(ax, 3 * i, f"{label}: {what}\n(dashed: 2nd-order prediction)")
        ax.legend(fontsize=7, loc="lower right")
        ax = axes[i, 1]
        window = longest_window(decrease_series(recs, kind, "full")[0])
        if window is not None:  # every step of a window: the oscillation and the drift
            for part, _text, color in PARTS:
                s, v = decrease_series(recs, kind, part)
                keep = (s >= window[0]) & (s <= window[1])
                ax.plot(s[keep], v[keep], "-o", ms=2.5, lw=1.0, color=color,
                        label=f"Σ {v[keep].sum():+.3f}")
            ax.axhline(0.0, color="grey", lw=0.6)
            ax.set_ylabel("loss change of each step")
            ax.legend(fontsize=7)
            _c.panel_label(ax, 3 * i + 1, f"every step {window[0]}-{window[1]}")
        else:
            s, v = decrease_series(recs, kind, "bulk_share")
            ax.plot(s, v, "-o", ms=2.5, color="C0")
            ax.axhline(1.0, color="grey", ls=":", lw=0.8)
            ax.axhline(0.0, color="grey", lw=0.6)
            ax.set_ylabel("bulk / (top + bulk)")
            _c.panel_label(ax, 3 * i + 1, "bulk's share of the decrease")
        ax.set_xlabel("step")
        ax = axes[i, 2]
        s, v = decrease_series(recs, kind, "top_fraction")
        ax.plot(s, v, "-o", ms=2.5, color="C3")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step")
        ax.set_ylabel(r"$\|P_{\rm top}u\|^2/\|u\|^2$")
        _c.panel_label(ax, 3 * i + 2, "step's norm² in the top subspace")
        for ax in axes[i]:
            ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _slice_color(name: str, shade: int) -> str:
    family = {"top": "Reds", "bulk": "Blues", "random": "Greys", "gradient": "Greens"}
    for prefix, cmap in family.items():
        if name.startswith(prefix):
            import matplotlib
            return matplotlib.colormaps[cmap](0.85 - 0.25 * shade)
    return "k"


def landscape(records: Sequence[Record], surfaces: Mapping[int, Mapping[str, np.ndarray]]
              | None = None, *, title: str = "") -> Figure:
    """Per analysed step (a row): (a) 1-D slices L(θ + t d) − L(θ) along the top, bulk,
    random and gradient directions (solid), with the quadratic model t gᵀd + ½t² dᵀHd
    (dashed); (b) the same near t = 0, where the two must agree; (c, d) the first two 2-D
    surfaces stored at that step (contours), when given (``surfaces[step]``: the arrays of
    ``store.stored(NAME_surfaces, step)``).

    Raises:
        ValueError: if no record has ``loss_landscape``.
    """
    recs = [r for r in _c.ok(records) if isinstance(r.get("loss_landscape"), dict)]
    if not recs:
        raise ValueError("landscape: no record has loss_landscape")
    surfaces = surfaces or {}
    nsurf = max((len([k for k in surfaces.get(r["step"], {}) if "__" in k]) for r in recs),
                default=0)
    ncols = 2 + min(nsurf, 2)
    fig, axes = _c.figure(len(recs), ncols, width=4.2 * ncols, height=3.6 * len(recs))
    for i, r in enumerate(recs):
        land = r["loss_landscape"]
        t = np.asarray(land["t"], float)
        counts: dict[str, int] = {}
        mid, half = len(t) // 2, max(2, (len(t) - 1) // 10)
        zoom = slice(mid - half, mid + half + 1)
        for name, s in land["slices"].items():
            family = name.rstrip("0123456789")
            shade = counts.get(family, 0)
            counts[family] = shade + 1
            color = _slice_color(name, shade)
            change = np.asarray(s["change"], float)
            model = t * s["slope"] + 0.5 * t**2 * s["curvature"]
            label = f"{name} (dᵀHd = {s['curvature']:.3g})"
            axes[i, 0].plot(t, change, "-", color=color, lw=1.3, label=label)
            axes[i, 0].plot(t, model, "--", color=color, lw=0.8)
            axes[i, 1].plot(t[zoom], change[zoom], "-o", ms=2.5, color=color, lw=1.2)
            axes[i, 1].plot(t[zoom], model[zoom], "--", color=color, lw=0.8)
        norm = land.get("normalization", "unit")
        axes[i, 0].set_yscale("symlog", linthresh=max(abs(land.get("loss", 1.0)) * 1e-2, 1e-6))
        axes[i, 0].set_xlabel(f"t (d: {norm} norm)")
        axes[i, 0].set_ylabel(r"$L(\theta + t d) - L(\theta)$")
        _c.panel_label(axes[i, 0], ncols * i, f"step {r['step']}: slices; dashed: quadratic")
        axes[i, 0].legend(fontsize=6, loc="upper center", ncol=2)
        axes[i, 1].set_xlabel("t")
        _c.panel_label(axes[i, 1], ncols * i + 1, "near t = 0")
        arrays = surfaces.get(r["step"], {})
        pairs = [k for k in arrays if "__" in k][:2]
        for j, pair in enumerate(pairs):
            ax = axes[i, 2 + j]
            grid = np.asarray(arrays["t"], float)
            z = np.asarray(arrays[pair], float)
            a, b = pair.split("__")
            levels = np.unique(np.quantile(z, np.linspace(0.0, 1.0, 15)))
            cs = ax.contourf(grid, grid, z.T, levels=levels if levels.size > 1 else 10,
                             cmap="viridis")
            fig.colorbar(cs, ax=ax, shrink=0.8)
            ax.plot([0], [0], "w+", ms=8)
            ax.set_xlabel(a)
            ax.set_ylabel(b)
            _c.panel_label(ax, ncols * i + 2 + j, f"surface over ({a}, {b})")
        for ax in axes[i, :2]:
            ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
