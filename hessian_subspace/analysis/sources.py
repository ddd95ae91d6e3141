"""Checkpoint sources: where the parameters of each step come from.

A source lists finalised steps and loads one of them; :meth:`Analyzer.run` streams any source
through the metric pipeline (and follows a live one with ``watch=True``)::

    class Source(Protocol):
        def steps(self) -> list[int]: ...                   # finalised steps, ascending
        def load(self, step: int) -> tuple[params, state]:  # state: None if the model has none
            ...                                              # raises CheckpointError

Built in: :func:`orbax_checkpoints`, a directory written by ``orbax.checkpoint.CheckpointManager``
(the user's own, single-item or composite, or this package's training runs through
:func:`hessian_subspace.checkpoints.run_checkpoints`), and :func:`in_memory`, a mapping
``{step: params}`` or ``{step: (params, state)}``. Sources only read: nothing in a checkpoint
directory is created, renamed or deleted. The orbax format itself (and its errors,
:class:`CheckpointError`, :class:`PeerLostError`) lives in :mod:`hessian_subspace.checkpoints`,
below both the analysis and training; its names are re-exported here.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping, Protocol

from hessian_subspace import _tree
from hessian_subspace.checkpoints import (CheckpointError, OrbaxCheckpoints, PeerLostError,
                                          conform, orbax_checkpoints, peer_failure)

PyTree = Any

__all__ = ["CheckpointError", "InMemory", "OrbaxCheckpoints", "PeerLostError", "Source",
           "WithExtras", "as_source", "conform", "describe_location", "in_memory",
           "orbax_checkpoints", "peer_failure", "with_extras"]


class Source(Protocol):
    """What :meth:`hessian_subspace.analysis.Analyzer.run` reads checkpoints from."""

    def steps(self) -> list[int]:
        """Finalised steps, ascending (re-read on every call, so a live run shows new ones)."""

    def load(self, step: int) -> tuple[PyTree, PyTree | None]:
        """``(params, state)`` of one step, or ``(params, state, extras)`` with a dict of
        anything else the analysis may use (``ctx["extras"]``: e.g. the optimizer state);
        raises :class:`CheckpointError`."""


# --------------------------------------------------------------------------------------------
# More for the transforms than the checkpoint holds.


class WithExtras:
    """A source whose checkpoints carry more extras (see :func:`with_extras`)."""

    def __init__(self, source: Source, extras: Callable[[int], Mapping[str, Any]]):
        self.source, self.extras = source, extras

    def steps(self) -> list[int]:
        return self.source.steps()

    def load(self, step: int) -> tuple[PyTree, PyTree | None, dict]:
        params, state, *rest = self.source.load(step)
        return params, state, {**(rest[0] if rest else {}), **self.extras(step)}

    def describe(self) -> dict:
        inner = getattr(self.source, "describe", lambda: {})()
        return {**inner, "extras": getattr(self.extras, "__qualname__", repr(self.extras))}


def with_extras(source: Source, extras: Callable[[int], Mapping[str, Any]]) -> WithExtras:
    """``source`` with ``extras(step)`` added to every checkpoint's ``ctx["extras"]``: what a
    transform needs that the checkpoint does not hold, e.g. the mini-batch the run takes next
    (``{"next_batch": ...}``, for :func:`~hessian_subspace.analysis.loss_decrease`)."""
    if not callable(extras):
        raise TypeError(f"`extras` must be a function of the step, got "
                        f"{type(extras).__name__}")
    return WithExtras(source, extras)


# --------------------------------------------------------------------------------------------
# In memory.


class InMemory:
    """Checkpoints held in memory (see :func:`in_memory`)."""

    def __init__(self, checkpoints: Mapping[int, Any] | Iterable[tuple]):
        items = checkpoints.items() if isinstance(checkpoints, Mapping) else checkpoints
        self._data: dict[int, tuple[PyTree, PyTree | None]] = {}
        for entry in items:
            if not isinstance(entry, tuple) or len(entry) not in (2, 3):
                raise TypeError("in-memory checkpoints are (step, params) or "
                                "(step, params, state) tuples, or a {step: params} mapping; got "
                                f"{type(entry).__name__}")
            step, value = entry[0], entry[1:]
            _tree.check_int("checkpoint steps", step, 0)
            if len(value) == 1 and isinstance(value[0], tuple) and len(value[0]) == 2 \
                    and isinstance(checkpoints, Mapping):
                value = value[0]  # {step: (params, state)}
            self._data[int(step)] = (value[0], value[1] if len(value) == 2 else None)

    def steps(self) -> list[int]:
        return sorted(self._data)

    def load(self, step: int) -> tuple[PyTree, PyTree | None]:
        if step not in self._data:
            raise CheckpointError(f"no checkpoint for step {step} in memory")
        return self._data[step]

    def describe(self) -> dict:
        return dict(kind="in_memory", steps=self.steps())


def in_memory(checkpoints: Mapping[int, Any] | Iterable[tuple]) -> InMemory:
    """A source from ``{step: params}``, ``{step: (params, state)}`` or an iterable of
    ``(step, params)`` / ``(step, params, state)`` tuples."""
    return InMemory(checkpoints)


def describe_location(source: Any) -> str:
    """Where a source reads from, for messages: its directory, or what it is."""
    if isinstance(source, WithExtras):
        return describe_location(source.source)
    directory = getattr(source, "directory", None)
    if directory:
        return f"the checkpoint directory {directory}" + (
            "" if os.path.isdir(directory) else " (it does not exist)")
    if isinstance(source, InMemory):
        return "the in-memory checkpoints"
    return f"the checkpoint source {type(source).__name__}"


def as_source(source: Any) -> Source:
    """``source`` itself if it has ``steps`` and ``load``, else :func:`in_memory` of it."""
    if callable(getattr(source, "steps", None)) and callable(getattr(source, "load", None)):
        return source
    if isinstance(source, (str, os.PathLike)):
        raise TypeError(f"got the path {os.fspath(source)!r}; wrap it: "
                        "analysis.orbax_checkpoints(path, like=params)")
    return in_memory(source)
