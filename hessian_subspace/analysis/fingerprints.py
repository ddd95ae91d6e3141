"""Fingerprints: what a record was computed from, so that it is reused only when all of it
matches.

Every record of the analysis carries ``fingerprints``:

- ``checkpoint``: the content of the parameters and model state analysed
  (:func:`tree_content`): every leaf's key path, dtype, shape and values;
- ``loss``: the loss as JAX sees it (:func:`function_fingerprint`): the text of its jaxpr on the
  analysis batch's shapes and the values of every constant it closes over, so that a changed
  body, a changed weight-decay constant or a changed bound array all change it;
- ``data``: SHA-256 of the analysis set's arrays;
- ``settings``: SHA-256 of the analysis settings (transforms, their configuration, the
  analyzer's options; ``pipeline.json``).
- ``extras``: the content of what else the checkpoint gave the transforms (``ctx["extras"]``:
  the optimizer state, the next mini-batch), :func:`tree_content` of it; None without.

:func:`tree_content` runs on the devices (a jitted reduction), so it needs no copy to the host
and works on arrays split over several processes: each 32-bit word ``w_i`` of a leaf enters
four lanes ``Σ_i mix(K_j w_i + mix(i ⊕ S_j)) mod 2³²`` (``mix``: MurmurHash3's finaliser, a
bijection; ``K_j`` odd), so changing any one word changes every lane, and the sums do not
depend on the order of the reduction (integer addition mod 2³² is associative): the same
content gives the same fingerprint on one device or many, CPU or GPU. It is a change detector,
not a cryptographic hash; the lanes and the leaves' paths, dtypes and shapes go through SHA-256.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from hessian_subspace import _tree

PyTree = Any
ALGORITHM = "mix32x4-sha256-v1"

_LANES = ((0x9E3779B1, 0x85EBCA77), (0xC2B2AE3D, 0x27D4EB2F), (0x165667B1, 0xD3A2646C),
          (0xFD7046C5, 0xB55A4F09))


def _mix(x):
    """MurmurHash3's 32-bit finaliser (a bijection of uint32)."""
    x = x ^ (x >> 16)
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The leaf's bits as a flat uint32 array."""
    dtype = jnp.result_type(x)
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
        dtype = jnp.result_type(x)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
        dtype = jnp.result_type(x)
    if dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    size = np.dtype(dtype).itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    if size == 8:  # bitcast to (..., 2) words
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


def _lanes(x: jax.Array) -> jax.Array:
    w = _words(x)
    i = jax.lax.iota(jnp.uint32, w.shape[0])
    out = []
    for k, s in _LANES:
        term = _mix(w * np.uint32(k) + _mix(i ^ np.uint32(s)))
        out.append(jax.lax.reduce(term, np.uint32(0), jax.lax.add, (0,)))
    return jnp.stack(out)


@jax.jit
def _all_lanes(leaves: list) -> list:
    return [_lanes(x) for x in leaves]


def _dtype_name(dtype) -> str:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return str(dtype)
    return np.dtype(dtype).str


def tree_content(tree: PyTree) -> str:
    """A fingerprint of a pytree's content (key paths, dtypes, shapes and values of its
    leaves), computed where the arrays are (see the module docstring). Host arrays are
    fingerprinted as they are (float64 stays float64, whatever ``jax_enable_x64`` says).

    Example:
      >>> import numpy as np
      >>> a = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3)}
      >>> b = {"w": a["w"].copy()}
      >>> tree_content(a) == tree_content(b)
      True
      >>> b["w"][1, 2] = np.nextafter(b["w"][1, 2], np.float32(9))  # one bit
      >>> tree_content(a) == tree_content(b)
      False
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    header = hashlib.sha256(ALGORITHM.encode())
    leaves = []
    for path, leaf in flat:
        if leaf is None:
            continue
        leaf = leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)
        header.update(f"{_tree.path_name(path)}|{_dtype_name(leaf.dtype)}|{leaf.shape};".encode())
        leaves.append(leaf)
    if leaves:
        # Host arrays keep their dtype: a float64 leaf is hashed as float64 even with x64 off.
        with jax.enable_x64(True):
            lanes = _all_lanes(leaves)
            for v in lanes:
                header.update(np.asarray(_tree.to_host(v), np.uint32).tobytes())
    return header.hexdigest()


def arrays_content(arrays: dict[str, Any]) -> str:
    """SHA-256 of named host arrays (names, dtypes, shapes, bytes), in name order: what a
    record's stored arrays hold, independent of how the file was written."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        arr = np.ascontiguousarray(np.asarray(arrays[name]))
        h.update(f"{name}|{arr.dtype.str}|{arr.shape};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def data_content(data: PyTree) -> dict:
    """The analysis set's fingerprint: leaf paths, shapes, dtypes and the SHA-256 of their
    bytes (host arrays)."""
    h = hashlib.sha256()
    shapes = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(data)[0]:
        arr = np.ascontiguousarray(np.asarray(leaf))
        shapes.append([_tree.path_name(path), list(arr.shape), arr.dtype.str])
        h.update(arr.tobytes())
    return dict(leaves=shapes, sha256=h.hexdigest())


def json_content(obj: Any) -> str:
    """SHA-256 of a JSON-able object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# Object addresses ("<function f at 0x7f...>") differ between processes and runs.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def function_fingerprint(fn: Callable, *args: PyTree) -> str:
    """A fingerprint of ``fn`` as JAX traces it on ``args`` (arrays or
    ``jax.ShapeDtypeStruct``s): SHA-256 of its jaxpr's text (operations, shapes, literal
    constants such as a weight-decay coefficient) and of the values of the arrays it closes
    over (bound by a ``jax.tree_util.Partial`` or captured from Python).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jax.ShapeDtypeStruct((3,), jnp.float32)
      >>> f = lambda w: jnp.sum(w ** 2) * 1e-3
      >>> g = lambda w: jnp.sum(w ** 2) * 0.3
      >>> function_fingerprint(f, x) == function_fingerprint(f, x)
      True
      >>> function_fingerprint(f, x) == function_fingerprint(g, x)
      False
    """
    closed = jax.make_jaxpr(fn)(*args)
    h = hashlib.sha256(_ADDRESS.sub("", str(closed.jaxpr)).encode())
    h.update(tree_content(list(closed.consts)).encode())
    return h.hexdigest()


def shapes_of(tree: PyTree) -> PyTree:
    """``jax.ShapeDtypeStruct``s (without shardings) of a pytree's array leaves."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), tree)


def loss_fingerprint(loss_fn: Callable, params_like: PyTree, batch: PyTree,
                     state_like: PyTree = None, *, output_fn: Callable | None = None,
                     output_loss: Callable | None = None) -> str:
    """The ``loss`` fingerprint of a record: :func:`function_fingerprint` of ``loss_fn``
    (``loss_fn(params, batch[, state])``) on the shapes of ``params_like``, ``batch`` and
    ``state_like``, and of the Gauss-Newton split ``output_fn`` / ``output_loss`` if given.
    The model state enters as an input, so its values (a checkpoint's) do not change it."""
    params_like, batch = shapes_of(params_like), shapes_of(batch)
    state_like = None if state_like is None else shapes_of(state_like)
    parts = []
    for fn in (loss_fn, output_fn):
        if fn is None:
            continue
        if state_like is None:
            parts.append(function_fingerprint(fn, params_like, batch))
        else:
            parts.append(function_fingerprint(lambda p, b, s, fn=fn: fn(p, b, s), params_like,
                                              batch, state_like))
    if output_fn is not None and output_loss is not None:
        outputs = (jax.eval_shape(output_fn, params_like, batch) if state_like is None else
                   jax.eval_shape(lambda p, b, s: output_fn(p, b, s), params_like, batch,
                                  state_like))
        parts.append(function_fingerprint(output_loss, outputs, batch))
    return json_content(parts)


def versions() -> dict:
    """Python, JAX, numpy, this package and the backend; flax, optax, orbax if installed."""
    import hessian_subspace as hs

    out = dict(python=sys.version.split()[0], jax=jax.__version__, numpy=np.__version__,
               hessian_subspace=hs.__version__, backend=jax.default_backend())
    for package in ("flax", "optax", "orbax-checkpoint"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
