"""Seed-level statistics: the records of several runs (seeds) of one experiment, per step.

The Ritz-residual bounds in a record (``f_top_bound``, ``overlap_bound`` …) are *numerical*
error bars: how far the computed quantity can be from the exact one for that run. Two seeds of
the same experiment differ by far more (on Fashion-MNIST, 0.03–0.3 in f_top at the same step),
so a result is reported as a mean and a spread over seeds; :func:`aggregate_runs` makes them.

Example::

    runs = [analysis.read_results(f"results/seed_{s}") for s in (0, 1, 2)]
    for r in analysis.aggregate_runs(runs):
        f = r["f_top"]
        print(r["step"], f"{f['mean']:.3f} ± {f['std']:.3f} (min {f['min']:.3f})")
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

STATS = ("mean", "std", "min", "max", "n")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def summarize(values: Sequence[float]) -> dict | None:
    """``{"mean", "std", "min", "max", "n"}`` of the finite numbers in ``values`` (``std``:
    the sample standard deviation, ddof = 1; 0 for one value), or None if there are none."""
    xs = np.asarray([float(v) for v in values if v is not None and math.isfinite(float(v))])
    if xs.size == 0:
        return None
    return dict(mean=float(xs.mean()), std=float(xs.std(ddof=1)) if xs.size > 1 else 0.0,
                min=float(xs.min()), max=float(xs.max()), n=int(xs.size))


def _combine(values: list) -> Any:
    """The statistics of one field over runs: numbers → :func:`summarize`; equal-length lists
    of numbers → the statistics elementwise (a dict of lists); dicts → recursively, key by key;
    anything else → the value if every run has the same one, else left out (``_MISSING``)."""
    present = [v for v in values if v is not None]
    if not present:
        return _MISSING
    if all(_is_number(v) for v in present):
        return summarize(present)
    if all(isinstance(v, Mapping) for v in present):
        keys = [k for k in present[0] if all(k in v for v in present)]
        out = {k: _combine([v[k] for v in present]) for k in keys}
        return {k: v for k, v in out.items() if v is not _MISSING}
    if all(isinstance(v, (list, tuple)) for v in present):
        lengths = {len(v) for v in present}
        if len(lengths) == 1 and all(_is_number(x) or x is None for v in present for x in v):
            per = [summarize([v[i] for v in present]) for i in range(lengths.pop())]
            return {s: [None if p is None else p[s] for p in per] for s in STATS}
    first = present[0]
    return first if all(v == first for v in present) else _MISSING


_MISSING = object()


# Record fields that describe a run rather than measure it: kept when every run has the same
# value, left out otherwise (never averaged).
METADATA = ("k", "config", "versions", "precision", "hessian", "dtype", "curvature", "status",
            "processes", "block")


def aggregate_runs(runs: Sequence[Sequence[Mapping]], *, min_runs: int | None = None,
                   metadata: Sequence[str] = METADATA) -> list[dict]:
    """Per-step mean and spread of every quantity over several runs of one experiment.

    Args:
      runs: one sequence of records per run (e.g. :func:`read_results` of each seed's results
        directory); records whose ``status`` is not "ok" are left out.
      min_runs: keep the steps that at least this many runs have an ok record of (default:
        all of them).
      metadata: fields kept only when equal in every run (the config, which differs in its
        seed, is left out).

    Returns:
      One dict per kept step, in step order: ``step``, ``num_runs``, and for every field the
      runs share: a number becomes ``{"mean", "std", "min", "max", "n"}`` (std with ddof = 1),
      an equal-length list of numbers (eigenvalues, ``c2``) the same statistics as lists, a
      dict (``subspace_overlap``) the same recursively; other fields are kept when every run
      has the same value (``k``) and left out otherwise.
    """
    runs = [[r for r in records if r.get("status", "ok") == "ok"] for records in runs]
    if not runs:
        raise ValueError("`runs` is empty; give one sequence of records per run")
    min_runs = len(runs) if min_runs is None else int(min_runs)
    if not 1 <= min_runs <= len(runs):
        raise ValueError(f"`min_runs` must be in [1, {len(runs)}], got {min_runs}")
    by_step = [{int(r["step"]): r for r in records} for records in runs]
    steps = sorted({s for d in by_step for s in d})
    out = []
    for step in steps:
        recs = [d[step] for d in by_step if step in d]
        if len(recs) < min_runs:
            continue
        fields = [k for k in recs[0] if k != "step" and all(k in r for r in recs)]
        row: dict[str, Any] = dict(step=step, num_runs=len(recs))
        for key in fields:
            if key in metadata:
                if all(r[key] == recs[0][key] for r in recs):
                    row[key] = recs[0][key]
                continue
            value = _combine([r[key] for r in recs])
            if value is not _MISSING:
                row[key] = value
        out.append(row)
    return out


def mean_and_spread(rows: Sequence[Mapping], key: str) -> tuple[np.ndarray, ...]:
    """``(steps, mean, std, min, max)`` arrays of a scalar field of :func:`aggregate_runs`
    output (steps without it are skipped)."""
    keep = [r for r in rows if isinstance(r.get(key), Mapping) and "mean" in r[key]]
    arrays = [np.asarray([r["step"] for r in keep], float)]
    arrays += [np.asarray([r[key][s] for r in keep], float) for s in ("mean", "std", "min",
                                                                      "max")]
    return tuple(arrays)
