r"""Where the loss goes along chosen directions: the optimizer's step split into its top-k and
bulk parts, and loss landscapes along top, bulk, random and gradient directions.

============================  ======================  ==========================================
factory                       requires                record keys
============================  ======================  ==========================================
:func:`loss_decrease`         gradient, eigenpairs    ``loss_decrease`` (per update: ΔL of the
                                                      step, of P_top u, of P_bulk u, and their
                                                      second-order predictions)
:func:`loss_landscape`        gradient, eigenpairs    ``loss_landscape`` (1-D slices, their
                                                      curvature against dᵀHd); 2-D surfaces in
                                                      ``loss_landscape_surfaces/``
============================  ======================  ==========================================

Notation: θ the parameters, g = ∇L and H = ∇²L of the mean loss over the analysis set (H is the
analyzer's curvature operator: the Hessian, or the Gauss-Newton matrix), V the top-k
eigenvectors (rows), P_top = VᵀV and P_bulk = I − P_top. Every loss here is an exact mean over
the analysis set; the loss *changes* L(θ + d) − L(θ) are averaged per batch of differences, so
they do not lose the digits that subtracting two rounded means would.

References:
  M. Song, K. Ahn, C. Yun, "Does SGD really happen in tiny subspaces?", 2024 (the top
  component of the step oscillates, the bulk component makes the loss go down).
  H. Li, Z. Xu, G. Taylor, C. Studer, T. Goldstein, "Visualizing the loss landscape of neural
  nets", NeurIPS 2018 (filter normalisation).
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import flatten_util

from hessian_subspace import _tree, curvature, metrics
from hessian_subspace.analysis.sources import CheckpointError, conform
from hessian_subspace.analysis.transforms import Stored, Transform

PyTree = Any


# --------------------------------------------------------------------------------------------
# Loss changes at many points, in one compiled program.


@functools.partial(jax.jit, static_argnames=("point_batch",))
def loss_changes(loss_fn, params: PyTree, batches, points: jax.Array, *,
                 point_batch: int | None = None) -> tuple[jax.Array, jax.Array]:
    r"""``(L(θ), [L(θ + d_j) − L(θ)]_j)`` for the rows ``d_j`` of ``points`` (flat, in
    ``ravel_pytree`` order), exact means over ``batches`` (a ``BatchedData``, e.g. the
    analyzer's ``ctx["batches"]``).

    The points are vmapped, ``point_batch`` at a time (None: all at once), inside the one loop
    over the data: the whole set costs one pass over the data of batched forward passes.
    Differences are taken per batch before the mean.
    """
    flat, unravel = flatten_util.ravel_pytree(params)

    def per_batch(batch):
        base = loss_fn(params, batch)

        def change(d):
            return loss_fn(unravel(flat + d.astype(flat.dtype)), batch) - base

        return base, jax.lax.map(change, points, batch_size=point_batch)

    return curvature.dataset_mean(per_batch, batches)


def split(u: jax.Array, basis: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(P_top u, P_bulk u)`` for orthonormal rows ``basis``."""
    top = (basis @ u) @ basis
    return top, u - top


def _roundoff(base: float, dtype) -> float:
    """The size of a loss change that rounding alone can make (a few ulps of the loss)."""
    return float(8 * np.finfo(np.dtype(dtype)).eps * max(abs(base), np.finfo(np.float32).tiny))


def _full_operator(ctx, name: str):
    op = ctx["operator"]
    if hasattr(op, "select"):
        raise ValueError(f"{name} moves all parameters; the analyzer's operator is a block "
                         "(config.operator.block): run it on the whole-parameter operator")
    return op


# --------------------------------------------------------------------------------------------
# Where the loss decreases.


def _batch_hash(batch: PyTree) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(batch):
        x = np.ascontiguousarray(_tree.to_host(leaf))
        h.update(f"{x.dtype}{x.shape}".encode())
        h.update(x.tobytes())
    return h.hexdigest()[:16]


@jax.jit
def _batch_gradient(loss_fn, params: PyTree, batch: PyTree) -> PyTree:
    return jax.grad(loss_fn)(params, batch)


def _optimizer_update(optimizer, opt_state, grad, params):
    return optimizer.update(grad, opt_state, params)[0]


def _has_arrays(tree: PyTree) -> bool:
    return bool(jax.tree_util.tree_leaves(tree))


def loss_decrease(k: int, *, learning_rate: float | None = None, optimizer: Any = None,
                  optimizer_key: str = "optimizer", batch_key: str = "next_batch",
                  point_batch: int | None = None, of: str = "eigenpairs",
                  name: str = "loss_decrease") -> Transform:
    r"""Where the loss goes down: the change of the loss over one optimizer step u, and over its
    parts in the top-k subspace and in the bulk (Song, Ahn, Yun 2024).

    For each update u, ``loss_decrease[KIND]`` records exact loss changes over the analysis set

    - ``full`` = L(θ + u) − L(θ), ``top`` = L(θ + P_top u) − L(θ), ``bulk`` = L(θ + P_bulk u)
      − L(θ);
    - their second-order predictions ``predicted_full``, ``predicted_top``,
      ``predicted_bulk`` = gᵀd + ½ dᵀHd, split into ``slope_*`` = gᵀd and ``curvature_*`` =
      ½ dᵀHd (two curvature products: H P_top u and H P_bulk u);
    - ``bulk_share`` = bulk / (top + bulk), the part of the decrease made by the bulk
      component (None when top + bulk is within round-off of 0), ``top_fraction`` =
      ‖P_top u‖²/‖u‖², ``update_norm``, and ``roundoff``: changes below it are rounding.

    KIND is ``gd`` for u = −η g (``learning_rate`` η; g the gradient on the analysis set: the
    actual step of full-batch gradient descent when that set is the training set) and ``step``
    for the optimizer's own step, ``u = optimizer.update(g_b, opt_state, θ)``, where g_b is the
    gradient of the mini-batch ``ctx["extras"][batch_key]`` (the batch the run takes next; the
    analysis set's gradient when the source does not give it: ``gradient_from`` says which,
    ``batch_sha256`` which batch) and ``opt_state`` comes from ``ctx["extras"]
    [optimizer_key]`` (the checkpoint's optimizer state, restored into ``optimizer.init(θ)``'s
    structure; not needed by an optimizer without state, such as ``optax.sgd``).

    Args:
      k: size of the top subspace (the eigenpairs' first k).
      learning_rate: η of the gradient step (None: no ``gd`` entry).
      optimizer: an ``optax.GradientTransformation`` (None: no ``step`` entry).
      optimizer_key: the extras entry with the optimizer state.
      batch_key: the extras entry with the next mini-batch.
      point_batch: loss evaluations vmapped at once (None: all).
      of: the eigenpairs entry.
      name: the transform's name.
    """
    k = _tree.check_int("k", k, 1)
    if learning_rate is None and optimizer is None:
        raise ValueError("give `learning_rate` (the step -η g), `optimizer` (its own step), or "
                         "both")
    if learning_rate is not None and (isinstance(learning_rate, bool)
                                      or not float(learning_rate) > 0):
        raise ValueError(f"`learning_rate` must be > 0, got {learning_rate!r}")
    if optimizer is not None and not (hasattr(optimizer, "init")
                                      and hasattr(optimizer, "update")):
        raise TypeError(f"`optimizer` must be an optax GradientTransformation, got "
                        f"{type(optimizer).__name__}")
    if point_batch is not None:
        point_batch = _tree.check_int("point_batch", point_batch, 1)

    def update(ctx, state):
        op = _full_operator(ctx, name)
        params = ctx["params"]
        g, unravel = flatten_util.ravel_pytree(ctx["gradient"])
        basis = jnp.asarray(ctx[of].eigenvectors[:k], g.dtype)
        out = {}
        if learning_rate is not None:
            out["gd"] = _measure(ctx, op, params, g, -float(learning_rate) * g, basis, unravel,
                                 point_batch)
            out["gd"]["learning_rate"] = float(learning_rate)
        if optimizer is not None:
            u, where = _optimizer_step(ctx, params, optimizer, optimizer_key, batch_key, name)
            out["step"] = _measure(ctx, op, params, g, _tree.as_flat(u).astype(g.dtype), basis,
                                   unravel, point_batch)
            out["step"].update(where)
        return {"loss_decrease": out}, state

    return Transform(name=name, update=update, requires=("gradient", of),
                     provides=("loss_decrease",),
                     config=dict(k=k, learning_rate=learning_rate, optimizer=optimizer,
                                 optimizer_key=optimizer_key, batch_key=batch_key, of=of),
                     records=("loss_decrease",), needs={of: k})


def _optimizer_step(ctx, params, optimizer, optimizer_key, batch_key, name):
    """The optimizer's step at this checkpoint and what it was computed from."""
    template = optimizer.init(params)
    extras = ctx["extras"]
    if optimizer_key in extras and extras[optimizer_key] is not None:
        try:
            opt_state = conform(extras[optimizer_key], template, "the optimizer state")
        except CheckpointError as e:
            raise ValueError(f"transform {name!r}: {e} (`optimizer` is not the optimizer that "
                             "made the checkpoint)") from None
    elif _has_arrays(template):
        raise ValueError(
            f"transform {name!r}: the optimizer has state, and ctx['extras'] has none under "
            f"{optimizer_key!r}: run_checkpoints(..., optimizer=True), or "
            f"analyzer(step, params, extras={{{optimizer_key!r}: opt_state}})")
    else:
        opt_state = template
    batch = extras.get(batch_key)
    if batch is not None:
        grad = _batch_gradient(ctx["loss_fn"], params, jax.tree_util.tree_map(jnp.asarray,
                                                                                batch))
        where = dict(gradient_from="next_batch", batch_sha256=_batch_hash(batch),
                     batch_examples=int(np.shape(jax.tree_util.tree_leaves(batch)[0])[0]))
    else:
        grad = ctx["gradient"]
        where = dict(gradient_from="analysis_set")
    u = _optimizer_update(optimizer, opt_state, grad, params)
    if not bool(np.all(np.isfinite(_tree.to_host(_tree.as_flat(u))))):
        raise FloatingPointError(f"{name}: the optimizer's step is not finite")
    return u, where


def _measure(ctx, op, params, g, u, basis, unravel, point_batch) -> dict:
    top, bulk = split(u, basis)
    base, changes = loss_changes(ctx["loss_fn"], params, ctx["batches"],
                                 jnp.stack([u, top, bulk]), point_batch=point_batch)
    h_top = _tree.as_flat(op(unravel(top)))
    h_bulk = _tree.as_flat(op(unravel(bulk)))
    ctx.count_hvps(2)
    changes = np.asarray(changes, np.float64)
    out: dict[str, Any] = {}
    for part, d, hd in (("full", u, h_top + h_bulk), ("top", top, h_top),
                        ("bulk", bulk, h_bulk)):
        slope, curv = float(g @ d), 0.5 * float(d @ hd)
        out[f"slope_{part}"] = slope
        out[f"curvature_{part}"] = curv
        out[f"predicted_{part}"] = slope + curv
    out.update(full=float(changes[0]), top=float(changes[1]), bulk=float(changes[2]))
    if not np.all(np.isfinite(changes)):
        raise FloatingPointError("a loss change along the step is not finite")
    roundoff = _roundoff(float(base), g.dtype)
    total = out["top"] + out["bulk"]
    unorm = float(jnp.linalg.norm(u))
    out.update(loss=float(base), roundoff=roundoff, update_norm=unorm,
               top_fraction=float(jnp.sum(top * top)) / unorm**2 if unorm > 0 else None,
               bulk_share=out["bulk"] / total if abs(total) > 2 * roundoff else None)
    return out


# --------------------------------------------------------------------------------------------
# Loss landscapes.


def filter_normalize(direction: PyTree, params: PyTree) -> PyTree:
    r"""Li et al.'s filter normalisation: every filter of ``direction`` (a slice along a
    kernel's last axis: a dense layer's output unit, a convolution's output channel) rescaled
    to the norm of the same filter of ``params``; leaves with fewer than 2 axes (biases,
    normalisation scales) set to zero, as Li et al. do."""

    def one(d, p):
        if np.ndim(p) < 2:
            return jnp.zeros_like(d)
        axes = tuple(range(np.ndim(p) - 1))
        dn = jnp.sqrt(jnp.sum(d * d, axis=axes, keepdims=True))
        pn = jnp.sqrt(jnp.sum(p * p, axis=axes, keepdims=True))
        return d * jnp.where(dn > 0, pn / jnp.where(dn > 0, dn, 1), 0)

    return jax.tree_util.tree_map(one, direction, params)


def _directions(g, basis_all, k, num_top, num_bulk, num_random, use_gradient, key,
                unravel, like, normalization):
    """``{name: flat direction}``: top1.., bulk1.., random1.., gradient."""
    p = g.shape[0]
    out = {f"top{i + 1}": basis_all[i] for i in range(num_top)}
    keys = jax.random.split(key, 2)
    if num_bulk:
        r = jax.random.normal(keys[0], (num_bulk, p), g.dtype)
        r = r - (r @ basis_all[:k].T) @ basis_all[:k]
        out.update({f"bulk{i + 1}": r[i] / jnp.linalg.norm(r[i]) for i in range(num_bulk)})
    if num_random:
        r = jax.random.normal(keys[1], (num_random, p), g.dtype)
        out.update({f"random{i + 1}": r[i] / jnp.linalg.norm(r[i]) for i in range(num_random)})
    if use_gradient:
        out["gradient"] = g / jnp.linalg.norm(g)
    if normalization == "filter":
        out = {n: _tree.as_flat(filter_normalize(unravel(d), like)).astype(g.dtype)
               for n, d in out.items()}
    return out


def loss_landscape(k: int, *, num_top: int = 2, num_bulk: int = 2, num_random: int = 2,
                   gradient: bool = True, radius: float = 1.0, num_points: int = 21,
                   surfaces: Sequence[tuple[str, str]] = (("top1", "top2"),
                                                          ("top1", "random1")),
                   surface_points: int = 11, normalization: str = "unit",
                   point_batch: int | None = 64, seed: int | None = None,
                   of: str = "eigenpairs", name: str = "loss_landscape") -> Transform:
    r"""1-D loss slices L(θ + t d) along the top eigenvectors, random directions in the bulk
    (orthogonal to the top-k subspace), random directions and the gradient, and 2-D surfaces
    L(θ + a d₁ + b d₂) (Li et al. 2018) — each checked against the curvature the operator
    gives: the finite-difference second derivative of the slice at 0 against dᵀHd.

    Record ``loss_landscape``: ``t`` (the grid, ``num_points`` from −radius to radius),
    ``loss`` (L(θ)), ``roundoff`` and, per direction, ``slices[NAME]`` = ``{"change": [L(θ +
    t d) − L(θ)], "slope": gᵀd, "curvature": dᵀHd, "curvature_fd": the central difference at
    the grid's spacing h, "norm": ‖d‖}``. The 2-D surfaces go to
    ``NAME_surfaces/step_<step>.npz`` (``t``: the surface grid, ``A__B``: the change on the
    grid, first axis along A). All
    points are evaluated in one pass over the data, ``point_batch`` vmapped at a time.

    Args:
      k: size of the top subspace (the bulk directions are orthogonal to its span).
      num_top: top eigenvectors (``top1`` …; the eigenpairs must hold that many).
      num_bulk: random bulk directions (``bulk1`` …).
      num_random: random directions (``random1`` …).
      gradient: also the gradient direction (``gradient``).
      radius: the largest |t|.
      num_points: odd, at least 3: the grid includes t = 0 and ±h.
      surfaces: pairs of direction names for 2-D surfaces (() for none).
      surface_points: odd grid size per axis of each surface.
      normalization: ``"unit"`` (‖d‖ = 1) or ``"filter"`` (:func:`filter_normalize`).
      point_batch: loss evaluations vmapped at once (None: all at once).
      seed: of the random directions (default: the analyzer's seed).
      of: the eigenpairs entry.
      name: the transform's name.
    """
    k = _tree.check_int("k", k, 1)
    num_top = _tree.check_int("num_top", num_top, 0)
    num_bulk = _tree.check_int("num_bulk", num_bulk, 0)
    num_random = _tree.check_int("num_random", num_random, 0)
    for label, n in (("num_points", num_points), ("surface_points", surface_points)):
        n = _tree.check_int(label, n, 3)
        if n % 2 == 0:
            raise ValueError(f"`{label}` must be odd (the grid holds t = 0), got {n}")
    if isinstance(radius, bool) or not float(radius) > 0:
        raise ValueError(f"`radius` must be > 0, got {radius!r}")
    if normalization not in ("unit", "filter"):
        raise ValueError(f"`normalization` must be 'unit' or 'filter', got {normalization!r}")
    if point_batch is not None:
        point_batch = _tree.check_int("point_batch", point_batch, 1)
    names = ([f"top{i + 1}" for i in range(num_top)] + [f"bulk{i + 1}" for i in range(num_bulk)]
             + [f"random{i + 1}" for i in range(num_random)] + ["gradient"] * bool(gradient))
    if not names:
        raise ValueError("no directions: give num_top, num_bulk, num_random or gradient")
    surfaces = tuple(tuple(s) for s in surfaces)
    for pair in surfaces:
        if len(pair) != 2 or pair[0] == pair[1] or any(n not in names for n in pair):
            raise ValueError(f"`surfaces`: each entry is two different direction names of "
                             f"{names}, got {pair!r}")
    radius = float(radius)
    grid = np.linspace(-radius, radius, num_points)
    sgrid = np.linspace(-radius, radius, surface_points)

    def update(ctx, state):
        op = _full_operator(ctx, name)
        params = ctx["params"]
        g, unravel = flatten_util.ravel_pytree(ctx["gradient"])
        if gradient and not bool(jnp.any(g != 0)):
            raise metrics.UndefinedMetricError(
                "the full-data gradient is exactly zero: no gradient direction to slice along")
        eig = ctx[of]
        basis_all = jnp.asarray(eig.eigenvectors, g.dtype)
        key = jax.random.key(ctx["seed"] if seed is None else seed)
        key = jax.random.fold_in(key, ctx.step)
        dirs = _directions(g, basis_all, k, num_top, num_bulk, num_random, gradient,
                           key, unravel, op.like, normalization)
        d = jnp.stack([dirs[n] for n in names])  # (m, p)
        t = jnp.asarray(grid, g.dtype)
        points = [(t[:, None, None] * d[None]).reshape(-1, d.shape[1])]
        a, b = jnp.meshgrid(jnp.asarray(sgrid, g.dtype), jnp.asarray(sgrid, g.dtype),
                            indexing="ij")
        for first, second in surfaces:
            points.append((a.reshape(-1, 1) * dirs[first] + b.reshape(-1, 1) * dirs[second]))
        base, changes = loss_changes(ctx["loss_fn"], params, ctx["batches"],
                                     jnp.concatenate(points), point_batch=point_batch)
        changes = np.asarray(changes, np.float64)
        if not np.all(np.isfinite(changes)):
            raise FloatingPointError(f"{name}: a loss on the landscape grid is not finite")
        hd = jax.lax.map(lambda v: _tree.as_flat(op(unravel(v))), d)
        ctx.count_hvps(len(names))
        slices_ = changes[:len(grid) * len(names)].reshape(len(grid), len(names))
        mid, h = len(grid) // 2, grid[1] - grid[0]
        out_slices = {}
        for j, n in enumerate(names):
            col = slices_[:, j]
            out_slices[n] = dict(change=col, slope=float(g @ d[j]),
                                 curvature=float(d[j] @ hd[j]),
                                 curvature_fd=float((col[mid + 1] + col[mid - 1]) / h**2),
                                 norm=float(jnp.linalg.norm(d[j])))
        stored = Stored(t=sgrid)
        offset = len(grid) * len(names)
        for first, second in surfaces:
            size = len(sgrid) ** 2
            stored[f"{first}__{second}"] = changes[offset:offset + size].reshape(
                len(sgrid), len(sgrid))
            offset += size
        out = {name: dict(t=grid, loss=float(base), roundoff=_roundoff(float(base), g.dtype),
                          normalization=normalization, slices=out_slices)}
        if surfaces:
            out[f"{name}_surfaces"] = stored
        return out, state

    return Transform(name=name, update=update, requires=("gradient", of), provides=(name,),
                     config=dict(k=k, num_top=num_top, num_bulk=num_bulk,
                                 num_random=num_random, gradient=gradient, radius=radius,
                                 num_points=num_points, surfaces=surfaces,
                                 surface_points=surface_points, normalization=normalization,
                                 point_batch=point_batch, seed=seed, of=of),
                     records=(name,), needs={of: max(k, num_top)})
