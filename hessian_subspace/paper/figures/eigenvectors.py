"""Figs. 6-7: the top eigenvector's components, layer by layer."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from hessian_subspace.paper.figures import _common as _c


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
    fig, axes = _c.figure(n, 1, width=8.0, height=max(2.0 * n, 2.6), sharex=True)
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
