r"""GaLore's gradient subspace against the Hessian's (Zhao et al. 2024).

GaLore trains each weight matrix W (m × n) in a low-rank subspace of its gradient G: every T
steps it takes the top-r left singular vectors U of G (the right ones when m > n) and moves W
only within {U A : A ∈ R^{r×n}}, an (r·n)-dimensional subspace of the m·n parameters. Low-rank
optimisers are justified by "gradients live in a small subspace"; the paper's claim is about
the Hessian's top subspace. Per weight matrix this module measures both and how they relate:

- ``captured``: the fraction of the top-r eigenspace of the Hessian's diagonal block on W
  (:func:`hessian_subspace.restrict`) that lies in GaLore's subspace,
  :math:`\frac1r\sum_i \|U^\top V_i\|_F^2` (V_i the i-th block eigenvector as an m × n matrix);
  a random U captures r/m on average (``captured_random``);
- ``side_overlap``: eq. 5 between U and the top-r left singular subspace of [V_1 … V_r] (the
  row directions the block's top eigenvectors use);
- ``gradient_energy`` = ‖UᵀG‖²/‖G‖² (what rank r keeps of the gradient) and ``block_f_top``,
  the fraction of G in the block's top-r eigenspace (f_top of the layer);
- staleness: GaLore refreshes U every ``refresh_every`` steps. The transform keeps the U of
  its last refresh as state and records, at every checkpoint, eq. 5 between it and the
  current U and what the kept U still captures of the current block's top-r eigenspace.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

import hessian_subspace as hs
from hessian_subspace import _tree
from hessian_subspace.analysis.transforms import Transform

PyTree = Any


def projector(gradient: np.ndarray, rank: int) -> tuple[np.ndarray, str]:
    """GaLore's projector of an m × n gradient: the top-``rank`` left singular vectors
    ``(m, r)`` when m <= n (side "left"), else the right ones ``(n, r)`` (side "right")."""
    g = np.asarray(gradient, np.float64)
    u, _, vt = np.linalg.svd(g, full_matrices=False)
    return (u[:, :rank], "left") if g.shape[0] <= g.shape[1] else (vt[:rank].T, "right")


def _side(vectors: np.ndarray, side: str) -> np.ndarray:
    """Matrices ``(r, m, n)`` as seen by a projector on ``side``: ``(r, m, n)`` or ``(r, n, m)``."""
    return vectors if side == "left" else np.transpose(vectors, (0, 2, 1))


def captured(u: np.ndarray, vectors: np.ndarray, side: str) -> float:
    """Fraction of the span of the unit matrices ``vectors`` ``(r, m, n)`` (orthonormal as
    vectors) inside GaLore's subspace {U A} (left) or {A Uᵀ} (right)."""
    v = _side(vectors, side)
    return float(np.mean([np.sum((u.T @ vi) ** 2) for vi in v]))


def side_overlap(u: np.ndarray, vectors: np.ndarray, side: str) -> float:
    """Eq. 5 between U and the top-r singular subspace, on U's side, of [V_1 … V_r]."""
    v = _side(vectors, side)
    stacked = np.concatenate(list(v), axis=1)
    w = np.linalg.svd(stacked, full_matrices=False)[0][:, :u.shape[1]]
    return float(np.sum((u.T @ w) ** 2) / np.sqrt(u.shape[1] * w.shape[1]))


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum((a.T @ b) ** 2) / np.sqrt(a.shape[1] * b.shape[1]))


def _matrices(like: PyTree, rank: int, leaves: Sequence[str] | None) -> list[tuple[str, tuple]]:
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(like)[0]:
        name = _tree.path_name(path)
        shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
        if len(shape) != 2 or min(shape) <= rank:
            continue
        if leaves is not None and not any(name == p or name.startswith(p + "/")
                                          for p in leaves):
            continue
        out.append((name, shape))
    return out


def _state_key(name: str) -> str:
    return name.replace("/", ".")


def galore_subspace(rank: int = 4, *, refresh_every: int = 200,
                    leaves: Sequence[str] | None = None, tol: float = 1e-3,
                    name: str = "galore_subspace") -> Transform:
    r"""GaLore's rank-``rank`` gradient projector of every weight matrix against the top-r
    eigenvectors of the Hessian's diagonal block on it (module docstring).

    Record ``galore_subspace``: ``rank``, ``refresh_every``, ``layers[PATH]`` = ``{"shape",
    "side", "gradient_energy", "block_f_top", "captured", "captured_random", "side_overlap",
    "block_eigenvalues", "block_converged", "stale": {"since", "steps", "overlap",
    "captured"}}`` (``stale`` against the projector of the last refresh, before this
    checkpoint refreshes it), and ``mean`` over the layers of ``captured``, ``side_overlap``,
    ``gradient_energy`` and ``stale_overlap``. Its state is the projectors of the last refresh.

    Args:
      rank: GaLore's r (each matrix needs min(m, n) > r).
      refresh_every: GaLore's T, in steps: a checkpoint at least T steps after the last
        refresh refreshes the kept projectors.
      leaves: path prefixes of the matrices to measure (None: every 2-D leaf).
      tol: residual tolerance of each block's eigensolve.
      name: the transform's name.
    """
    rank = _tree.check_int("rank", rank, 1)
    refresh_every = _tree.check_int("refresh_every", refresh_every, 1)
    if not float(tol) > 0:
        raise ValueError(f"`tol` must be > 0, got {tol!r}")
    if leaves is not None:
        if isinstance(leaves, str):
            leaves = (leaves,)
        leaves = tuple(str(p) for p in leaves)

    def init(ctx):
        return {"refresh_step": np.asarray(-1), "projectors": {}}

    def update(ctx, state):
        op = ctx["operator"]
        if hasattr(op, "select"):
            raise ValueError(f"{name} restricts the whole-parameter operator itself; the "
                             "analyzer's operator is already a block")
        matrices = _matrices(op.like, rank, leaves)
        if not matrices:
            raise ValueError(f"{name}: no weight matrix with min(m, n) > rank = {rank}"
                             + (f" under {list(leaves)}" if leaves else ""))
        grads = {_tree.path_name(p): np.asarray(_tree.to_host(g), np.float64)
                 for p, g in jax.tree_util.tree_flatten_with_path(ctx["gradient"])[0]}
        last = int(state["refresh_step"])
        kept = state.get("projectors", {})
        refresh = last < 0 or ctx.step - last >= refresh_every
        layers, new = {}, {}
        for i, (path, shape) in enumerate(matrices):
            g = grads[path]
            u, side = projector(g, rank)
            block = hs.restrict(op, path)
            key = ctx.rng(31 + i)
            eig = hs.top_eigenpairs(block, hs.random_start_vector(key, block.like), rank,
                                    tol=tol, key=key)
            ctx.count_hvps(int(eig.num_matvecs))
            vectors = np.asarray(eig.eigenvectors, np.float64).reshape(rank, *shape)
            gnorm2 = float(np.sum(g * g))
            entry = dict(
                shape=list(shape), side=side,
                gradient_energy=float(np.sum((u.T @ _side(g[None], side)[0]) ** 2)) / gnorm2
                if gnorm2 > 0 else None,
                block_f_top=float(np.sum((vectors.reshape(rank, -1) @ g.ravel()) ** 2))
                / gnorm2 if gnorm2 > 0 else None,
                captured=captured(u, vectors, side),
                captured_random=rank / (shape[0] if side == "left" else shape[1]),
                side_overlap=side_overlap(u, vectors, side),
                block_eigenvalues=np.asarray(eig.eigenvalues, np.float64),
                block_converged=bool(np.all(eig.converged)))
            old = kept.get(_state_key(path))
            if old is not None and old.shape == u.shape:
                entry["stale"] = dict(since=last, steps=ctx.step - last,
                                      overlap=_overlap(u, old),
                                      captured=captured(old, vectors, side))
            layers[path] = entry
            new[_state_key(path)] = u.astype(np.float32) if refresh else old
        mean = {k: float(np.mean([e[k] for e in layers.values() if e.get(k) is not None]))
                for k in ("captured", "side_overlap", "gradient_energy")}
        stale = [e["stale"]["overlap"] for e in layers.values() if "stale" in e]
        mean["stale_overlap"] = float(np.mean(stale)) if stale else None
        record = dict(rank=rank, refresh_every=refresh_every, refreshed=refresh,
                      layers=layers, mean=mean)
        new_state = {"refresh_step": np.asarray(ctx.step if refresh else last),
                     "projectors": {k: v for k, v in new.items() if v is not None}}
        return {name: record}, new_state

    return Transform(name=name, update=update, init=init, requires=("gradient",),
                     provides=(name,),
                     config=dict(rank=rank, refresh_every=refresh_every, leaves=leaves, tol=tol),
                     records=(name,))
