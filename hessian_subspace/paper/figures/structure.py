"""Why k, and which subspace low-rank optimisers use (beyond the paper): the class structure of
the top subspace (Papyan 2019, 2020) and GaLore's gradient projectors against the Hessian's
blocks (Zhao et al. 2024).

Inputs are the records of :func:`hessian_subspace.analysis.class_mean_subspace` and
:func:`hessian_subspace.analysis.galore_subspace`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from hessian_subspace.paper.figures import _common as _c
from hessian_subspace.paper.figures._common import Record

SPANS = (("class_gradients", r"class-mean gradients $g_c$", "C3", "-o"),
         ("G1", r"$G_1$ (class means $\delta_c$)", "C0", "-s"),
         ("G0", r"$G_0$ ($\delta_{c,c}$)", "C2", "--"),
         ("G12", r"$G_{1+2}$ (all $C^2$ means), top k", "C4", ":"))


def _nested(records: Sequence[Record], key: str, *path) -> tuple[np.ndarray, np.ndarray]:
    pts = []
    for r in _c.ok(records):
        v = r.get(key)
        for p in path:
            v = v.get(p) if isinstance(v, Mapping) else None
        if _c.finite(v):
            pts.append((r["step"], float(v)))
    if not pts:
        return np.zeros(0), np.zeros(0)
    s, v = zip(*pts, strict=True)
    return np.asarray(s, float), np.asarray(v, float)


def class_structure(runs: Mapping[str, Sequence[Record]], *, title: str = "") -> Figure:
    """Per run (a row): (a) at the last analysed step, the top eigenvalues of the Hessian and of
    Papyan's parts G_1 (class means), G_2 (cross-class) and G_{1+2}; (b) over training, the
    fraction of the Hessian's top-k subspace inside each span (class-mean gradients, G_1,
    G_0, G_{1+2}); (c) the same for the Gauss-Newton matrix's top-k.

    Raises:
        ValueError: if no run has ``class_mean_subspace`` records.
    """
    rows = [(label, [r for r in _c.ok(recs) if isinstance(r.get("class_mean_subspace"), dict)])
            for label, recs in runs.items()]
    rows = [row for row in rows if row[1]]
    if not rows:
        raise ValueError("class_structure: no run has class_mean_subspace records")
    fig, axes = _c.figure(len(rows), 3, width=14.0, height=3.8 * len(rows))
    for i, (label, recs) in enumerate(rows):
        last = recs[-1]
        cms = last["class_mean_subspace"]
        ax = axes[i, 0]
        lam = np.asarray(last.get("eigenvalues") or [], float)
        ax.plot(np.arange(1, lam.size + 1), lam, "ko-", ms=4, label="Hessian")
        for part, text, style in (("G1", r"$G_1$ class means", "C0s-"),
                                  ("G2", r"$G_2$ cross-class", "C1^-"),
                                  ("G12", r"$G_{1+2}$", "C4v:")):
            vals = np.asarray(cms["eigenvalues"].get(part) or [], float)
            vals = vals[vals > 0]
            ax.plot(np.arange(1, vals.size + 1), vals, style, ms=4, label=text)
        k = int(last.get("k") or cms.get("classes") or 1)
        ax.axvline(k + 0.5, color="grey", ls=":", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("index i")
        ax.set_ylabel("eigenvalue")
        _c.panel_label(ax, 3 * i, f"{label}: spectra at step {last['step']}")
        ax.legend(fontsize=7)
        for j, matrix in ((1, "hessian"), (2, "ggn")):
            ax = axes[i, j]
            for span, text, color, style in SPANS:
                s, v = _nested(recs, "class_mean_subspace", matrix, span, "captured")
                if s.size:
                    ax.plot(s, v, style, color=color, ms=3, lw=1.2, label=text)
            ax.set_ylim(-0.02, 1.02)
            _c.set_log_x(ax, np.asarray([r["step"] for r in recs], float))
            ax.set_xlabel("step")
            ax.set_ylabel(r"Tr$(P_{\rm span}P_{\rm top})/k$")
            what = "Hessian" if matrix == "hessian" else "Gauss-Newton"
            _c.panel_label(ax, 3 * i + j, f"share of the {what}'s top-k in each span")
            if j == 1:
                ax.legend(fontsize=7)
        for ax in axes[i]:
            ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def galore(runs: Mapping[str, Sequence[Record]], *, title: str = "") -> Figure:
    """Per run (a row), per weight matrix (a colour): (a) the fraction of the Hessian block's
    top-r eigenspace inside GaLore's subspace (solid) against a random projector's (dotted);
    (b) eq. 5 between GaLore's projector and the block's top-r singular directions on the same
    side (solid), and the gradient energy rank r keeps (dashed); (c) how stale the kept
    projector is: eq. 5 between it and the current one, against steps since its refresh.

    Raises:
        ValueError: if no run has ``galore_subspace`` records.
    """
    rows = [(label, [r for r in _c.ok(recs) if isinstance(r.get("galore_subspace"), dict)])
            for label, recs in runs.items()]
    rows = [row for row in rows if row[1]]
    if not rows:
        raise ValueError("galore: no run has galore_subspace records")
    fig, axes = _c.figure(len(rows), 3, width=14.0, height=3.8 * len(rows))
    for i, (label, recs) in enumerate(rows):
        layers = list(recs[-1]["galore_subspace"]["layers"])
        if len(layers) <= 10:
            colors = [f"C{j}" for j in range(len(layers))]
        else:  # one colour per matrix
            import matplotlib
            colors = [matplotlib.colormaps["tab20"](j % 20) for j in range(len(layers))]
        rank = recs[-1]["galore_subspace"].get("rank")
        steps = np.asarray([r["step"] for r in recs], float)
        for color, layer in zip(colors, layers, strict=True):
            s, v = _nested(recs, "galore_subspace", "layers", layer, "captured")
            axes[i, 0].plot(s, v, "-o", ms=3, color=color, label=layer)
            s, v = _nested(recs, "galore_subspace", "layers", layer, "captured_random")
            axes[i, 0].plot(s, v, ":", color=color, lw=0.9)
            s, v = _nested(recs, "galore_subspace", "layers", layer, "side_overlap")
            axes[i, 1].plot(s, v, "-o", ms=3, color=color)
            s, v = _nested(recs, "galore_subspace", "layers", layer, "gradient_energy")
            axes[i, 1].plot(s, v, "--", color=color, lw=0.9)
            pts = [(r["galore_subspace"]["layers"][layer]["stale"]["steps"],
                    r["galore_subspace"]["layers"][layer]["stale"]["overlap"])
                   for r in recs if "stale" in r["galore_subspace"]["layers"].get(layer, {})]
            if pts:
                x, y = zip(*pts, strict=True)
                axes[i, 2].plot(x, y, "o", ms=4, color=color)
        for ax in axes[i, :2]:
            ax.set_ylim(-0.02, 1.02)
            _c.set_log_x(ax, steps)
            ax.set_xlabel("step")
        axes[i, 0].set_ylabel("share of the block's top-r eigenspace")
        _c.panel_label(axes[i, 0], 3 * i, f"{label}: GaLore, r = {rank}\n"
                       "block's top-r inside its subspace; dotted: random")
        axes[i, 0].legend(fontsize=5 if len(layers) > 6 else 6, ncol=2 if len(layers) > 6 else 1,
                          loc="lower left")
        axes[i, 1].set_ylabel("overlap (eq. 5); dashed: gradient energy")
        _c.panel_label(axes[i, 1], 3 * i + 1, "projector vs block's top-r directions\n")
        axes[i, 2].set_ylim(-0.02, 1.02)
        axes[i, 2].set_xlabel("steps since the projector's refresh")
        axes[i, 2].set_ylabel("overlap with the current projector")
        _c.panel_label(axes[i, 2], 3 * i + 2, "staleness\n")
        for ax in axes[i]:
            ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
