"""Fig. 1 and Fig. 12 (f_top against training time, with loss and accuracy) and training
curves of several runs."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from hessian_subspace.paper.figures import _common as _c
from hessian_subspace.paper.figures._common import Record


def fig1_ftop(records: Sequence[Record], train_log: Sequence[Record] | None = None,
              title: str = "", *, log_x: bool = False, window: int | None = None,
              seeds: Sequence[Sequence[Record]] | None = None) -> Figure:
    """Paper Fig. 1: f_top = ‖P_top g‖² / ‖g‖² (eq. 2) and the training curves.

    Panel (a): f_top of the full-data gradient against step, with its Ritz-residual bound
    (``f_top_bound``: the *numerical* error of the computed subspace, drawn as error bars), and
    the mean f_top of the fixed mini-batch gradients (``f_top_minibatch_mean``) where the
    records have it. Panel (b), when any loss is available: training loss (left axis) and
    accuracy (right axis, when present) against step, from the ``"train"`` events of
    ``train_log`` smoothed by a trailing running mean (the raw mini-batch values are drawn
    faintly behind), or else from the records' full-data ``train_loss`` / ``train_accuracy``.

    With ``seeds`` (the records of several runs that differ only in their seed), every curve
    is the mean over the seeds at the steps they share, with a ±std band and dotted min–max
    lines; panel (b) then uses the records' full-data loss and accuracy.

    Args:
        records: pipeline records (failed ones and ``None`` values are skipped); ignored when
            ``seeds`` is given.
        train_log: optional :func:`hessian_subspace.training.read_train_log` output.
        title: figure title.
        log_x: log-scale step axes (symlog when step 0 is present).
        window: running-mean window in steps for the train log; default ``len / 25``
            clipped to [1, 100].
        seeds: optional records of each seed's run.

    Returns:
        The figure: 1 axes (no losses anywhere), 2 (loss only) or 3 (loss + twin accuracy axis).

    Raises:
        ValueError: if no record has a finite ``f_top``.
    """
    runs = [_c.ok(r) for r in seeds] if seeds else [_c.ok(records)]

    def stats(key, source=None):
        return _c.stack_seeds([_c.series(r, key) for r in (source or runs)])

    top, mb = stats("f_top"), stats("f_top_minibatch_mean")
    if top[0].size == 0 and mb[0].size == 0:
        raise ValueError("fig1_ftop: no record has a finite 'f_top' (run the f_top transform).")

    # Loss/accuracy source: the train log if it has train events (one run), else the records.
    raw_loss = raw_acc = None
    events = [e for e in (train_log or []) if isinstance(e, Mapping)
              and e.get("event", "train") == "train" and _c.finite(e.get("step"))]
    if events and not seeds:
        events = sorted(events, key=lambda e: e["step"])
        s_loss, loss = _c.series(events, "loss")
        s_acc, acc = _c.series(events, "accuracy")
        w = window or _c.default_window(len(events))
        raw_loss, raw_acc = (s_loss, loss), (s_acc, acc)
        loss_stats = (s_loss, _c.running_mean(loss, w), None, None, None, 1)
        acc_stats = (s_acc, _c.running_mean(acc, w), None, None, None, 1)
        source = f"mini-batch, running mean of {w}" if w > 1 else "mini-batch"
    else:
        loss_stats, acc_stats = stats("train_loss"), stats("train_accuracy")
        source = "full training set"
    has_loss = loss_stats[0].size > 0 or acc_stats[0].size > 0

    fig, axes = _c.figure(1, 2 if has_loss else 1)
    ax = axes[0, 0]
    if top[0].size:
        _c.draw_band(ax, *top, color="C0", label="full-data gradient")
        bound = stats("f_top_bound")
        if bound[0].size:
            at = dict(zip(top[0].tolist(), top[1].tolist(), strict=True))
            xs = [x for x in bound[0].tolist() if x in at]
            if xs:
                ax.errorbar(xs, [at[x] for x in xs],
                            yerr=[dict(zip(bound[0].tolist(), bound[4].tolist(),
                                           strict=True))[x] for x in xs],
                            fmt="none", ecolor="k", elinewidth=0.8, capsize=2,
                            label="Ritz-residual bound (numerical error only)")
    if mb[0].size:
        _c.draw_band(ax, *mb, color="C1", label="mini-batch gradients (mean)", marker="--s")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel(r"$f_{\rm top} = \|P_{\rm top}\, g\|^2 / \|g\|^2$")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7, framealpha=0.85)
    _c.panel_label(ax, 0, "gradient in the top subspace")
    if len(runs) > 1:
        fig.supxlabel(_c.seed_note(len(runs))[2:], fontsize=8)
    if log_x:
        _c.set_log_x(ax, np.concatenate([top[0], mb[0]]))

    if has_loss:
        ax = axes[0, 1]
        handles = []
        if loss_stats[0].size:
            if raw_loss is not None:
                ax.plot(*raw_loss, color="C3", alpha=0.2, lw=0.6)
            handles.append(_band_or_line(ax, loss_stats, "C3", "loss"))
            ax.set_ylabel("train loss", color="C3")
            ax.tick_params(axis="y", colors="C3")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if log_x:
            _c.set_log_x(ax, np.concatenate([loss_stats[0], acc_stats[0]]))
        if acc_stats[0].size:
            ax2 = ax.twinx()
            if raw_acc is not None:
                ax2.plot(*raw_acc, color="C2", alpha=0.2, lw=0.6)
            handles.append(_band_or_line(ax2, acc_stats, "C2", "accuracy"))
            ax2.set_ylabel("train accuracy", color="C2")
            ax2.tick_params(axis="y", colors="C2")
            ax2.set_ylim(-0.02, 1.02)
        ax.legend(handles=handles, loc="best", fontsize=8, framealpha=0.85)
        _c.panel_label(ax, 1, f"training ({source})")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _band_or_line(ax, stats, color, label):
    x, mean, std, lo, hi, n = stats
    if std is None:
        return ax.plot(x, mean, color=color, label=label)[0]
    return _c.draw_band(ax, x, mean, std, lo, hi, n, color=color, label=label, marker="-")


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
    fig, axes = _c.figure(1, 1, width=5.6, height=3.6)
    ax = axes[0, 0]
    all_steps = []
    colors = (_c.colors(len(runs), "turbo") if len(runs) > 10
              else [f"C{i}" for i in range(len(runs))])
    for (label, recs), color in zip(runs.items(), colors, strict=True):
        s, f = _c.series(_c.ok(recs), "f_top")
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
        _c.set_log_x(ax, np.concatenate(all_steps))
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_title(title or "gradient in the top subspace, by variant", fontsize=10)
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
    fig, axes = _c.figure(1, 2, width=10.5, height=3.6)
    colors = _c.colors(len(logs), "tab10")
    drew = False
    for color, (label, log) in zip(colors, logs.items(), strict=True):
        train = [r for r in log if r.get("event") == "train" and _c.finite(r.get("loss"))]
        test = [r for r in log if r.get("event") == "checkpoint" and _c.finite(r.get("test_loss"))]
        if train:
            s = np.array([r["step"] for r in train])
            w = window or _c.default_window(len(train))
            axes[0, 0].plot(s, _c.running_mean(np.array([r["loss"] for r in train]), w),
                            color=color, label=f"{label} (train)")
            if all(_c.finite(r.get("accuracy")) for r in train):
                axes[0, 1].plot(s, _c.running_mean(np.array([r["accuracy"] for r in train]), w),
                                color=color)
            drew = True
        if test:
            s = np.array([r["step"] for r in test])
            axes[0, 0].plot(s, [r["test_loss"] for r in test], "o--", ms=3, color=color,
                            lw=0.8, label=f"{label} (test)")
            if all(_c.finite(r.get("test_accuracy")) for r in test):
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
