r"""Diagonal blocks of a curvature operator on a subset of the parameter leaves (one layer, say).

:func:`restrict` turns any operator ``v -> H v`` on parameter pytrees (a Hessian or Gauss-Newton
operator of :mod:`curvature`, or a plain function) into its block :math:`H_{SS}`, itself an
operator with ``dim``, ``like`` and ``describe()``, so every eigensolver, spectrum and metric
takes it unchanged. Leaves are named by their "/"-joined key paths
(:func:`hessian_subspace.leaf_slices`), whatever framework built the parameters.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from hessian_subspace import _tree
from hessian_subspace.curvature import apply_operator

PyTree = Any


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["operator", "full_like"],
    meta_fields=["mask"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class RestrictedOperator:
    r"""The diagonal block :math:`H_{SS}` of an operator on a subset S of the parameter leaves:
    :math:`v_S \mapsto [H\,(v_S \oplus 0)]_S`. Build it with :func:`restrict`.

    Vectors are pytrees with the structure of the parameters in which the leaves outside S are
    ``None`` (empty subtrees), so ``ravel_pytree`` order is the full order with the other
    leaves skipped and :func:`hessian_subspace.leaf_slices` of ``like`` names the block's leaves. A
    pytree (``operator`` and the template are leaves, the mask is static), so eigensolvers
    compile once per shape, as for the full operator.
    """

    operator: Any
    full_like: PyTree
    mask: tuple[bool, ...]

    def __call__(self, v: PyTree) -> PyTree:
        return apply_operator(self, v)

    def matvec(self, v: PyTree) -> PyTree:
        return self.select(self.operator(self.embed(v)))

    def prepared(self):
        """This operator over the wrapped one's ``prepared()`` (its cached linearisation, if
        it has one): called once by the solvers inside their trace."""
        prepare = getattr(self.operator, "prepared", None)
        return self if prepare is None else dataclasses.replace(self, operator=prepare())

    def embed(self, v: PyTree) -> PyTree:
        """A block vector as a full one, zero outside S."""
        leaves, treedef = jax.tree_util.tree_flatten(self.full_like)
        sub = iter(jax.tree_util.tree_leaves(v))
        out = [jnp.asarray(next(sub), jnp.result_type(x)) if m
               else jnp.zeros(np.shape(x), jnp.result_type(x))
               for x, m in zip(leaves, self.mask, strict=True)]
        return treedef.unflatten(out)

    def select(self, tree: PyTree) -> PyTree:
        """The block part of a full vector (``None`` at the leaves outside S)."""
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        if len(leaves) != len(self.mask):
            raise ValueError(f"expected a pytree with {len(self.mask)} leaves like the "
                             f"parameters, got {len(leaves)}.")
        return treedef.unflatten([x if m else None
                                  for x, m in zip(leaves, self.mask, strict=True)])

    @property
    def like(self) -> PyTree:
        """A template for block vectors (the parameters in S, ``None`` elsewhere)."""
        return self.select(self.full_like)

    @property
    def dim(self) -> int:
        """|S|, the number of parameters in the block."""
        return _tree.tree_size(self.like)

    @property
    def leaf_names(self) -> tuple[str, ...]:
        """Paths of the leaves in S, "/"-joined (:func:`hessian_subspace.leaf_slices` naming)."""
        return tuple(n for n, m in zip(_leaf_names(self.full_like), self.mask, strict=True) if m)

    @property
    def flat_indices(self) -> np.ndarray:
        """Positions of the block's entries in the full ``ravel_pytree`` vector, ``(|S|,)``:
        ``full_flat[flat_indices]`` is the block vector raveled."""
        sizes = [int(np.size(x)) for x in jax.tree_util.tree_leaves(self.full_like)]
        starts = np.cumsum([0] + sizes[:-1])
        ranges = [np.arange(s, s + n)
                  for s, n, m in zip(starts, sizes, self.mask, strict=True) if m]
        return np.concatenate(ranges or [np.zeros(0, int)])

    @property
    def num_examples(self) -> int:
        return self.operator.num_examples

    def describe(self) -> dict:
        """The full operator's facts, plus the block (its leaves and size)."""
        info = dict(self.operator.describe()) if hasattr(self.operator, "describe") else {}
        info["block"] = dict(leaves=list(self.leaf_names), num_params=self.dim,
                             of_num_params=_tree.tree_size(self.full_like))
        return info


def _leaf_names(tree: PyTree) -> list[str]:
    return [name for name, _, _ in _tree.leaf_slices(tree)]


def _block_mask(subset, like: PyTree) -> tuple[bool, ...]:
    names = _leaf_names(like)
    if isinstance(subset, str) or (isinstance(subset, (list, tuple)) and subset
                                   and all(isinstance(s, str) for s in subset)):
        prefixes = (subset,) if isinstance(subset, str) else tuple(subset)
        mask = [False] * len(names)
        for prefix in prefixes:
            stem = prefix.rstrip("/")
            hits = [i for i, n in enumerate(names) if n == stem or n.startswith(stem + "/")]
            if not stem or not hits:
                raise ValueError(f"prefix {prefix!r} matches no parameter; the parameters are "
                                 f"{names}.")
            for i in hits:
                mask[i] = True
        return tuple(mask)
    if jax.tree_util.tree_structure(subset) != jax.tree_util.tree_structure(like):
        raise ValueError("`subset` must be a prefix, a sequence of prefixes, or a pytree of bools "
                         "with the structure of the parameters.")
    mask = tuple(bool(np.all(m)) for m in jax.tree_util.tree_leaves(subset))
    if not any(mask):
        raise ValueError("`subset` selects no parameter.")
    return mask


def restrict(matvec: Callable[[PyTree], PyTree], subset: Any, *, like: PyTree = None
             ) -> RestrictedOperator:
    r"""The block :math:`H_{SS}` of a symmetric operator on a subset S of the parameter leaves.

    :math:`v_S \mapsto [H\,(v_S \oplus 0)]_S` costs one product with the full operator. The
    result is itself an operator (``dim``, ``like``, ``describe()``), so
    :func:`top_eigenpairs`, :func:`spectral_density` and the metrics apply to it unchanged: the
    top eigenvectors of one layer's Hessian (or GGN) block, its spectrum, f_top of that
    layer's gradient.

    Args:
      matvec: ``v -> H v`` on parameter pytrees, e.g. :func:`dataset_hvp` or
        :func:`dataset_ggn` (or a :class:`RestrictedOperator`, to restrict further).
      subset: which leaves form S: a prefix of their "/"-joined paths
        (:func:`hessian_subspace.leaf_slices` naming), matched on whole path components ("dense_1"
        selects "dense_1/kernel" and "dense_1/bias", not "dense_10/..."), a sequence of such
        prefixes, or a pytree of bools with the structure of the parameters (one per leaf).
      like: the parameter template (default ``matvec.like``).

    Returns:
      A :class:`RestrictedOperator` acting on pytrees shaped like its ``like``.

    Example:
      >>> import jax.numpy as jnp
      >>> import hessian_subspace as hs
      >>> h = jnp.arange(1.0, 10.0).reshape(3, 3); h = h + h.T
      >>> params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
      >>> def matvec(v):
      ...     out = h @ jnp.concatenate([v["a"], v["b"]])
      ...     return {"a": out[:2], "b": out[2:]}
      >>> block = hs.restrict(matvec, "a", like=params)
      >>> block.dim, block({"a": jnp.array([1.0, 0.0]), "b": None})["a"]  # H[:2, 0]
      (2, Array([2., 6.], dtype=float32))
    """
    if like is None:
        like = getattr(matvec, "like", None)
        if like is None:
            raise ValueError("`like` is required for a `matvec` without a `like` attribute.")
    operator = matvec if _is_pytree_operator(matvec) else jax.tree_util.Partial(matvec)
    return RestrictedOperator(operator=operator, full_like=like, mask=_block_mask(subset, like))


def _is_pytree_operator(matvec) -> bool:
    if not callable(matvec):
        raise ValueError(f"`matvec` must be callable, got {type(matvec).__name__}.")
    leaves = jax.tree_util.tree_leaves(matvec)
    return not (len(leaves) == 1 and leaves[0] is matvec)
