r"""The paper's measurements as transforms (factories returning :class:`Transform` values).

Notation (Gur-Ari, Roberts, Dyer 2018): g = ∇L and H = ∇²L of the mean loss over the analysis
set (or the Gauss-Newton matrix G, or a diagonal block, whatever ``ctx["operator"]`` is);
V = the computed eigenvectors, largest eigenvalue first.

============================  ======================  ==========================================
factory                       requires                record keys (context entries)
============================  ======================  ==========================================
:func:`loss`                  —                       ``train_loss``, ``train_accuracy``, ``test_*``
:func:`gradient`              —                       ``grad_norm`` (``gradient``)
:func:`eigenpairs`            —                       ``eigenvalues``, ``residuals``, ``converged``
                                                      … (``eigenpairs``; basis in its state)
:func:`f_top`                 gradient, eigenpairs    ``f_top``, ``f_next``, bounds, mini-batches
:func:`overlap_g_hg`          gradient                ``overlap_g_hg``
:func:`c2`                    gradient, eigenpairs    ``c2``
:func:`layers`                eigenpairs              ``lambda_max``, ``top_eigenvector_layer_mass``
:func:`subspace_overlap`      eigenpairs              ``subspace_overlap`` (against earlier steps)
:func:`ggn`                   eigenpairs              ``ggn_eigenvalues``, ``f_top_ggn`` …
============================  ======================  ==========================================

The spectra (:func:`hessian_subspace.analysis.slq`, :func:`~hessian_subspace.analysis.
dense_spectrum`) are in :mod:`.spectra`.

Every jitted function here takes parameters, data and the loss (a pytree binding the model
state) as inputs, so the checkpoints of one run share compiled programs.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import flatten_util

import hessian_subspace as hs
from hessian_subspace import _tree, curvature, krylov, metrics
from hessian_subspace.analysis.transforms import Transform

PyTree = Any

# Bases are stored in float32 (rounding unit u): each stored row moves by at most u in norm
# relative, which moves eq. 5 by at most about 4u; error bars on overlaps include this.
BASIS_ROUNDING = 5 * 2.0**-24


def _flat(tree: PyTree) -> jax.Array:
    return flatten_util.ravel_pytree(tree)[0]


# --------------------------------------------------------------------------------------------
# Loss, accuracy and the gradient.


@jax.jit
def _data_metrics(metrics_fn, params: PyTree, batches) -> dict:
    return curvature.dataset_mean(lambda b: metrics_fn(params, b), batches)


def loss(metrics_fn: Callable | None = None, *, name: str = "loss") -> Transform:
    """Mean loss (and whatever else ``metrics_fn`` returns, e.g. accuracy) over the analysis
    set, recorded as ``train_<key>``, and over the test set (if the analyzer has one) as
    ``test_<key>``.

    Args:
      metrics_fn: ``metrics(params, batch[, state]) -> {"loss": ..., "accuracy": ...}``, each a
        mean over the batch (like the loss; state as for the analyzer's loss). None: the
        analyzer's loss alone.
      name: the transform's name.
    """
    if metrics_fn is not None and not callable(metrics_fn):
        raise TypeError(f"`metrics_fn` must be callable, got {type(metrics_fn).__name__}")

    def update(ctx, state):
        if metrics_fn is None:
            fn = _loss_only(ctx["loss_fn"])
        else:
            fn = ctx.bind(metrics_fn)
        out = {}
        for prefix, batches in (("train", ctx["batches"]), ("test", ctx["test_batches"])):
            if batches is None:
                continue
            values = _data_metrics(fn, ctx["params"], batches)
            out.update({f"{prefix}_{k}": float(v) for k, v in values.items()})
        return out, state

    return Transform(name=name, update=update, provides=("train_loss",),
                     config=dict(metrics_fn=metrics_fn),
                     records=("train_loss", "test_loss") if metrics_fn is None
                     else ("train_*", "test_*"))


def _loss_only(loss_fn):
    return jax.tree_util.Partial(_loss_dict, loss_fn)


def _loss_dict(loss_fn, params, batch):
    return {"loss": loss_fn(params, batch)}


def _num_examples(data: PyTree) -> int:
    return int(np.shape(jax.tree_util.tree_leaves(data)[0])[0])


@jax.jit
def _value_and_grad(loss_fn, params, batches):
    value, grad = curvature.dataset_mean(lambda b: jax.value_and_grad(loss_fn)(params, b),
                                         batches)
    return value, grad, jnp.linalg.norm(_flat(grad))


def gradient(*, name: str = "gradient") -> Transform:
    """The full-data gradient g of the mean loss (the paper measures g on the whole training
    set): context ``gradient`` (a pytree like the operator's vectors: the block's leaves when the
    operator is a block), record ``grad_norm`` (and ``block_grad_norm``).

    A non-finite gradient raises ``FloatingPointError``: the checkpoint gets a failure record.
    """

    def update(ctx, state):
        op = ctx["operator"]
        _, grad, norm = _value_and_grad(ctx["loss_fn"], ctx["params"], ctx["batches"])
        out = {"gradient": grad, "grad_norm": float(norm)}
        if not np.isfinite(out["grad_norm"]):
            raise FloatingPointError("the full-data gradient is not finite")
        if hasattr(op, "select"):  # A block: from here on g is the block's part.
            out["gradient"] = op.select(grad)
            out["block_grad_norm"] = float(jnp.linalg.norm(_flat(out["gradient"])))
        return out, state

    return Transform(name=name, update=update, provides=("gradient", "grad_norm"),
                     context_only=("gradient",), config={},
                     records=("grad_norm", "block_grad_norm"))


# --------------------------------------------------------------------------------------------
# Eigenpairs.


def warm_start_vector(key: jax.Array, previous_basis: jax.Array | None, like: PyTree,
                      noise: float = 0.1) -> PyTree:
    """A Lanczos start vector: a random combination of the previous checkpoint's top
    eigenvectors plus a little noise (or a random vector when there is none)."""
    cold = hs.random_start_vector(key, like)
    if previous_basis is None:
        return cold
    flat, unravel = flatten_util.ravel_pytree(like)
    basis = jnp.asarray(previous_basis, flat.dtype)
    coeffs = jax.random.normal(jax.random.fold_in(key, 1), (basis.shape[0],), flat.dtype)
    warm = coeffs @ basis
    cold_flat = _flat(cold)
    warm = warm / jnp.linalg.norm(warm) + noise * cold_flat / jnp.linalg.norm(cold_flat)
    return unravel(warm)


def _dtype_of(tree: PyTree):
    return jnp.result_type(*jax.tree_util.tree_leaves(tree))


def _cap(num_steps: int | None, num: int, dim: int) -> int | None:
    return None if num_steps is None else int(min(max(num_steps, num), dim))


def eigenpairs(k: int, *, tol: float = 1e-3, num_steps: int | None = None,
               block_size: int = 1, warm_start: bool = True, tracker: bool = False,
               tracker_blocks: int = 4, curvature_name: str | None = None,
               block: Any = "default", max_basis: int | None = None,
               memory_budget: float | None = None, name: str = "eigenpairs") -> Transform:
    """The top-k eigenpairs of the curvature operator (:func:`hessian_subspace.top_eigenpairs`),
    with verified residuals and converged flags.

    Context ``eigenpairs`` (an :class:`hessian_subspace.Eigenpairs`: ``eigenvectors`` are rows
    in ``ravel_pytree`` order); record ``eigenvalues``, ``residuals``, ``converged``,
    ``all_converged``, ``lanczos_hvps``, ``warm_start`` (and ``tracker_hvps``,
    ``tracker_converged``). Its state is the last basis (float32), eigenvalues and residuals
    with their ``step``: the warm start of the next checkpoint, and what the store keeps of
    every checkpoint (``store.state(t)["eigenpairs/eigenvectors"]``).

    The paper measures the top k and the "next k": ask for 2k here, and give k to
    :func:`f_top` and :func:`subspace_overlap`.

    Args:
      k: number of eigenpairs (at most the operator's dimension − 1).
      tol: relative residual tolerance.
      num_steps: Krylov cap (default: the solver's, max(6k, k + 40)).
      block_size: Lanczos block size (> 1 resolves repeated eigenvalues).
      warm_start: start from a random combination of the previous checkpoint's eigenvectors
        (its state).
      tracker: first try :func:`hessian_subspace.track_eigenpairs` from the previous basis
        (``tracker_blocks`` blocks), Lanczos when it does not converge.
      curvature_name: "hessian" or "ggn" (None: the analyzer's operator).
      block: leaf-path prefixes of a diagonal block (default: the analyzer's).
      max_basis: cap on the Krylov basis (vectors): thick-restarted Lanczos
        (:func:`hessian_subspace.top_eigenpairs`). Default: none, unless ``memory_budget``
        is smaller than the unrestarted basis.
      memory_budget: bytes per device for the Krylov basis (its vectors are split over the
        devices the operator's vectors are); when the unrestarted basis is bigger, the basis
        is capped to fit (thick restart, recorded as ``max_basis``). None: no cap.
      name: the transform's name and context entry.
    """
    k = _tree.check_int("k", k, 1)
    if not float(tol) > 0:
        raise ValueError(f"`tol` must be > 0, got {tol!r}")
    block_size = _tree.check_int("block_size", block_size, 1)
    tracker_blocks = _tree.check_int("tracker_blocks", tracker_blocks, 1)
    if num_steps is not None:
        num_steps = _tree.check_int("num_steps", num_steps, 1)
    if tracker and not warm_start:
        raise ValueError("`tracker` needs `warm_start`")
    if max_basis is not None:
        max_basis = _tree.check_int("max_basis", max_basis, k + 2)
    if memory_budget is not None:
        if isinstance(memory_budget, bool) or not float(memory_budget) > 0:
            raise ValueError(f"`memory_budget` must be > 0 bytes, got {memory_budget!r}")
        memory_budget = float(memory_budget)

    def init(ctx):
        return {"step": np.asarray(-1)}

    def update(ctx, state):
        op = ctx.operator(curvature_name, block=block) if (curvature_name or block != "default") \
            else ctx["operator"]
        key = ctx.rng(0)
        # The start vector only: the eigenpairs do not depend on it beyond the tolerance.
        previous = int(state["step"])
        prev_basis = state.get("eigenvectors") if warm_start and previous >= 0 else None
        if prev_basis is not None and prev_basis.shape[1:] != (op.dim,):
            prev_basis = None  # another operator's (a changed block): start cold
        if k > op.dim - 1:
            raise ValueError(
                f"{name}: k = {k} eigenpairs asked of a curvature operator of dimension "
                f"{op.dim} (the parameters analysed); at most {op.dim - 1}, so with the "
                f"paper's 2k pairs the top-k size must be <= {(op.dim - 1) // 2}")
        num = k
        out: dict[str, Any] = {}
        eig = None
        if prev_basis is not None and tracker and prev_basis.shape[0] >= num:
            tracked = hs.track_eigenpairs(
                op, jnp.asarray(prev_basis[:num], _dtype_of(op.like)), num, like=op.like,
                tol=tol, key=key, max_blocks=min(tracker_blocks, max(1, op.dim // num)))
            ctx.count_hvps(int(tracked.num_matvecs))
            out.update(tracker_hvps=int(tracked.num_matvecs),
                       tracker_converged=bool(np.all(tracked.converged)))
            if out["tracker_converged"]:
                eig = tracked
        if eig is None:
            v0 = warm_start_vector(key, prev_basis, op.like)
            cap = _basis_cap(op, num, num_steps, block_size, max_basis, memory_budget)
            steps = _cap(num_steps, num, op.dim) if cap is None else num_steps
            eig = hs.top_eigenpairs(op, v0, num, num_steps=steps, tol=tol, block_size=block_size,
                                    key=key, max_basis=cap)
            ctx.count_hvps(int(eig.num_matvecs))
            if cap is not None:
                out[_key(name, "max_basis")] = cap
        values = np.asarray(eig.eigenvalues, np.float64)
        out.update({
            name: eig, _key(name, "eigenvalues"): values,
            _key(name, "residuals"): np.asarray(eig.residuals),
            _key(name, "converged"): np.asarray(eig.converged),
            _key(name, "all_converged"): bool(np.all(eig.converged)),
            _key(name, "lanczos_hvps"): int(eig.num_matvecs),
            _key(name, "warm_start"): prev_basis is not None,
            _key(name, "warm_start_step"): previous if prev_basis is not None else None,
        })
        return out, basis_state(ctx.step, eig)

    return Transform(name=name, update=update, init=init, provides=(name,),
                     context_only=(name,),
                     config=dict(k=k, tol=tol, num_steps=num_steps, block_size=block_size,
                                 warm_start=warm_start, tracker=tracker,
                                 tracker_blocks=tracker_blocks, curvature=curvature_name,
                                 block=block, max_basis=max_basis,
                                 memory_budget=memory_budget),
                     records=tuple(_key(name, f) for f in EIGENPAIRS_KEYS), sizes={name: k},
                     state_affects_values=False)


def basis_state(step: int, eig: hs.Eigenpairs) -> dict[str, np.ndarray]:
    """A computed basis as state (host arrays): ``step``, ``eigenvectors`` (float32 rows: each
    moves by at most :data:`BASIS_ROUNDING`), ``eigenvalues`` (float64), ``residuals``."""
    return dict(step=np.asarray(int(step)),
                eigenvectors=_tree.to_host(jnp.asarray(eig.eigenvectors, jnp.float32)),
                eigenvalues=np.asarray(eig.eigenvalues, np.float64),
                residuals=np.asarray(eig.residuals))


# The record keys of `eigenpairs` (prefixed with NAME_ for another name).
EIGENPAIRS_KEYS = ("eigenvalues", "residuals", "converged", "all_converged", "lanczos_hvps",
                   "warm_start", "warm_start_step", "tracker_hvps", "tracker_converged",
                   "max_basis")


def _basis_cap(op, num: int, num_steps: int | None, block_size: int, max_basis: int | None,
               budget: float | None) -> int | None:
    """The basis cap: ``max_basis``, or what fits ``budget`` bytes per device when the
    unrestarted basis would not (None: no restart)."""
    if max_basis is not None:
        return min(max_basis, op.dim)
    if budget is None:
        return None
    devices = _vector_devices(op)
    itemsize = np.dtype(_dtype_of(op.like)).itemsize
    per_vector = itemsize * op.dim / devices
    full = _cap(num_steps, num, op.dim) or krylov.default_num_steps(num, op.dim, block_size)
    if full * per_vector <= budget:
        return None
    fits = int(budget // per_vector)
    if fits < num + 2 * block_size:
        raise ValueError(
            f"`memory_budget` {budget:.3g} bytes holds {fits} Krylov vectors of {op.dim} "
            f"parameters over {devices} devices; {num} eigenpairs need at least "
            f"{num + 2 * block_size}")
    return fits


def _vector_devices(op) -> int:
    """Over how many devices the operator's flat vectors (and so the Krylov basis) are split."""
    sharding = getattr(op, "vector_sharding", None)
    axes = None if sharding is None else sharding.spec[0]
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([sharding.mesh.shape[a] for a in axes]))


def _nonzero_gradient(g: jax.Array, what: str) -> None:
    """The gradient-relative metrics are 0/0 at a zero gradient: the checkpoint fails with this
    reason (a record with ``status: "failed"``) instead of recording NaN."""
    if not bool(jnp.any(g != 0)):
        raise metrics.UndefinedMetricError(
            f"the full-data gradient is exactly zero, so {what} is 0/0 (undefined)")


def _key(name: str, field: str) -> str:
    return field if name == "eigenpairs" else f"{name}_{field}"


# --------------------------------------------------------------------------------------------
# Quantities of the top subspace.


@jax.jit
def gradient_fractions(g: jax.Array, eigenvectors: jax.Array, k: int | jax.Array) -> dict:
    """f_top over V[:k], f_next over V[k:] and all c_i² (eq. 2, 12) for a flat gradient ``g``
    and orthonormal rows ``eigenvectors``, in one compiled program."""
    c2 = metrics.eigenvector_overlaps(g, eigenvectors)
    idx = jnp.arange(eigenvectors.shape[0])
    return dict(f_top=jnp.sum(jnp.where(idx < k, c2, 0.0)),
                f_next=jnp.sum(jnp.where(idx >= k, c2, 0.0)), c2=c2)


@jax.jit
def error_bounds(residuals: jax.Array, eigenvalues: jax.Array) -> metrics.SubspaceErrorBound:
    """:func:`hessian_subspace.metrics.subspace_error_bounds` of m Ritz pairs: entry d-1 bounds
    the top-d subspace (d = 1 .. m-1). Assumes Lanczos missed none of the top pairs."""
    return metrics.subspace_error_bounds(residuals, eigenvalues)


def fraction_bounds(bounds: metrics.SubspaceErrorBound, k: int) -> dict:
    """Error bars on f_top (top k) and f_next (pairs k+1 .. 2k, ``P_2k - P_k``) from
    :func:`error_bounds` of m pairs; None where m is too small (k + 1 and 2k + 1 pairs)."""
    spectral = np.asarray(bounds.spectral, np.float64)
    m = spectral.shape[0] + 1
    return dict(f_top_bound=float(spectral[k - 1]) if m > k else None,
                f_next_bound=float(spectral[2 * k - 1] + spectral[k - 1]) if m > 2 * k else None)


@jax.jit
def _minibatch_gradients(loss_fn, params: PyTree, batches: PyTree) -> jax.Array:
    """Flat gradients ``(m, p)`` of ``m`` fixed mini-batches stacked along a leading axis."""
    return jax.lax.map(lambda b: _flat(jax.grad(loss_fn)(params, b)), batches)


def _minibatches(data: PyTree, num: int, size: int, seed: int) -> PyTree:
    n = _num_examples(data)
    rng = np.random.default_rng(seed)
    b = min(size, n)
    idx = np.stack([rng.choice(n, b, replace=False) for _ in range(num)])
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x[idx]), data)


def f_top(k: int, *, num_minibatches: int = 4, minibatch_size: int = 64,
          seed: int | None = None, of: str = "eigenpairs", name: str = "f_top") -> Transform:
    r"""f_top = ‖P_k g‖²/‖g‖² (eq. 2), the fraction of the gradient in the top-k subspace, and
    f_next over eigenvectors k+1 … 2k; their error bars from the Ritz residuals
    (``f_top_bound``, ``f_next_bound``: :func:`hessian_subspace.gradient_fraction_bound`; they
    need k + 1 and 2k + 1 pairs); and f_top of the gradients of ``num_minibatches`` fixed
    random mini-batches of the analysis set (``f_top_minibatch``, ``f_top_minibatch_mean``).

    Args:
      k: size of the top subspace (the paper: the number of classes).
      num_minibatches: fixed mini-batches (0: none).
      minibatch_size: their size.
      seed: of the mini-batch draw (default: the analyzer's seed).
      of: the eigenpairs entry to use.
      name: the transform's name.
    """
    k = _tree.check_int("k", k, 1)
    num_minibatches = _tree.check_int("num_minibatches", num_minibatches, 0)
    minibatch_size = _tree.check_int("minibatch_size", minibatch_size, 1)

    def update(ctx, state):
        eig = ctx[of]
        g = _flat(ctx["gradient"])
        _nonzero_gradient(g, "f_top = |P g|²/|g|²")
        vectors = eig.eigenvectors[:2 * k]
        fr = gradient_fractions(g, vectors, k)
        # f_next is the fraction in eigenvectors k+1 .. 2k: recorded only when all k are there.
        out = dict(f_top=float(fr["f_top"]), f_next=float(fr["f_next"]) if len(vectors) == 2 * k
                   else None)
        out.update(fraction_bounds(error_bounds(eig.residuals, eig.eigenvalues), k))
        if num_minibatches:
            batches = _minibatches(ctx["data"], num_minibatches, minibatch_size,
                                   ctx["seed"] if seed is None else seed)
            mg = _minibatch_gradients(ctx["loss_fn"], ctx["params"], batches)
            op = ctx["operator"]
            if hasattr(op, "flat_indices"):
                mg = mg[:, op.flat_indices]
            top = eig.eigenvectors[:k]
            mb = np.asarray(jax.vmap(lambda v: metrics.gradient_fraction(v, top))(mg))
            out.update(f_top_minibatch=mb, f_top_minibatch_mean=float(np.mean(mb)))
        return out, state

    return Transform(name=name, update=update, requires=("gradient", of),
                     provides=("f_top", "f_next"),
                     config=dict(k=k, num_minibatches=num_minibatches,
                                 minibatch_size=minibatch_size, seed=seed, of=of),
                     records=("f_top", "f_next", "f_top_bound", "f_next_bound",
                              "f_top_minibatch", "f_top_minibatch_mean"), needs={of: k})


def c2(num: int | None = None, *, of: str = "eigenpairs", name: str = "c2") -> Transform:
    """c_i² = (v_i·g)²/‖g‖² (eq. 12) for the first ``num`` eigenvectors (default: all),
    recorded as ``c2`` (Fig. 11)."""
    if num is not None:
        num = _tree.check_int("num", num, 1)

    def update(ctx, state):
        vectors = ctx[of].eigenvectors
        vectors = vectors if num is None else vectors[:num]
        g = _flat(ctx["gradient"])
        _nonzero_gradient(g, "c_i² = (v_i·g)²/|g|²")
        return {"c2": np.asarray(gradient_fractions(g, vectors, 0)["c2"])}, state

    return Transform(name=name, update=update, requires=("gradient", of), provides=("c2",),
                     config=dict(num=num, of=of), records=("c2",),
                     needs=None if num is None else {of: num})


def overlap_g_hg(*, name: str = "overlap_g_hg") -> Transform:
    """overlap(g, Hg) = gᵀHg/(‖g‖‖Hg‖) (eq. 3, Table 1), with one curvature product."""

    def update(ctx, state):
        grad = ctx["gradient"]
        _nonzero_gradient(_flat(grad), "overlap(g, Hg)")
        hg = ctx["operator"](grad)
        ctx.count_hvps(1)
        return {"overlap_g_hg": float(metrics.hessian_gradient_overlap(grad, hg))}, state

    return Transform(name=name, update=update, requires=("gradient",),
                     provides=("overlap_g_hg",), config={}, records=("overlap_g_hg",))


def layers(*, of: str = "eigenpairs", name: str = "layers") -> Transform:
    """λ_max and how the top eigenvector spreads over the parameter leaves (Figs. 6-8):
    ``lambda_max``, ``top_eigenvector_layer_mass`` (squared norm per leaf path, summing to 1)
    and ``layer_slices`` (``[path, start, stop]`` in ``ravel_pytree`` order). Leaf paths come
    from the parameter pytree itself, whatever framework made it."""

    def update(ctx, state):
        eig = ctx[of]
        like = ctx["operator"].like
        with jax.enable_x64(True):
            v = np.asarray(eig.eigenvectors[0], np.float64)
            mass = {n: float(m) for n, m in metrics.mass_by_leaf(v, like).items()}
        return dict(lambda_max=float(eig.eigenvalues[0]), top_eigenvector_layer_mass=mass,
                    layer_slices=[list(s) for s in _tree.leaf_slices(like)]), state

    return Transform(name=name, update=update, requires=(of,), provides=("lambda_max",),
                     config=dict(of=of),
                     records=("lambda_max", "top_eigenvector_layer_mass", "layer_slices"),
                     needs={of: 1})


# --------------------------------------------------------------------------------------------
# Subspace overlaps across checkpoints.


def _overlaps(current: np.ndarray, reference: np.ndarray, k: int, dims: Sequence[int]) -> dict:
    with jax.enable_x64(True):
        a = np.asarray(current, np.float64)
        b = np.asarray(reference, np.float64)
        nested = np.asarray(metrics.nested_subspace_overlaps(a, b))
        out = {f"top{d}": float(nested[d - 1]) for d in dims if d <= nested.shape[0]}
        if a.shape[0] >= 2 * k and b.shape[0] >= 2 * k:
            out["next"] = float(metrics.subspace_overlap(a[k:2 * k], b[k:2 * k]))
    return out


def _overlap_bounds(bounds, reference, k: int, dims: Sequence[int]) -> dict:
    """Error bars for :func:`_overlaps`: ``top{d}_bound``
    (:func:`hessian_subspace.subspace_overlap_bound`) for each d with d + 1 Ritz pairs at both
    steps, and ``next_bound`` (``P_next = P_2k - P_k``) with 2k + 1 pairs; plus
    :data:`BASIS_ROUNDING` for the float32 storage of the bases."""
    a = np.asarray(bounds.sine_sum, np.float64)
    b = np.asarray(reference.sine_sum, np.float64)
    m = min(a.shape[0], b.shape[0]) + 1
    out = {f"top{d}_bound": float((a[d - 1] + b[d - 1]) / d + BASIS_ROUNDING)
           for d in dims if d < m}
    if m > 2 * k:
        out["next_bound"] = float((a[k - 1] + a[2 * k - 1] + b[k - 1] + b[2 * k - 1]) / k
                                  + BASIS_ROUNDING)
    return out


def subspace_overlap(k: int, *, reference_steps: Sequence[int] = (0, 10, 50, 100, 200, 500,
                                                                   1000, 2000, 5000),
                     previous: bool = True, dims: Sequence[int] | None = None,
                     of: str = "eigenpairs", name: str = "subspace_overlap") -> Transform:
    r"""Overlap (eq. 5) of this checkpoint's top-d subspace with that of earlier checkpoints
    t₁ (Figs. 2-3): ``subspace_overlap[str(t1)]["top{d}"]`` for d in ``dims`` (default
    1 … k), ``"next"`` for eigenvectors k+1 … 2k (when 2k were computed), and error bars
    ``"top{d}_bound"``, ``"next_bound"`` from both steps' Ritz residuals. With ``previous``,
    the previous analysed checkpoint is compared too, under its own step, and
    ``subspace_overlap["previous"] = {"step": t}`` says which one it is (one copy).

    The reference bases are this transform's state: when a checkpoint at a reference step
    is analysed, its basis (float32, with its eigenvalues and residuals) is kept, and so is
    the last checkpoint's for ``previous``. They are held in host memory and stored once each
    (about ``(len(reference_steps) + 1) * 2k * p * 4`` bytes at most, p parameters). A
    reference step that was not analysed before this one has no entry; when it is analysed
    later, the records after it are computed again (their state changed).

    Args:
      k: size of the top subspace (for ``next``).
      reference_steps: steps t₁ to compare with (those before this checkpoint).
      previous: also compare with the previous analysed checkpoint.
      dims: subspace dimensions d (default 1 … k; the paper's Fig. 3 uses up to 2k). Each
        needs d eigenvectors: the chain refuses more than ``eigenpairs`` computes.
      of: the eigenpairs entry.
      name: the transform's name.
    """
    k = _tree.check_int("k", k, 1)
    reference_steps = _tree.check_steps("reference_steps", reference_steps)
    dims = tuple(range(1, k + 1)) if dims is None else tuple(
        _tree.check_int("dims entries", d, 1) for d in dims)
    if not dims:
        raise ValueError("`dims` must name at least one subspace dimension")
    kept_steps = frozenset(reference_steps)

    def init(ctx):
        return {"previous": {"step": np.asarray(-1)}, "references": {}}

    def update(ctx, state):
        eig = ctx[of]
        here = basis_state(ctx.step, eig)
        bounds = error_bounds(eig.residuals, eig.eigenvalues)
        refs = {int(t): ref for t, ref in state.get("references", {}).items()
                if int(t) < ctx.step}
        last = state["previous"]
        prev = int(last["step"]) if previous and "eigenvectors" in last else -1
        if 0 <= prev < ctx.step:
            refs.setdefault(prev, last)
        out = {}
        for t in sorted(refs):
            ref = refs[t]
            out[str(t)] = _overlaps(here["eigenvectors"], ref["eigenvectors"], k, dims)
            if ref["residuals"].shape[0] >= 2:
                ref_bounds = error_bounds(ref["residuals"], ref["eigenvalues"])
                out[str(t)].update(_overlap_bounds(bounds, ref_bounds, k, dims))
        if str(prev) in out:
            out["previous"] = {"step": prev}
        kept = {str(t): ref for t, ref in refs.items() if t in kept_steps}
        if ctx.step in kept_steps:
            kept[str(ctx.step)] = here
        return {"subspace_overlap": out}, {
            "previous": here if previous else {"step": np.asarray(ctx.step)},
            "references": kept}

    return Transform(name=name, update=update, init=init, requires=(of,),
                     provides=("subspace_overlap",),
                     config=dict(k=k, reference_steps=reference_steps, previous=previous,
                                 dims=dims, of=of),
                     records=("subspace_overlap",), needs={of: max(dims)})


# --------------------------------------------------------------------------------------------
# The Gauss-Newton matrix beside the Hessian.


def ggn(k: int, *, output_fn: Callable | None = None, output_loss: Callable | None = None,
        tol: float = 1e-3, num_steps: int | None = None, block_size: int = 1,
        of: str = "eigenpairs", name: str = "ggn") -> Transform:
    r"""The Gauss-Newton matrix G beside the Hessian: G's top-k eigenpairs (k + 1 computed, for
    the error bar), started from the Hessian's top k; the overlap (eq. 5) of the two top-k
    subspaces; and f_top in G's subspace when the context has the gradient.

    Record: ``ggn_eigenvalues`` (k), ``ggn_residuals``, ``ggn_all_converged``,
    ``ggn_lanczos_hvps``, ``ggn_hessian_overlap``, ``f_top_ggn``, ``f_top_ggn_bound``.

    Args:
      k: size of the top subspace.
      output_fn: ``outputs(params, batch[, state]) -> (n, m)``; with ``output_loss``
        (``loss(outputs, batch)``, the mean over the batch) the split that defines G
        (:func:`hessian_subspace.ggn_vp`). Default: the analyzer's.
      output_loss: see ``output_fn``.
      tol, num_steps, block_size: as for :func:`eigenpairs`.
      of: the Hessian eigenpairs entry.
      name: the transform's name.
    """
    k = _tree.check_int("k", k, 1)
    if (output_fn is None) != (output_loss is None):
        raise ValueError("give both `output_fn` and `output_loss`, or neither")
    for label, fn in (("output_fn", output_fn), ("output_loss", output_loss)):
        if fn is not None and not callable(fn):
            raise TypeError(f"`{label}` must be callable, got {type(fn).__name__}")

    def update(ctx, state):
        eig = ctx[of]
        op = ctx.operator("ggn", output_fn=output_fn, output_loss=output_loss)
        key = ctx.rng(1)
        num = min(k + 1, op.dim - 1)
        v0 = warm_start_vector(key, eig.eigenvectors[:k], op.like)
        geig = hs.top_eigenpairs(op, v0, num, num_steps=_cap(num_steps, num, op.dim), tol=tol,
                                 block_size=block_size, key=key)
        ctx.count_hvps(int(geig.num_matvecs))
        values = np.asarray(geig.eigenvalues, np.float64)
        out = dict(ggn_eigenvalues=values[:k], ggn_residuals=np.asarray(geig.residuals),
                   ggn_all_converged=bool(np.all(geig.converged)),
                   ggn_lanczos_hvps=int(geig.num_matvecs),
                   ggn_hessian_overlap=float(metrics.subspace_overlap(eig.eigenvectors[:k],
                                                                      geig.eigenvectors[:k])))
        if "gradient" in ctx:
            fr = gradient_fractions(_flat(ctx["gradient"]), geig.eigenvectors, k)
            bounds = fraction_bounds(error_bounds(geig.residuals, geig.eigenvalues), k)
            out.update(f_top_ggn=float(fr["f_top"]), f_top_ggn_bound=bounds["f_top_bound"])
        return out, state

    return Transform(name=name, update=update, requires=(of,), provides=("ggn_eigenvalues",),
                     config=dict(k=k, output_fn=output_fn, output_loss=output_loss, tol=tol,
                                 num_steps=num_steps, block_size=block_size, of=of),
                     records=("ggn_eigenvalues", "ggn_residuals", "ggn_all_converged",
                              "ggn_lanczos_hvps", "ggn_hessian_overlap", "f_top_ggn",
                              "f_top_ggn_bound"), needs={of: k})
