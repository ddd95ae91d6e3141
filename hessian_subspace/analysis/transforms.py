"""Metric transforms and their composition.

A :class:`Transform` is a small value, in the spirit of optax's ``GradientTransformation`` and
clu's metrics: a name, the context entries it **requires**, the entries it **provides**, an
optional ``init(ctx) -> state`` for state carried from one checkpoint to the next, and
``update(ctx, state) -> (outputs, state)``. Transforms own no I/O and call no other transform;
they read what earlier transforms put in the :class:`~hessian_subspace.analysis.Context`.

What happens to an output (a dict entry) is decided by its value and the transform's fields:

- a :class:`Stored` value (a dict of arrays) is written by the runner to
  ``FOLDER/step_<step>.npz`` (the step zero-padded to 8 digits) with FOLDER the output's key
  (transforms may add arrays to the same folder); later checkpoints read it back with
  ``ctx.stored(FOLDER, step)``;
- a key listed in ``context_only`` goes to the context only (large arrays, solver results);
- everything else goes to the context **and** into the checkpoint's record under its key
  (numbers, small arrays, nested dicts of them).

:func:`chain` composes transforms in the order given and checks, before any work, that each
requirement is provided by the analyzer or by an earlier transform. :func:`transform` makes a
transform of a plain function of the context, so a user's metric needs no subclassing::

    f_top5 = analysis.transform(
        "f_top5", lambda ctx: hs.gradient_fraction(ctx["gradient"],
                                                   ctx["eigenpairs"].eigenvectors[:5]),
        requires=("gradient", "eigenpairs"))
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Callable, Iterable, Mapping, NamedTuple

PyTree = Any

# What the analyzer puts in every context before the first transform runs.
BASE_ENTRIES = ("step", "params", "state", "loss_fn", "data", "test_data", "batches",
                "test_batches", "batch_size", "operator", "dtype", "precision", "seed",
                "output_fn", "output_loss", "mesh", "memory_budget", "extras")


class Stored(dict):
    """Arrays for the runner to store in ``FOLDER/step_<step>.npz`` (FOLDER: the output key).

    A plain dict of numpy/JAX arrays; ``ctx.stored(FOLDER, step)`` returns it (as numpy) at
    later checkpoints.
    """


class Transform(NamedTuple):
    """A metric transform (see the module docstring). Built-ins are made by factories
    (:func:`hessian_subspace.analysis.eigenpairs` ...), a user's by :func:`transform`."""

    name: str  # unique within a chain; names the transform in errors and pipeline.json.
    update: Callable[[Any, PyTree], tuple[dict, PyTree]]  # (ctx, state) -> (outputs, state).
    requires: tuple[str, ...] = ()  # context entries read (checked before any work).
    provides: tuple[str, ...] = ()  # context entries added (for the requirement check).
    init: Callable[[Any], PyTree] | None = None  # ctx -> state before the first checkpoint.
    context_only: tuple[str, ...] = ()  # outputs kept out of the record.
    config: Mapping[str, Any] | None = None  # the factory's arguments, as JSON.

    def describe(self) -> dict:
        """Name, requirements and configuration (JSON): what ``pipeline.json`` records."""
        return dict(name=self.name, requires=list(self.requires),
                    provides=list(self.provides), config=_jsonable(dict(self.config or {})))


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=_describe_object))


def _describe_object(obj: Any) -> str:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    name = getattr(obj, "__qualname__", None) or type(obj).__name__
    module = getattr(obj, "__module__", None)
    return f"{module}.{name}" if module else str(name)


def _check_names(label: str, names: Any) -> tuple[str, ...]:
    if isinstance(names, str):
        names = (names,)
    try:
        names = tuple(names)
    except TypeError:
        raise TypeError(f"`{label}` must be a sequence of names, got {names!r}") from None
    for n in names:
        if not isinstance(n, str) or not n:
            raise TypeError(f"`{label}` must hold non-empty strings, got {n!r}")
    return names


def transform(name: str, fn: Callable, *, requires: Iterable[str] = (),
              provides: Iterable[str] | None = None, init: Callable[[Any], PyTree] | None = None,
              context_only: Iterable[str] = ()) -> Transform:
    """A transform from a plain function of the context.

    Args:
      name: the transform's name; also the record key when ``fn`` returns a single value.
      fn: ``fn(ctx) -> outputs``, or with ``init``, ``fn(ctx, state) -> (outputs, state)``.
        ``outputs`` is a dict (each entry goes into the record and the context under its key,
        see the module docstring) or a single value, recorded under ``name``.
      requires: context entries ``fn`` reads, checked by :func:`chain` before any work.
      provides: context entries it adds, for later transforms' requirements (default:
        ``(name,)``). Outputs not listed are still recorded.
      init: ``init(ctx) -> state`` for a stateful transform (state carried across
        checkpoints, persisted by the runner so that a resumed run continues it).
      context_only: output keys kept out of the record.

    Returns:
      A :class:`Transform`.

    Example:
      >>> import hessian_subspace as hs
      >>> from hessian_subspace import analysis
      >>> t = analysis.transform("f_top5", lambda ctx: hs.gradient_fraction(
      ...     ctx["gradient"], ctx["eigenpairs"].eigenvectors[:5]),
      ...     requires=("gradient", "eigenpairs"))
      >>> t.name, t.requires
      ('f_top5', ('gradient', 'eigenpairs'))
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"`name` must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise TypeError(f"`fn` of transform {name!r} must be callable, got {type(fn).__name__}")
    if init is not None and not callable(init):
        raise TypeError(f"`init` of transform {name!r} must be callable")
    requires = _check_names("requires", requires)
    provides = (name,) if provides is None else _check_names("provides", provides)
    context_only = _check_names("context_only", context_only)

    def as_dict(out):
        return dict(out) if isinstance(out, Mapping) else {name: out}

    if init is None:
        def update(ctx, state):
            return as_dict(fn(ctx)), state
    else:
        def update(ctx, state):
            result = fn(ctx, state)
            if not (isinstance(result, tuple) and len(result) == 2):
                raise TypeError(f"stateful transform {name!r} must return (outputs, state), got "
                                f"{type(result).__name__}")
            return as_dict(result[0]), result[1]

    return Transform(name=name, update=update, requires=requires, provides=provides,
                     init=init, context_only=context_only, config=dict(fn=fn))


class Chain(NamedTuple):
    """Transforms in the order they run (made by :func:`chain`)."""

    transforms: tuple[Transform, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.transforms)

    def describe(self) -> list[dict]:
        return [t.describe() for t in self.transforms]

    def init(self, ctx) -> dict[str, PyTree]:
        """The state of every transform before the first checkpoint (keyed by name)."""
        return {t.name: (t.init(ctx) if t.init is not None else None) for t in self.transforms}


def _as_transform(item: Any) -> Transform | Chain:
    if isinstance(item, (Transform, Chain)):
        return item
    if callable(item):  # A bare function of the context.
        name = getattr(item, "__name__", None) or type(item).__name__
        if not name.isidentifier():
            raise TypeError(f"a bare function in `chain` needs a name; wrap {item!r} with "
                            "analysis.transform(name, fn, requires=...)")
        if len(inspect.signature(item).parameters) != 1:
            raise TypeError(f"a bare function {name!r} in `chain` must take one argument, the "
                            "context; use analysis.transform(..., init=...) for state")
        return transform(name, item)
    raise TypeError(f"`chain` takes transforms (or functions of the context), got "
                    f"{type(item).__name__}")


def chain(*transforms: Transform | Chain | Callable) -> Chain:
    """Composes transforms into one pipeline, run **in the order given**.

    Nested chains are flattened; a bare function ``fn(ctx) -> outputs`` becomes
    ``transform(fn.__name__, fn)``. Checked here, before any work: names are unique, and every
    requirement is an analyzer entry (``step``, ``params``, ``state``, ``loss_fn``, ``data``,
    ``test_data``, ``batch_size``, ``operator``, ...) or provided by an earlier transform.

    Raises:
      ValueError: a duplicate name, or a requirement nothing earlier provides (named, with the
        transform that needs it).

    Example:
      >>> from hessian_subspace import analysis
      >>> pipe = analysis.chain(analysis.gradient(), analysis.eigenpairs(k=4),
      ...                       analysis.f_top(k=2))
      >>> pipe.names
      ('gradient', 'eigenpairs', 'f_top')
      >>> analysis.chain(analysis.f_top(k=2))  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: transform 'f_top' requires 'gradient', which ...; add analysis.gradient() ...
    """
    flat: list[Transform] = []
    for item in transforms:
        item = _as_transform(item)
        flat.extend(item.transforms if isinstance(item, Chain) else (item,))
    if not flat:
        raise ValueError("`chain` needs at least one transform")
    available = set(BASE_ENTRIES)
    seen: set[str] = set()
    for t in flat:
        if t.name in seen:
            raise ValueError(f"two transforms are named {t.name!r}; names must be unique (pass "
                             "name=... to one of them)")
        seen.add(t.name)
        for req in t.requires:
            if req not in available:
                hint = _HINTS.get(req, f"a transform that provides {req!r}")
                raise ValueError(
                    f"transform {t.name!r} requires {req!r}, which neither the analyzer nor an "
                    f"earlier transform provides; add {hint} before it in the chain")
        available.update(t.provides)
    return Chain(tuple(flat))


_HINTS = {"gradient": "analysis.gradient()", "eigenpairs": "analysis.eigenpairs(k=...)"}
