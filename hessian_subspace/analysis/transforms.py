"""Metric transforms and their composition.

A :class:`Transform` is a small value, in the spirit of optax's ``GradientTransformation`` and
clu's metrics: a name, the context entries it **requires**, the entries it **provides**, an
optional ``init(ctx) -> state`` for state carried from one checkpoint to the next, and
``update(ctx, state) -> (outputs, state)``. Transforms own no I/O and call no other transform;
they read what earlier transforms put in the :class:`~hessian_subspace.analysis.Context`
(this checkpoint's values only). What a transform needs from earlier checkpoints is in its
own state — ``eigenpairs`` keeps its last basis (a warm start), ``subspace_overlap`` the bases
of its reference steps — which the analyzer's store persists under names after every
checkpoint (:mod:`.state`), so a resumed run loads it and goes on.

What happens to an output (a dict entry) is decided by its value and the transform's fields:

- a :class:`Stored` value (a dict of arrays) is written by the runner to
  ``FOLDER/step_<step>.npz`` (the step zero-padded to 8 digits) with FOLDER the output's key
  (transforms may add arrays to the same folder): arrays published for the user
  (``store.stored(FOLDER, step)``), never read back by a transform;
- a key listed in ``context_only`` goes to the context only (large arrays, solver results);
- everything else goes to the context **and** into the checkpoint's record under its key
  (numbers, small arrays, nested dicts of them).

:func:`chain` composes transforms in the order given and checks, before any work, that each
requirement is provided by the analyzer or by an earlier transform, that no two transforms
declare the same record key (``records``: the built-ins declare every key they write; a
trailing ``*`` declares a family such as ``train_*``), and that no transform needs more vectors
of an entry than its provider computes (``needs`` against ``sizes``: ``f_top(k=10)`` after
``eigenpairs(k=5)`` is refused). :func:`transform` makes a
transform of a plain function of the context, so a user's metric needs no subclassing::

    f_top5 = analysis.transform(
        "f_top5", lambda ctx: hs.gradient_fraction(ctx["gradient"],
                                                   ctx["eigenpairs"].eigenvectors[:5]),
        requires=("gradient", "eigenpairs"))
"""

from __future__ import annotations

import fnmatch
import hashlib
import inspect
import json
from typing import Any, Callable, Iterable, Mapping, NamedTuple

from hessian_subspace import _tree

PyTree = Any

# Keys the analyzer itself writes into every record (transforms may not output them).
RESERVED_KEYS = ("step", "status", "reason", "dtype", "processes", "precision", "versions",
                 "hessian", "curvature", "block", "hvps", "seconds", "fingerprints", "files",
                 "state_from")

# Folders of a results directory that a `Stored` output may not be named.
RESERVED_FOLDERS = ("records", "state", "quarantine", "replaced")

# What the analyzer puts in every context before the first transform runs.
BASE_ENTRIES = ("step", "params", "state", "loss_fn", "data", "test_data", "batches",
                "test_batches", "batch_size", "operator", "dtype", "precision", "seed",
                "output_fn", "output_loss", "extras")


class Stored(dict):
    """Arrays for the runner to store in ``FOLDER/step_<step>.npz`` (FOLDER: the output key).

    A plain dict of numpy/JAX arrays, published for the user (``store.stored(FOLDER,
    step)`` returns it as numpy). What a transform needs at later checkpoints goes in its
    state instead.
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
    # Record keys written (checked by `chain` for clashes); None: not declared (an undeclared
    # clash is caught at the first checkpoint and fails that checkpoint's record).
    records: tuple[str, ...] | None = None
    sizes: Mapping[str, int] | None = None  # provided entry -> number of vectors it holds.
    needs: Mapping[str, int] | None = None  # required entry -> number of vectors used.
    # False: the state only speeds the work up (a warm start) and the outputs do not depend
    # on it beyond the solver's tolerance; a record is then not recomputed when it changes.
    state_affects_values: bool = True

    def describe(self) -> dict:
        """Name, requirements and configuration (JSON): what ``pipeline.json`` records."""
        return dict(name=self.name, requires=list(self.requires),
                    provides=list(self.provides), config=_jsonable(dict(self.config or {})))


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=_describe_object))


def _describe_object(obj: Any) -> str:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    fn = getattr(obj, "func", obj)  # functools.partial, jax.tree_util.Partial
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    module = getattr(fn, "__module__", None)
    text = f"{module}.{name}" if module else str(name)
    code = code_fingerprint(fn)
    return f"{text} (code {code[:16]})" if code else text


def code_fingerprint(fn: Any) -> str | None:
    """SHA-256 of a Python function's source (its bytecode where the source cannot be read)
    and of the plain values it closes over; None for objects without code. So a user's
    metric whose body or captured constant changed is not taken for the one in
    ``pipeline.json``."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    h = hashlib.sha256()
    try:
        h.update(inspect.getsource(fn).encode())
    except (OSError, TypeError):
        h.update(code.co_code)
        h.update(repr(code.co_consts).encode())
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, (bool, int, float, str, bytes, type(None))) or (
                isinstance(value, tuple) and all(isinstance(v, (bool, int, float, str))
                                                 for v in value)):
            h.update(repr(value).encode())
    return h.hexdigest()


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
              context_only: Iterable[str] = (), records: Iterable[str] | None = None,
              needs: Mapping[str, int] | None = None,
              state_affects_values: bool = True) -> Transform:
    """A transform from a plain function of the context.

    Args:
      name: the transform's name; also the record key when ``fn`` returns a single value.
      fn: ``fn(ctx) -> outputs``, or with ``init``, ``fn(ctx, state) -> (outputs, state)``.
        ``outputs`` is a dict (each entry goes into the record and the context under its key,
        see the module docstring) or a single value, recorded under ``name``.
      requires: context entries ``fn`` reads, checked by :func:`chain` before any work.
      provides: context entries it adds, for later transforms' requirements (default:
        ``(name,)``). Outputs not listed are still recorded.
      init: ``init(ctx) -> state`` for a stateful transform: state carried across
        checkpoints, persisted by the store under its key paths after every checkpoint so
        that a resumed run continues it. A state that changes structure across checkpoints
        must be nested dicts of arrays with string keys.
      context_only: output keys kept out of the record.
      records: the record keys ``fn`` writes, so that :func:`chain` refuses a clash with
        another transform before any work (None: undeclared; a clash then fails the first
        checkpoint's record).
      needs: ``{entry: n}``: how many vectors of a required entry ``fn`` uses (e.g.
        ``{"eigenpairs": 5}``), checked by :func:`chain` against what the provider computes.
      state_affects_values: False when the state is only a starting point (the outputs do
        not depend on it beyond a solver's tolerance): a record is then not computed again
        when the state it started from changes.

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
    if records is not None:
        records = _check_names("records", records)
    needs = check_needs(needs)

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
                     init=init, context_only=context_only, config=dict(fn=fn),
                     records=records, needs=needs,
                     state_affects_values=bool(state_affects_values))


def check_needs(needs: Mapping[str, int] | None) -> dict[str, int] | None:
    """``needs`` as ``{entry: n}`` with n >= 1, or a ``TypeError``/``ValueError``."""
    if needs is None:
        return None
    if not isinstance(needs, Mapping):
        raise TypeError(f"`needs` must be a mapping entry -> number of vectors, got {needs!r}")
    out = {}
    for entry, n in needs.items():
        if not isinstance(entry, str):
            raise ValueError(f"`needs` maps entry names to ints >= 1, got the key {entry!r}")
        out[entry] = _tree.check_int(f"needs[{entry!r}]", n, 1)
    return out


def key_clash(key: str, declared: Iterable[str]) -> str | None:
    """The first declared key or family (``train_*``) that ``key`` (itself a key or a family)
    collides with, or None."""
    for other in declared:
        if key == other or fnmatch.fnmatchcase(key, other) or fnmatch.fnmatchcase(other, key):
            return other
        if key.endswith("*") and other.endswith("*") and (
                key[:-1].startswith(other[:-1]) or other[:-1].startswith(key[:-1])):
            return other
    return None


# --------------------------------------------------------------------------------------------
# When a transform runs: the one step filter.


def at_steps(t: Transform, steps: int | Iterable[int]) -> Transform:
    """``t`` run only at the checkpoints ``steps`` (the paper's dense spectrum at the end of
    training, an SLQ density at a few steps); elsewhere it outputs nothing and keeps its state.

    Example:
      >>> from hessian_subspace import analysis
      >>> t = analysis.at_steps(analysis.slq(num_probes=2, num_steps=8), [0, 1000])
      >>> t.name, t.config["run_at"]
      ('slq', {'steps': [0, 1000]})
    """
    steps = _tree.check_steps("steps", steps)
    chosen = frozenset(steps)
    return _gated(t, dict(steps=list(steps)), lambda step: step in chosen)


def every(t: Transform, n: int, *, offset: int = 0) -> Transform:
    """``t`` run only at the checkpoints whose step is ``offset`` modulo ``n``; elsewhere it
    outputs nothing and keeps its state.

    Example:
      >>> from hessian_subspace import analysis
      >>> analysis.every(analysis.c2(num=4), 100).config["run_at"]
      {'every': 100, 'offset': 0}
    """
    n = _tree.check_int("n", n, 1)
    offset = _tree.check_int("offset", offset, 0, n - 1)
    return _gated(t, dict(every=n, offset=offset), lambda step: step % n == offset)


def _gated(t: Transform, run_at: dict, runs: Callable[[int], bool]) -> Transform:
    if isinstance(t, Chain):
        raise TypeError("gate each transform of a chain on its own (a chain's later transforms "
                        "need its earlier ones' outputs)")
    if not isinstance(t, Transform):
        raise TypeError(f"expected a Transform, got {type(t).__name__}")
    if (t.config or {}).get("run_at") is not None:
        raise ValueError(f"transform {t.name!r} is gated already ({t.config['run_at']}); "
                         "gate the transform itself once")
    inner = t.update

    def update(ctx, state):
        if not runs(int(ctx.step)):
            return {}, state
        return inner(ctx, state)

    return t._replace(update=update, config=dict(t.config or {}, run_at=run_at))


class Chain(NamedTuple):
    """Transforms in the order they run (made by :func:`chain`)."""

    transforms: tuple[Transform, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.transforms)

    def describe(self) -> list[dict]:
        return [t.describe() for t in self.transforms]

    def record_keys(self) -> dict[str, str]:
        """Every declared record key (or family) -> the name of the transform writing it."""
        return {key: t.name for t in self.transforms for key in t.records or ()}

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
    declared: dict[str, str] = {key: "the analyzer" for key in RESERVED_KEYS}
    providers: dict[str, Transform] = {}
    for t in flat:
        if t.name in seen:
            raise ValueError(f"two transforms are named {t.name!r}; names must be unique (pass "
                             "name=... to one of them)")
        if "/" in t.name:
            raise ValueError(f"transform name {t.name!r} holds '/', which separates the names "
                             "of a transform's state; choose a name without it")
        seen.add(t.name)
        for req in t.requires:
            if req not in available:
                hint = _HINTS.get(req, f"a transform that provides {req!r}")
                raise ValueError(
                    f"transform {t.name!r} requires {req!r}, which neither the analyzer nor an "
                    f"earlier transform provides; add {hint} before it in the chain")
        for entry, n in (t.needs or {}).items():
            provider = providers.get(entry)
            have = None if provider is None else (provider.sizes or {}).get(entry)
            if have is not None and n > have:
                raise ValueError(
                    f"transform {t.name!r} uses {n} vectors of {entry!r}, but transform "
                    f"{provider.name!r} computes {have}; ask it for at least {n} (the paper "
                    f"computes 2k eigenpairs for a top-k analysis), or ask {t.name!r} for fewer")
        for key in t.records or ():
            other = key_clash(key, declared)
            if other is not None:
                raise ValueError(
                    f"transform {t.name!r} writes the record key {key!r}, which "
                    f"{declared[other]} writes too ({other!r}); give one of them another "
                    "name= (or another key)")
            declared[key] = f"transform {t.name!r}"
        available.update(t.provides)
        providers.update({entry: t for entry in t.provides})
    return Chain(tuple(flat))


_HINTS = {"gradient": "analysis.gradient()", "eigenpairs": "analysis.eigenpairs(k=...)"}
