"""Small pytree and validation helpers shared by the numerical modules (private).

Everything here is pure: no I/O, no flax, no global JAX config (the x64 scope is a context
manager around one call).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import flatten_util

PyTree = Any


def is_concrete(tree: PyTree) -> bool:
    """True when no leaf of `tree` is a tracer (so its values can be inspected)."""
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


def check_finite(name: str, tree: PyTree) -> None:
    """Raises `ValueError` naming `name` if a concrete `tree` holds NaN or inf.

    Traced values cannot be inspected; they pass through unchecked.
    """
    if not is_concrete(tree):
        return
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = np.asarray(leaf)
        if np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr)):
            where = jax.tree_util.keystr(path) or "(root)"
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise ValueError(
                f"`{name}` holds {bad} non-finite value(s) (NaN or inf) at {name}{where}."
            )


def check_floating(name: str, tree: PyTree) -> None:
    """Raises `ValueError` unless every leaf of `tree` is a floating-point array."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"`{name}` is an empty pytree.")
    for leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"`{name}` must hold floating-point arrays, got dtype {dtype}.")


def check_key(name: str, key: Any) -> None:
    """Raises a `TypeError` naming ``name`` unless ``key`` is one JAX PRNG key: a typed key
    (``jax.random.key(0)``) of shape ``()`` or a legacy ``uint32`` array of shape ``(2,)``
    (``jax.random.PRNGKey(0)``)."""
    dtype = getattr(key, "dtype", None)
    shape = np.shape(key) if dtype is not None else None
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if shape == ():
            return
    elif dtype is not None and dtype == jnp.uint32 and shape == (2,):
        return
    what = (f"an array of dtype {dtype} and shape {shape}" if dtype is not None
            else repr(key) if isinstance(key, (int, float, str)) else type(key).__name__)
    raise TypeError(f"`{name}` must be one JAX PRNG key, e.g. jax.random.key(0) (or a "
                    f"jax.random.split of it, one at a time), got {what}.")


def warn_float64_dropped(name: str, tree: PyTree, stacklevel: int = 3) -> None:
    """Warns when ``tree`` holds float64 arrays while JAX computes in float32 (x64 off, also
    inside a scoped ``jax.enable_x64(False)``): JAX would cast them, silently. Reads what JAX
    would make of a float64 value; touches no config."""
    if jax.dtypes.canonicalize_dtype(np.float64) == np.float64:
        return
    if any(getattr(x, "dtype", None) == np.float64 for x in jax.tree_util.tree_leaves(tree)):
        import warnings

        warnings.warn(
            f"`{name}` holds float64 arrays but jax_enable_x64 is off, so JAX computes in "
            f"float32; pass float32 arrays, or run the call under `with jax.enable_x64(True):` "
            f"(scoped) for float64.", UserWarning, stacklevel=stacklevel)


def to_host(x) -> np.ndarray:
    """``x`` as a numpy array on this host, also when it lives on devices of several processes
    (a fully replicated array is read from a local copy; a split one is gathered)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def tree_size(tree: PyTree) -> int:
    """Total number of scalars in `tree`."""
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


def as_flat(tree_or_array: PyTree) -> jax.Array:
    """A 1-D array in `ravel_pytree` order (a 1-D array is returned as is)."""
    if isinstance(tree_or_array, (jax.Array, np.ndarray)) and np.ndim(tree_or_array) == 1:
        return jnp.asarray(tree_or_array)
    return flatten_util.ravel_pytree(tree_or_array)[0]


def as_flat_rows(rows: PyTree) -> jax.Array:
    """A `(k, p)` array from a `(k, p)` array or a pytree whose leaves have leading axis k."""
    if isinstance(rows, (jax.Array, np.ndarray)) and np.ndim(rows) == 2:
        return jnp.asarray(rows)
    leaves = jax.tree_util.tree_leaves(rows)
    if not leaves:
        raise ValueError("empty pytree of vectors")
    k = np.shape(leaves[0])[0]
    return jnp.concatenate([jnp.reshape(x, (k, -1)) for x in leaves], axis=1)


def unravel_rows(rows: jax.Array, like: PyTree) -> PyTree:
    """Inverse of `as_flat_rows`: `(k, p)` rows -> pytree like `like` with a leading k axis."""
    _, unravel = flatten_util.ravel_pytree(like)
    flat_dtype = flatten_util.ravel_pytree(like)[0].dtype
    return jax.vmap(lambda r: unravel(r.astype(flat_dtype)))(rows)


def flat_matvec(matvec: Callable[[PyTree], PyTree], like: PyTree, dtype) -> tuple[
    Callable[[jax.Array], jax.Array], jax.Array
]:
    """Wraps a pytree matvec as a flat `(p,) -> (p,)` function in `dtype`.

    Vectors are cast to the template's dtype before `matvec` (so an HVP runs in the parameters'
    precision) and its output is cast to `dtype` (the eigensolver's precision). An operator
    with a ``prepared()`` method is replaced by what it returns first: called once inside the
    solver's trace, it can do the work every product shares (the data-set operators of
    :mod:`hessian_subspace.curvature` linearise themselves there).
    Returns the flat matvec and the flattened template.
    """
    like_flat, unravel = flatten_util.ravel_pytree(like)
    prepare = getattr(matvec, "prepared", None)
    if callable(prepare):  # e.g. an operator that caches its linearisation for many products
        matvec = prepare()

    def mv(x: jax.Array) -> jax.Array:
        out = matvec(unravel(x.astype(like_flat.dtype)))
        return as_flat(out).astype(dtype)

    return mv, like_flat


# --------------------------------------------------------------------------------------------
# Argument checks and scopes shared by the solvers (run before any tracing).


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (either bound optional), or a `ValueError` naming
    ``name``: the one integer check of the package (bools and floats are not ints)."""
    if low is None and high is None:
        bound = ""
    elif high is None:
        bound = f" >= {low}"
    elif low is None:
        bound = f" <= {high}"
    else:
        bound = f" in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
            low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"`{name}` must be an int{bound}, got {value!r}.")
    return int(value)


def check_steps(name: str, steps) -> tuple[int, ...]:
    """Checkpoint steps (an int or a sequence of ints >= 0) as a tuple in the order given, or a
    `ValueError`/`TypeError` naming ``name``."""
    if isinstance(steps, (int, np.integer)) and not isinstance(steps, bool):
        steps = (steps,)
    if isinstance(steps, (str, bytes)) or not hasattr(steps, "__iter__"):
        raise TypeError(f"`{name}` must be a step or a sequence of steps, got {steps!r}.")
    return tuple(check_int(f"{name} entries", s, 0) for s in steps)


def resolve_dtype(dtype, like: PyTree):
    """``dtype`` as a floating numpy dtype; None means the result type of ``like``'s leaves."""
    if dtype is None:
        return jnp.result_type(*jax.tree_util.tree_leaves(like))
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"`dtype` must be a floating dtype, got {dtype}.")
    return dtype


def x64_scope(dtype):
    """Scoped ``jax.enable_x64`` for a float64 computation; never touches the global flag."""
    if jnp.dtype(dtype).itemsize == 8:
        return jax.enable_x64(True)
    return contextlib.nullcontext()


def as_operator(matvec: Callable[[PyTree], PyTree]):
    """``matvec`` as a pytree: operators that are pytrees stay dynamic (no recompilation when
    their arrays change); plain functions become ``Partial`` (static, hashed by identity)."""
    if not callable(matvec):
        raise ValueError(f"`matvec` must be callable, got {type(matvec).__name__}.")
    leaves, _ = jax.tree_util.tree_flatten(matvec)
    if len(leaves) == 1 and leaves[0] is matvec:
        return jax.tree_util.Partial(matvec)
    return matvec


# --------------------------------------------------------------------------------------------
# Leaf paths: names of parameter leaves without knowing the framework that made them.


def key_name(key: Any) -> str:
    """One path component as text: a dict key, an attribute name or a sequence index."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_name(path: tuple) -> str:
    """A key path (``tree_flatten_with_path``) as a "/"-joined name, e.g. "dense_0/kernel"."""
    return "/".join(key_name(k) for k in path)


def leaf_slices(tree: PyTree) -> list[tuple[str, int, int]]:
    """``[(name, start, stop), ...]``: where each leaf of ``tree`` sits in its
    ``ravel_pytree`` vector, in ravel order, ``name`` the "/"-joined path; the half-open ranges
    tile ``[0, p)``. Works on arrays and ``jax.ShapeDtypeStruct`` leaves of any pytree (dicts,
    flax, nnx states, Equinox modules); ``None`` leaves are skipped, as ``ravel_pytree`` does."""
    slices, start = [], 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        size = math.prod(getattr(leaf, "shape", np.shape(leaf)))
        slices.append((path_name(path), start, start + size))
        start += size
    return slices
