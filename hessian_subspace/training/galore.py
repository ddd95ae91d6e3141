r"""GaLore (Zhao et al. 2024) as an optax transformation: Adam in a low-rank gradient subspace.

For every weight matrix W (m × n, min(m, n) > r) GaLore keeps a projector P: every
``refresh_every`` updates (the first included) the top-r left singular vectors of the gradient
G when m <= n, else the right ones. The Adam moments live in the projected space,
:math:`R = P^\top G` (r × n) or :math:`R = G P` (m × r), and the update is projected back:

.. math:: \Delta W = -\eta\,\alpha\, P\,\frac{\hat m}{\sqrt{\hat v}+\epsilon}\quad
          \text{(or } -\eta\,\alpha\,\frac{\hat m}{\sqrt{\hat v}+\epsilon}P^\top\text{)},

with :math:`\hat m, \hat v` Adam's bias-corrected moments of R and α GaLore's ``scale``. Other
leaves (biases, normalisation scales, convolution kernels, small matrices) take plain Adam
steps, as in GaLore's reference code for modules it does not target. The moments are not reset
when P is refreshed (GaLore keeps them).

Call ``update`` inside ``jax.jit``: the refresh is a ``jax.lax.cond``, so one compiled step
serves refresh and non-refresh updates.

Reference: J. Zhao, Z. Zhang, B. Chen, Z. Wang, A. Anandkumar, Y. Tian, "GaLore: Memory-efficient
LLM training by gradient low-rank projection", ICML 2024.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hessian_subspace import _tree

PyTree = Any


class GaLoreState(NamedTuple):
    count: jax.Array  # updates so far (int32)
    projectors: PyTree  # per leaf: P, (m, r) or (n, r); None for a leaf GaLore does not project
    mu: PyTree  # Adam's first moment, projected shape for projected leaves
    nu: PyTree  # Adam's second moment


def projected(shape: tuple, rank: int) -> str | None:
    """"left" (P is m × r), "right" (P is n × r) or None (plain Adam) for a leaf's shape."""
    if len(shape) != 2 or min(shape) <= rank:
        return None
    return "left" if shape[0] <= shape[1] else "right"


def _project(g, p, side):
    return p.T @ g if side == "left" else g @ p


def _back(n, p, side):
    return p @ n if side == "left" else n @ p.T


def _top_singular(g, rank, side):
    u, _, vt = jnp.linalg.svd(g, full_matrices=False)
    return u[:, :rank] if side == "left" else vt[:rank].T


def galore(learning_rate: float, rank: int, *, refresh_every: int = 200, scale: float = 0.25,
           b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
           ) -> optax.GradientTransformation:
    """GaLore's Adam (module docstring).

    Args:
      learning_rate: η.
      rank: r, the projector's rank.
      refresh_every: T, updates between projector refreshes.
      scale: α, GaLore's scale of the projected update (0.25 in the paper).
      b1, b2, eps: Adam's.
    """
    if isinstance(learning_rate, bool) or not float(learning_rate) > 0:
        raise ValueError(f"`learning_rate` must be > 0, got {learning_rate!r}")
    rank = _tree.check_int("rank", rank, 1)
    refresh_every = _tree.check_int("refresh_every", refresh_every, 1)
    for label, value in (("scale", scale), ("eps", eps)):
        if isinstance(value, bool) or not float(value) > 0:
            raise ValueError(f"`{label}` must be > 0, got {value!r}")
    for label, value in (("b1", b1), ("b2", b2)):
        if not 0 <= float(value) < 1:
            raise ValueError(f"`{label}` must be in [0, 1), got {value!r}")

    def shapes(p):
        side = projected(p.shape, rank)
        if side is None:  # None, not a zero-size array: orbax cannot save those
            return None, jnp.zeros_like(p)
        m, n = p.shape
        proj = jnp.zeros((m if side == "left" else n, rank), p.dtype)
        moment = jnp.zeros((rank, n) if side == "left" else (m, rank), p.dtype)
        return proj, moment

    def init(params):
        pairs = jax.tree_util.tree_map(shapes, params)
        first = lambda t: jax.tree_util.tree_map(  # noqa: E731
            lambda _, pair: pair[0], params, t)
        second = lambda t: jax.tree_util.tree_map(  # noqa: E731
            lambda _, pair: pair[1], params, t)
        moments = second(pairs)
        return GaLoreState(count=jnp.zeros((), jnp.int32), projectors=first(pairs),
                           mu=moments, nu=jax.tree_util.tree_map(jnp.zeros_like, moments))

    def update(grads, state, params=None):
        del params
        count = state.count + 1
        refresh = state.count % refresh_every == 0

        def one(g, p, mu, nu):
            side = projected(g.shape, rank)
            if side is not None:
                p = jax.lax.cond(refresh, lambda: _top_singular(g, rank, side).astype(p.dtype),
                                 lambda: p)
                r = _project(g, p, side)
            else:
                r = g
            mu = b1 * mu + (1 - b1) * r
            nu = b2 * nu + (1 - b2) * r * r
            t = count.astype(mu.dtype)  # bias corrections in the leaf's own precision
            n = (mu / (1 - b1**t)) / (jnp.sqrt(nu / (1 - b2**t)) + eps)
            out = -learning_rate * (scale * _back(n, p, side) if side is not None else n)
            return out.astype(g.dtype), p, mu, nu

        leaves, treedef = jax.tree_util.tree_flatten(grads)
        parts = [one(g, p, m, v) for g, p, m, v in zip(
            leaves, treedef.flatten_up_to(state.projectors), treedef.flatten_up_to(state.mu),
            treedef.flatten_up_to(state.nu), strict=True)]
        unflat = lambda i: treedef.unflatten([x[i] for x in parts])  # noqa: E731
        return unflat(0), GaLoreState(count=count, projectors=unflat(1), mu=unflat(2),
                                      nu=unflat(3))

    return optax.GradientTransformation(init, update)
