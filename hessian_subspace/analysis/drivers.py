"""Drivers: when checkpoints are analysed. :func:`run` streams a checkpoint source (a finished
directory, or a live one with ``watch=True``) through an
:class:`~hessian_subspace.analysis.Analyzer` (which computes and stores one checkpoint); the
live hook is the analyzer itself, called from a training loop.

A run fails loudly rather than look like success: a source without checkpoints is a
``FileNotFoundError`` naming it, and checkpoints that failed are listed in one
:class:`FailedStepsError` once every other checkpoint has been analysed.
"""

from __future__ import annotations

import time
from typing import Any, Iterable

from absl import logging

from hessian_subspace.analysis import checks
from hessian_subspace.analysis import sources as sources_lib


class FailedStepsError(RuntimeError):
    """:meth:`Analyzer.run` analysed every checkpoint it could, and some failed: ``failures``
    is ``{step: reason}``, ``records`` every record the run wrote (failures included).
    ``run(..., allow_failures=True)`` returns them instead."""

    def __init__(self, message: str, failures: dict[int, str], records: list[dict]):
        super().__init__(message)
        self.failures, self.records = failures, records


def run(analyzer, source: Any, *, steps: Iterable[int] | None = None, watch: bool = False,
        poll_seconds: float = 2.0, timeout_seconds: float = 600.0,
        final_step: int | None = None, allow_failures: bool = False) -> list[dict]:
    """Analyses the checkpoints of ``source`` in step order, reusing the records that match
    them (see :meth:`Analyzer.reusable`: every checkpoint is loaded and fingerprinted);
    ``analyzer.run(source, ...)`` calls it.

    Args:
      source: a checkpoint source (:func:`~hessian_subspace.analysis.orbax_checkpoints`,
        a training run's :func:`~hessian_subspace.checkpoints.run_checkpoints`, or
        anything with ``steps()`` and ``load(step)``), or ``{step: params}`` /
        ``{step: (params, state)}``.
      steps: only these steps (default: every scheduled one).
      watch: follow a live run: keep polling for new checkpoints (logging what it waits
        for) until ``final_step`` (or the source's ``final_step``, or every one of
        ``steps``) has been analysed; if nothing new appears for ``timeout_seconds``
        first, a ``TimeoutError`` is raised (the records written so far are in the store:
        :attr:`records`).
      poll_seconds: polling interval when watching.
      timeout_seconds: see ``watch``.
      final_step: the last step of a watched run.
      allow_failures: return the records even if some checkpoints failed (their records
        say why); by default the run goes on to every other checkpoint, then raises.

    Returns:
      The records written by this call (failures included with ``allow_failures``).

    Raises:
      FileNotFoundError: the source holds no checkpoint (a directory that does not exist
        or is empty, named), without ``watch``.
      ValueError: ``steps`` names a step the source has no checkpoint of (without
        ``watch``), or no checkpoint of the source is scheduled; before anything is
        analysed.
      StaleResultsError: a record of a step was computed from other inputs (see
        ``overwrite``).
      FailedStepsError: checkpoints failed (each step and its reason; after every other
        checkpoint was analysed), unless ``allow_failures``.
      TimeoutError: a watched run did not reach its last step within ``timeout_seconds``.
    """
    from tqdm import tqdm

    source = sources_lib.as_source(source)
    where = sources_lib.describe_location(source)
    wanted = None if steps is None else {checks.check_step(s) for s in steps}
    if not watch:
        available = set(source.steps())
        if not available:
            raise FileNotFoundError(f"no checkpoint to analyse: {where} holds none")
        if wanted is not None:
            missing = sorted(wanted - available)
            if missing:
                have = sorted(available)
                listed = (str(have) if len(have) <= 12 else
                          f"{len(have)} steps: {have[:5]} ... {have[-5:]}")
                raise ValueError(f"`steps`: no checkpoint at step(s) {missing}; {where} "
                                 f"has {listed}")
        elif not any(analyzer.scheduled(s) for s in available):
            raise ValueError(
                f"none of the {len(available)} checkpoints in {where} is scheduled "
                f"(every_steps={analyzer.schedule.every_steps}, "
                f"on_steps={sorted(analyzer.schedule.on_steps)}); "
                "nothing would be analysed")
    if final_step is None:
        final_step = getattr(source, "final_step", None)
    written: list[dict] = []
    checked = 0  # scheduled checkpoints of the source looked at (reused ones included)
    failures: dict[int, str] = {}
    bar = tqdm(desc="analyse", unit="ckpt", disable=not analyzer.progress)
    seen: set[int] = set()
    last_new, last_note = time.monotonic(), -float("inf")
    waiting = lambda: (f"steps {sorted(wanted - seen)}" if wanted is not None  # noqa: E731
                       else f"step {final_step}" if final_step is not None
                       else "the end of the run")
    try:
        while True:
            new = [s for s in source.steps() if s not in seen]
            if new:
                last_new = time.monotonic()
            for step in new:
                seen.add(step)
                if (wanted is not None and step not in wanted) or not analyzer.scheduled(step):
                    continue
                record, failure = _run_step(analyzer, source, step)
                checked += 1
                if record is not None:
                    written.append(record)
                if failure is not None:
                    failures[step] = failure
                bar.update(1)
            if wanted is not None and wanted <= seen:
                break
            if not watch or (final_step is not None and final_step in seen):
                break
            now = time.monotonic()
            if now - last_new > timeout_seconds:
                raise TimeoutError(
                    f"no new checkpoint in {where} for {timeout_seconds:.0f} s while "
                    f"waiting for {waiting()}; {len(written)} checkpoints analysed by this "
                    "call (their records are stored)")
            if now - last_note >= 60.0:  # at the first wait, then every minute
                logging.info("watching %s: waiting for %s (%d checkpoints seen)", where,
                             waiting(), len(seen))
                last_note = now
            time.sleep(poll_seconds)
    finally:
        bar.close()
        for w in analyzer.writers:
            w.flush()
    if failures and not allow_failures:
        lines = "\n".join(f"  step {s}: {r}" for s, r in sorted(failures.items()))
        raise FailedStepsError(
            f"{len(failures)} of the {checked} checkpoints of {where} failed (every other "
            f"one was analysed or reused; the failure records say why; "
            f"allow_failures=True returns the records instead):\n{lines}",
            failures, written)
    return written


def _run_step(analyzer, source, step: int) -> tuple[dict | None, str | None]:
    """One checkpoint of :func:`run`: the record written (None when it is reused) and the
    reason if the step failed. A checkpoint that cannot be read any more does not replace an
    "ok" record (it could not be checked against it): the step fails, the record stays."""
    record = analyzer.store.record(step)
    if record is not None and record.get("status") != "ok" and not analyzer.retry_failed:
        return None, None  # a failure kept on purpose: no need to load it
    try:
        params, state, *rest = source.load(step)
    except sources_lib.CheckpointError as e:
        reason = f"checkpoint unreadable: {e}"
        if record is not None and record.get("status") == "ok":
            logging.warning("step %d: %s (its record, computed before, is kept)", step, reason)
            return None, reason
        return analyzer.fail(step, reason), reason
    fingerprints = None
    if record is not None:
        fingerprints = analyzer.fingerprints(params, state, rest[0] if rest else None)
        if analyzer.reusable(step, fingerprints):
            return None, None
    new = analyzer.process(step, params, state, extras=rest[0] if rest else None,
                           fingerprints=fingerprints)
    return new, new.get("reason", "") if new.get("status") == "failed" else None
