"""Scalar writers: the analyzer's numbers next to the training curves.

After each record the analyzer calls every writer with ``(step, scalars)``: the record's
numbers, nested keys joined with "/" (``subspace_overlap/0/top10``). A writer is any
``write(step, scalars)`` callable or an object with clu's ``write_scalars(step, scalars)``
(``clu.metric_writers``: pass your training loop's writer and the curves share a dashboard).
Built in: :class:`CSVWriter` (no dependencies) and :class:`TensorBoardWriter` (tensorboardX).
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Callable, Mapping

_SKIP = ("step", "seconds", "hvps", "lanczos_hvps")


def summary(record: Mapping[str, Any]) -> str:
    """The headline numbers of a record, for its log line."""
    parts = []
    for key in ("train_loss", "f_top", "overlap_g_hg", "lambda_max"):
        if isinstance(record.get(key), (int, float)):
            parts.append(f"{key} {record[key]:.4g}")
    return "  ".join(parts)


def scalars_of(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a record (bools excluded), nested keys joined with "/"."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars_of(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) \
                and key not in _SKIP and math.isfinite(value):
            out[name] = float(value)
    return out


class _Writer:
    def __init__(self, target: Any):
        self._target = target
        if callable(getattr(target, "write_scalars", None)):
            self._write: Callable = target.write_scalars
        elif callable(target):
            self._write = target
        else:
            raise TypeError(f"a writer must be callable as write(step, scalars) or have "
                            f"write_scalars(step, scalars); got {type(target).__name__}")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self._write(int(step), scalars)

    def flush(self) -> None:
        flush = getattr(self._target, "flush", None)
        if callable(flush):
            flush()


def as_writer(target: Any) -> _Writer:
    return _Writer(target)


class CSVWriter:
    """Appends ``step,name,value`` rows to a CSV file (created with a header).

    A step analysed again (after a failure, say) appends new rows; readers keep the last.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(["step", "name", "value"])

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            for name, value in scalars.items():
                w.writerow([int(step), name, repr(float(value))])

    def flush(self) -> None:
        pass


def read_csv(path: str | os.PathLike) -> dict[str, dict[int, float]]:
    """``{name: {step: value}}`` from a :class:`CSVWriter` file (the last row of a step wins)."""
    out: dict[str, dict[int, float]] = {}
    with open(os.fspath(path), newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["name"], {})[int(row["step"])] = float(row["value"])
    return out


class TensorBoardWriter:
    """Writes scalars as TensorBoard event files (``tensorboardX``, no TensorFlow needed).

    Args:
      logdir: the event directory (point TensorBoard at its parent, next to the training run's).
    """

    def __init__(self, logdir: str | os.PathLike):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("TensorBoardWriter needs tensorboardX: pip install tensorboardX "
                              "(or use CSVWriter)") from e
        self._writer = SummaryWriter(logdir=os.fspath(logdir))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, global_step=int(step))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
