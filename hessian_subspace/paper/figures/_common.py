"""Shared helpers of the figure modules: record filtering, panels, colours, and ``save``."""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from hessian_subspace import _io

Record = Mapping[str, Any]

_PANEL_W, _PANEL_H = 4.2, 3.2  # inches per panel


# --------------------------------------------------------------------------------------------
# Helpers.


def ok(records: Iterable[Record]) -> list[Record]:
    """The ``status == "ok"`` records (missing status counts as ok), sorted by step."""
    out = [r for r in records if isinstance(r, Mapping) and r.get("status", "ok") == "ok"
           and finite(r.get("step"))]
    return sorted(out, key=lambda r: r["step"])


def finite(x) -> bool:
    if x is None or isinstance(x, bool):
        return False
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def series(records: Sequence[Record], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a scalar key, skipping records where it is missing or non-finite."""
    pts = [(r["step"], float(r[key])) for r in records if finite(r.get(key))]
    if not pts:
        return np.zeros(0), np.zeros(0)
    s, v = zip(*pts, strict=True)
    return np.asarray(s, float), np.asarray(v, float)


def record_k(records: Sequence[Record]) -> int | None:
    for r in records:
        if isinstance(r.get("k"), int) and r["k"] > 0:
            return int(r["k"])
    for r in records:
        if isinstance(r.get("eigenvalues"), list) and r["eigenvalues"]:
            return len(r["eigenvalues"])
    return None


def figure(nrows: int, ncols: int, *, width: float | None = None,
            height: float | None = None, **subplot_kw) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width or _PANEL_W * ncols, height or _PANEL_H * nrows),
                 layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    return fig, axes


def panel_label(ax, i: int, text: str = "") -> None:
    label = f"({'abcdefghijklmnopqrstuvwxyz'[i % 26]})"
    ax.set_title(f"{label} {text}".strip(), loc="left", fontsize=10)


def colors(n: int, cmap: str = "viridis") -> list:
    if n <= 0:
        return []
    cm = colormaps[cmap]
    if n == 1:
        return [cm(0.1)]
    return [cm(0.9 * i / (n - 1)) for i in range(n)]


def set_log_x(ax, steps: np.ndarray) -> None:
    """Log-scale step axis; symlog when step 0 is plotted (linear up to 1, log above)."""
    if steps.size and np.min(steps) <= 0:
        ax.set_xscale("symlog", linthresh=1.0, linscale=0.5)
        ax.set_xlim(left=0, right=max(float(np.max(steps)) * 1.3, 2.0))
    else:
        ax.set_xscale("log")


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing running mean; the first ``window - 1`` points average what is available."""
    if window <= 1 or values.size == 0:
        return values
    c = np.cumsum(np.insert(values, 0, 0.0))
    n = np.arange(1, values.size + 1)
    lo = np.maximum(n - window, 0)
    return (c[n] - c[lo]) / (n - lo)


def default_window(n: int) -> int:
    return int(min(100, max(1, round(n / 25))))


def overlap_table(records: Sequence[Record], t1: int, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(t2 − t1, overlap) for every record t2 > t1 that stores ``subspace_overlap[t1][key]``."""
    pts = []
    for r in records:
        so = r.get("subspace_overlap")
        if not isinstance(so, Mapping) or r["step"] <= t1:
            continue
        entry = so.get(str(t1))
        if isinstance(entry, Mapping) and finite(entry.get(key)):
            pts.append((r["step"] - t1, float(entry[key])))
    if not pts:
        return np.zeros(0), np.zeros(0)
    d, v = zip(*pts, strict=True)
    return np.asarray(d, float), np.asarray(v, float)


def stack_seeds(curves: Sequence[tuple[np.ndarray, np.ndarray]]
                ) -> tuple[np.ndarray, ...]:
    """``(x, mean, std, min, max, n)`` over several runs' ``(x, y)`` curves, at the x that
    every curve has (std: ddof = 1; 0 for one curve)."""
    curves = [c for c in curves if c[0].size]
    if not curves:
        return tuple(np.zeros(0) for _ in range(5)) + (0,)
    common = sorted(set.intersection(*(set(c[0].tolist()) for c in curves)))
    ys = np.stack([np.asarray([dict(zip(c[0].tolist(), c[1].tolist(), strict=True))[x]
                               for x in common]) for c in curves])
    std = ys.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(common))
    return (np.asarray(common, float), ys.mean(0), std, ys.min(0), ys.max(0), len(curves))


def draw_band(ax, x, mean, std, lo, hi, n: int, *, color, label: str, marker: str = "-o",
              minmax: bool = True):
    """A mean curve with a ±std band and thin dotted min–max lines (for n > 1 runs; say so
    with :func:`seed_note`)."""
    handle, = ax.plot(x, mean, marker, ms=3, color=color, label=label)
    if n > 1:
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.25, lw=0)
        if minmax:
            ax.plot(x, lo, ":", color=color, lw=0.8)
            ax.plot(x, hi, ":", color=color, lw=0.8)
    return handle


def seed_note(n: int) -> str:
    """What the bands of :func:`draw_band` are, for a panel title ("" for one run)."""
    return f"; mean of {n} seeds, band ± std, dotted min–max" if n > 1 else ""


def reference_steps(records: Sequence[Record]) -> set[int]:
    out = set()
    for r in records:
        so = r.get("subspace_overlap")
        if isinstance(so, Mapping):
            out.update(int(t) for t in so if str(t).lstrip("-").isdigit())
    return out


# --------------------------------------------------------------------------------------------
# Output.


def save(fig: Figure, path: str) -> tuple[str, str]:
    """Writes ``path.png`` (150 dpi) and ``path.pdf``, each atomically.

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
    out = []
    for fmt in ("png", "pdf"):
        final = f"{path}.{fmt}"
        _io.atomic_write(final, lambda f, fmt=fmt: fig.savefig(f, format=fmt, dpi=150))
        out.append(final)
    return out[0], out[1]
