"""Device meshes for the analysis: parsing, the data-parallel axes, FSDP-style parameter
shardings, and the sharding of flat parameter-space vectors (Krylov bases).

Sharding is a property of the arrays (STYLE 17): the numerical core never asks for a mesh, it
reads the shardings of the arrays it is given. This module only builds them. A single device is
a mesh of one, and everything here works the same with it.

Conventions: the mesh axis named ``"data"`` (or every axis listed in ``data_axes``) splits the
examples of the analysis set; the other axes (``"model"``) split parameters. Flat vectors of
the parameter space (the rows of a Krylov basis, ``(m, p)``) are split over **all** devices, so
a basis of m vectors costs about m·p/devices numbers per device.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

PyTree = Any
_AXIS = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_mesh(spec: str | None, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh from ``"data:4,model:2"`` (axis name: size, in order); None or ``""`` puts every
    device on one ``data`` axis. One axis size may be -1 (the rest of the devices).

    Raises:
      ValueError: naming the setting, for a malformed spec, a repeated or invalid axis name, or
        sizes whose product is not the device count.

    Example:
      >>> mesh = parse_mesh("data:1")
      >>> dict(mesh.shape)
      {'data': 1}
    """
    devices = list(jax.devices() if devices is None else devices)
    if not spec:
        return make_mesh({"data": len(devices)}, devices=devices)
    axes: dict[str, int] = {}
    for term in str(spec).split(","):
        name, _, size = term.strip().partition(":")
        name = name.strip()
        if not _AXIS.match(name) or not size.strip().lstrip("-").isdigit():
            raise ValueError(f"`mesh` must look like 'data:4,model:2', got {spec!r} "
                             f"(bad term {term!r})")
        if name in axes:
            raise ValueError(f"`mesh` names axis {name!r} twice: {spec!r}")
        axes[name] = int(size)
    free = [a for a, s in axes.items() if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in axes.values()):
        raise ValueError(f"`mesh` sizes must be positive (one may be -1), got {spec!r}")
    fixed = math.prod(s for s in axes.values() if s != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(f"`mesh` {spec!r}: {len(devices)} devices are not a multiple of "
                             f"{fixed}")
        axes[free[0]] = len(devices) // fixed
    return make_mesh(axes, devices=devices)


def make_mesh(axes: dict[str, int], *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with these axis sizes (product = number of devices), every axis ``Auto`` so that
    XLA propagates shardings through the analysis."""
    devices = list(jax.devices() if devices is None else devices)
    size = math.prod(axes.values())
    if size != len(devices):
        shape = ",".join(f"{a}:{s}" for a, s in axes.items())
        raise ValueError(f"`mesh` {shape} has {size} devices, but there are {len(devices)}; "
                         "the axis sizes must multiply to the device count")
    return jax.make_mesh(tuple(axes.values()), tuple(axes), devices=devices,
                         axis_types=(AxisType.Auto,) * len(axes))


def data_axes(mesh: Mesh, axes: Sequence[str] | str = ("data",)) -> tuple[str, ...]:
    """The mesh axes that split examples, checked against the mesh."""
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
        raise ValueError(f"data axes {unknown} are not axes of the mesh {dict(mesh.shape)}")
    return axes


def data_parallel_size(mesh: Mesh | None, axes: Sequence[str] | str = ("data",)) -> int:
    """How many groups of devices the examples are split into (1 without a mesh)."""
    if mesh is None:
        return 1
    return math.prod(mesh.shape[a] for a in data_axes(mesh, axes))


def vector_sharding(mesh: Mesh | None) -> NamedSharding | None:
    """The sharding of flat parameter-space vectors: split over every device of the mesh."""
    if mesh is None or mesh.size == 1:
        return None
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def basis_sharding(vector: NamedSharding | None) -> NamedSharding | None:
    """The sharding of ``(m, p)`` stacks of flat vectors: rows whole, columns like ``vector``."""
    if vector is None:
        return None
    return NamedSharding(vector.mesh, PartitionSpec(None, *vector.spec))


def fsdp_shardings(params: PyTree, mesh: Mesh, axis: str = "model") -> PyTree:
    """FSDP-style shardings of a parameter pytree: each leaf's largest dimension divisible by
    the ``axis`` size is split over ``axis``; leaves with none stay replicated.

    Example:
      >>> import jax.numpy as jnp
      >>> mesh = parse_mesh("model:1")
      >>> fsdp_shardings({"w": jnp.zeros((3, 8))}, mesh)["w"].spec
      P(None, 'model')
    """
    if axis not in mesh.axis_names:
        return jax.tree_util.tree_map(lambda _: NamedSharding(mesh, PartitionSpec()), params)
    n = mesh.shape[axis]

    def rule(leaf):
        shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
        dims = sorted(range(len(shape)), key=lambda d: -shape[d])
        for d in dims:
            if shape[d] % n == 0 and shape[d] >= n:
                spec = [None] * len(shape)
                spec[d] = axis
                return NamedSharding(mesh, PartitionSpec(*spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map(rule, params)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
