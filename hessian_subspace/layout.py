r"""A fixed data set laid out in batches over a device mesh, so that means over it (gradients,
curvature products, losses) move no data between devices.

With D data-parallel devices, n examples and batch size b, device d holds the contiguous chunk
of examples :math:`[dL, (d+1)L)`, :math:`L = \lfloor n/D \rfloor`, and every batch takes
:math:`b_d = \lceil b/D \rceil` examples from each device (the batch size is rounded up per
device). With :math:`m = \lfloor L/b_d \rfloor`:

- ``grid``: :math:`m` full batches of :math:`Db_d` examples; batch j is column j of an array
  whose rows are split over the devices, and device d's rows are its own examples
  :math:`dL + r m + j`, :math:`r < b_d` (strided within the device's chunk);
- ``rest``: the :math:`q = L - mb_d` examples left on each device, one more batch (split too);
- ``tail``: the :math:`s = n - DL < D` examples that do not divide evenly, one batch on every
  device (replicated: computed redundantly, never moved).

Each batch's mean is weighted by its number of examples, so the mean over the whole set is exact
(:func:`hessian_subspace.dataset_mean`); inside the compiled loop a device only reads its own
rows, and the only communication is the reduction of the results. Without a mesh (D = 1) this
is exactly the strided layout of earlier versions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hessian_subspace import _tree, sharding as sharding_lib

PyTree = Any


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["grid", "rest", "tail"],
    meta_fields=["num_examples", "local_batch", "num_batches", "data_parallel", "mesh",
                 "axes"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class BatchedData:
    """A data set laid out for :func:`hessian_subspace.dataset_mean` (see the module docstring).

    A pytree whose leaves are the arrays, so jitted code takes it as an input; build it with
    :func:`batch_data`. ``grid`` leaves are ``(D * local_batch, num_batches, ...)``, ``rest``
    ``(D * q, ...)`` or None, ``tail`` ``(s, ...)`` or None.
    """

    grid: PyTree
    rest: PyTree
    tail: PyTree
    num_examples: int
    local_batch: int
    num_batches: int
    data_parallel: int
    mesh: Mesh | None
    axes: tuple[str, ...]

    @property
    def batch_size(self) -> int:
        """Examples per full batch (``local_batch`` on each data-parallel device)."""
        return self.local_batch * self.data_parallel

    def parts(self) -> list[tuple[PyTree, float, bool]]:
        """``(batches, weight, stacked)``: the grid (stacked along axis 1; the weight is that of
        each of its batches) and the two ragged batches, each with its share of the examples."""
        out = [(self.grid, self.batch_size / self.num_examples, True)]
        for part in (self.rest, self.tail):
            if part is not None:
                size = np.shape(jax.tree_util.tree_leaves(part)[0])[0]
                out.append((part, size / self.num_examples, False))
        return out

    def first_batch(self) -> PyTree:
        """A batch-shaped example (for shape inference)."""
        if self.num_batches:
            return jax.tree_util.tree_map(lambda x: x[:, 0], self.grid)
        return self.rest if self.rest is not None else self.tail

    def describe(self) -> dict:
        return dict(num_examples=self.num_examples, batch_size=self.batch_size,
                    num_batches=self.num_batches, data_parallel=self.data_parallel,
                    rest=0 if self.rest is None else int(np.shape(
                        jax.tree_util.tree_leaves(self.rest)[0])[0]),
                    tail=0 if self.tail is None else int(np.shape(
                        jax.tree_util.tree_leaves(self.tail)[0])[0]))


def plan(num_examples: int, batch_size: int, data_parallel: int) -> dict:
    """The layout's sizes: ``chunk`` L (examples per device), ``local_batch``, ``num_batches``,
    ``rest`` (per device) and ``tail``.

    Raises:
      ValueError: fewer examples than data-parallel devices.
    """
    n, b, d = int(num_examples), int(batch_size), int(data_parallel)
    if n < d:
        raise ValueError(f"the analysis set has {n} examples, fewer than the {d} data-parallel "
                         "devices; use a larger set or fewer devices on the data axis")
    chunk = n // d
    local = max(1, min(chunk, math.ceil(b / d)))
    num_batches = chunk // local
    return dict(chunk=chunk, local_batch=local, num_batches=num_batches,
                rest=chunk - num_batches * local, tail=n - d * chunk)


def example_ranges(num_examples: int, data_parallel: int, positions) -> list[tuple[int, int]]:
    """The example ranges ``[start, stop)`` that the data-parallel positions ``positions`` hold
    (a process reads only these, plus the tail)."""
    chunk = num_examples // data_parallel
    return [(p * chunk, (p + 1) * chunk) for p in positions]


def batch_data(data: PyTree | Callable[[int, int], PyTree], *, batch_size: int,
               mesh: Mesh | None = None, axes=("data",), num_examples: int | None = None,
               dtype=None) -> BatchedData:
    """Lays out a fixed data set in batches (see the module docstring).

    Args:
      data: a pytree of host arrays with a common leading example axis, or a loader
        ``load(start, stop) -> pytree`` of the examples ``[start, stop)`` (with
        ``num_examples``): each process then loads only the chunks of its own devices and the
        tail.
      batch_size: examples per batch b (rounded up to a multiple of the data-parallel size).
      mesh: the device mesh (None: the default device).
      axes: the mesh axes that split examples (the others see every example of their group).
      num_examples: n, for a loader.
      dtype: floating leaves are cast to it (integers stay).

    Returns:
      A :class:`BatchedData`.

    Example:
      >>> import numpy as np
      >>> batched = batch_data({"x": np.arange(10.0)}, batch_size=4)
      >>> batched.grid["x"].shape, batched.rest["x"].tolist()
      ((4, 2), [8.0, 9.0])
    """
    batch_size = _tree.check_int("batch_size", batch_size, 1)
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    d = sharding_lib.data_parallel_size(mesh, axes)
    if callable(data):
        if num_examples is None:
            raise ValueError("a loader needs `num_examples`")
        load, n = data, int(num_examples)
    else:
        leaves = jax.tree_util.tree_leaves(data)
        if not leaves or any(np.ndim(x) == 0 for x in leaves):
            raise ValueError("`data` must be a pytree of arrays with a leading example axis")
        sizes = {int(np.shape(x)[0]) for x in leaves}
        if len(sizes) != 1:
            raise ValueError(f"leaves of `data` disagree on the number of examples: "
                             f"{sorted(sizes)}")
        n = sizes.pop()
        if n < 1:
            raise ValueError("`data` holds no examples")
        load = functools.partial(_slice, data)
    p = plan(n, batch_size, d)
    cast = functools.partial(_cast, dtype=dtype)
    chunk, local, m, q, s = (p["chunk"], p["local_batch"], p["num_batches"], p["rest"],
                             p["tail"])
    example = cast(load(0, 1))

    def device_chunk(pos):
        return cast(load(pos * chunk, (pos + 1) * chunk))

    def grid_block(c):
        return jax.tree_util.tree_map(
            lambda x: np.reshape(x[: m * local], (local, m) + x.shape[1:]), c)

    def rest_block(c):
        return jax.tree_util.tree_map(lambda x: x[m * local:], c)

    tail = cast(load(d * chunk, n)) if s else None
    if mesh is None:
        c = device_chunk(0)
        grid = jax.tree_util.tree_map(jnp.asarray, grid_block(c))
        rest = jax.tree_util.tree_map(jnp.asarray, rest_block(c)) if q else None
        tail = None if tail is None else jax.tree_util.tree_map(jnp.asarray, tail)
    else:
        cache: dict[int, PyTree] = {}

        def chunk_of(pos):
            if pos not in cache:
                cache[pos] = device_chunk(pos)
            return cache[pos]

        split = NamedSharding(mesh, PartitionSpec(axes))
        grid = _assemble(example, split, d, local, lambda pos: grid_block(chunk_of(pos)),
                         extra=(m,))
        rest = _assemble(example, split, d, q, lambda pos: rest_block(chunk_of(pos))) if q \
            else None
        if tail is not None:
            tail = jax.tree_util.tree_map(
                lambda x: jax.make_array_from_callback(
                    x.shape, NamedSharding(mesh, PartitionSpec()), lambda idx, x=x: x[idx]),
                tail)
    return BatchedData(grid=grid, rest=rest, tail=tail, num_examples=n, local_batch=local,
                       num_batches=m, data_parallel=d, mesh=mesh, axes=axes)


def _slice(data, start, stop):
    return jax.tree_util.tree_map(lambda x: np.asarray(x[start:stop]), data)


def _cast(tree, dtype):
    def one(x):
        x = np.asarray(x)
        if dtype is not None and np.issubdtype(x.dtype, np.floating):
            return x.astype(dtype)
        return x
    return jax.tree_util.tree_map(one, tree)


def _assemble(example, split: NamedSharding, d: int, rows: int, block_of, extra=()):
    """A global array ``(d * rows, *extra, ...)`` split on axis 0, device position p's rows
    from ``block_of(p)`` (called only for this process's devices)."""
    def one(i, ex):
        shape = (d * rows, *extra, *np.shape(ex)[1:])

        def callback(index):
            pos = (index[0].start or 0) // rows
            leaf = jax.tree_util.tree_leaves(block_of(pos))[i]
            return leaf[(slice(None),) + tuple(index[1:])]

        return jax.make_array_from_callback(shape, split, callback)

    leaves, treedef = jax.tree_util.tree_flatten(example)
    return treedef.unflatten([one(i, ex) for i, ex in enumerate(leaves)])
