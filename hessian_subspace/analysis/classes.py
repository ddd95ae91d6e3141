r"""Why k? The class structure of the top subspace (Papyan 2019, 2020).

For softmax cross-entropy with logits z(x; θ) ∈ R^C, probabilities p and Jacobian J_i = ∂z(x_i)/∂θ,
the Gauss-Newton matrix is exactly a second moment,

.. math:: G = \frac1n\sum_i J_i^\top(\mathrm{diag}\,p_i - p_ip_i^\top)J_i
            = \sum_c \pi_c \operatorname{Ave}_{i\in c}\sum_{c'} \delta_{i,c,c'}\delta_{i,c,c'}^\top,
   \qquad \delta_{i,c,c'} = \sqrt{p_{i,c'}}\,J_i^\top(e_{c'} - p_i),

(since :math:`\mathrm{diag}\,p - pp^\top = \sum_{c'} p_{c'}(e_{c'}-p)(e_{c'}-p)^\top`), with
:math:`\pi_c` the fraction of examples of class c and i running over the examples of class c.
Papyan splits it at the means :math:`\delta_{c,c'} = \operatorname{Ave}_{i\in c}\delta_{i,c,c'}`
(C² of them) and the class means :math:`\delta_c = \frac1{C-1}\sum_{c'\ne c}\delta_{c,c'}`:

.. math:: G = \underbrace{G_0 + G_1 + G_2}_{G_{1+2}} + G_{\rm within},\qquad
   G_0 = \sum_c\pi_c\,\delta_{c,c}\delta_{c,c}^\top,\quad
   G_1 = \sum_c\pi_c (C-1)\,\delta_c\delta_c^\top,\quad
   G_2 = \sum_c\pi_c\sum_{c'\ne c}(\delta_{c,c'}-\delta_c)(\delta_{c,c'}-\delta_c)^\top,

and :math:`G_{\rm within} = \sum_c\pi_c\sum_{c'}\mathrm{Cov}_{i\in c}(\delta_{i,c,c'})` (the
bulk). With balanced classes (:math:`\pi_c = 1/C`) these are the matrices of Papyan's code
(``compute_G_decomp`` in github.com/deep-lab/DeepnetHessian: G0, G1, G2, G1+2): G_1 holds the
C class outliers, G_2 the C(C − 1) "cross-class" mini-bulk. Every part is a sum of at most C²
rank-one terms, so its eigenpairs come exactly from a C²×C² Gram matrix.

Beside them, the class-mean gradients :math:`g_c = E[\nabla\ell \mid y = c]`
(:math:`g = \sum_c\pi_c g_c`: the full gradient lies in their span). The transform measures
how much of the Hessian's (and the Gauss-Newton matrix's) top-k subspace each of these spans.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import flatten_util

import hessian_subspace as hs
from hessian_subspace import _tree, curvature
from hessian_subspace.analysis.builtins import warm_start_vector
from hessian_subspace.analysis.transforms import Transform

PyTree = Any

# Directions of a span whose Gram eigenvalue is below this fraction of the largest are
# dropped (the span's numerical rank).
RANK_RTOL = 1e-6


def class_vectors(output_fn, params: PyTree, batches, *, vjp_batch: int = 4) -> dict:
    r"""Papyan's means :math:`\delta_{c,c'}` ``(C, C, p)``, the class-mean gradients
    :math:`g_c` ``(C, p)`` and the class fractions :math:`\pi_c` ``(C,)``, from vector-Jacobian
    products of the logits ``output_fn(params, batch) -> (b, C)`` over ``batches`` (each batch:
    ``x`` and integer labels ``y``): ``vjp_batch`` cotangents vmapped per pass over the data
    (each holds the batch's activations, so all C² + C at once would hold C² + C copies; the
    passes are driven from Python, so a convolution never runs inside a loop on XLA:CPU). A
    class absent from the data has zero vectors and :math:`\pi_c = 0`."""
    vjp_batch = _tree.check_int("vjp_batch", vjp_batch, 1)
    num = int(jax.eval_shape(output_fn, params, batches.first_batch()).shape[-1])
    total = num * num + num
    parts, fractions = [], None
    for start in range(0, total, vjp_batch):
        vectors, fractions = _class_vector_chunk(output_fn, params, batches,
                                                 jnp.asarray(start, jnp.int32), size=vjp_batch)
        parts.append(vectors[:min(vjp_batch, total - start)])
    vectors = jnp.concatenate(parts)
    scale = jnp.where(fractions > 0, 1.0 / jnp.where(fractions > 0, fractions, 1.0), 0.0)
    delta = vectors[:num * num].reshape(num, num, -1) * scale[:, None, None]
    grads = vectors[num * num:] * scale[:, None]
    return dict(delta=delta, class_gradients=grads, fractions=fractions)


@functools.partial(jax.jit, static_argnames=("size",))
def _class_vector_chunk(output_fn, params: PyTree, batches, start: jax.Array, *, size: int):
    """Cotangents ``start .. start + size`` of the C² + C (zero past the end), summed over the
    data by one pass of vmapped VJPs; and the class fractions."""
    flat, unravel = flatten_util.ravel_pytree(params)

    def per_batch(batch):
        z, vjp = jax.vjp(lambda x: output_fn(unravel(x), batch), flat)
        b, num = z.shape
        p = jax.nn.softmax(z.astype(jnp.float32 if z.dtype != jnp.float64 else z.dtype))
        p = p.astype(flat.dtype)
        onehot = jax.nn.one_hot(batch["y"], num, dtype=flat.dtype)  # (b, C): class c of i
        eye = jnp.eye(num, dtype=flat.dtype)
        # delta_{i,c,c'}: cotangent sqrt(p_ic') (e_c' - p_i), kept for examples of class c.
        per = jnp.sqrt(p)[:, :, None] * (eye[None] - p[:, None, :])  # (b, c', C)
        delta_cot = onehot.T[:, None, :, None] * jnp.transpose(per, (1, 0, 2))[None]
        grad_cot = onehot.T[:, :, None] * (p - onehot)[None]  # (c, b, C)
        cots = jnp.concatenate([delta_cot.reshape(num * num, b, num), grad_cot,
                                jnp.zeros((size, b, num), flat.dtype)]) / b
        chunk = jax.lax.dynamic_slice_in_dim(cots, start, size)
        return jax.vmap(lambda u: vjp(u.astype(z.dtype))[0])(chunk), jnp.mean(onehot, axis=0)

    return curvature.dataset_mean(per_batch, batches)


def papyan_factors(delta: np.ndarray, fractions: np.ndarray) -> dict[str, np.ndarray]:
    """Rows whose outer products sum to Papyan's G_0, G_1, G_2 and G_{1+2} (module docstring):
    ``{"G0": (C, p), "G1": (C, p), "G2": (C(C-1), p), "G12": (C², p)}``."""
    num = delta.shape[0]
    w = np.sqrt(np.asarray(fractions, np.float64))
    off = ~np.eye(num, dtype=bool)
    class_means = np.stack([delta[c][off[c]].mean(axis=0) for c in range(num)])
    cross = np.concatenate([(delta[c][off[c]] - class_means[c]) * w[c] for c in range(num)])
    return dict(G0=w[:, None] * delta[np.arange(num), np.arange(num)],
                G1=(w * np.sqrt(num - 1))[:, None] * class_means, G2=cross,
                G12=(w[:, None, None] * delta).reshape(num * num, -1))


def factor_eigenpairs(rows: np.ndarray, *, rtol: float = RANK_RTOL
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and orthonormal eigenvectors (rows) of ``rowsᵀ rows`` for its
    numerically non-zero part, from the small Gram matrix ``rows rowsᵀ`` (float64)."""
    rows = np.asarray(rows, np.float64)
    gram = rows @ rows.T
    vals, vecs = np.linalg.eigh(gram)
    vals, vecs = vals[::-1], vecs[:, ::-1]
    keep = vals > rtol * max(vals[0], np.finfo(np.float64).tiny) if vals.size else vals > 0
    vals, vecs = vals[keep], vecs[:, keep]
    basis = (vecs.T @ rows) / np.sqrt(vals)[:, None]
    return vals, basis


def _span(rows: np.ndarray, rtol: float = RANK_RTOL) -> np.ndarray:
    return factor_eigenpairs(rows, rtol=rtol)[1]


def _compare(span: np.ndarray, top: np.ndarray) -> dict:
    """Eq. 5 overlap of two orthonormal row sets, and the fraction of ``top``'s subspace that
    lies in ``span`` (Tr(P_span P_top)/k)."""
    if span.shape[0] == 0:
        return dict(overlap=0.0, captured=0.0, dim=0)
    t = float(np.sum((span @ top.T) ** 2))
    return dict(overlap=t / np.sqrt(span.shape[0] * top.shape[0]), captured=t / top.shape[0],
                dim=int(span.shape[0]))


def softmax_cross_entropy(logits: jax.Array, batch: PyTree) -> jax.Array:
    """The mean softmax cross-entropy of ``logits`` ``(b, C)`` against ``batch["y"]``: the
    output loss of the Gauss-Newton split this transform assumes."""
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def class_mean_subspace(k: int, *, ggn: bool = True, output_fn: Callable | None = None,
                        num_eigenvalues: int | None = None, tol: float = 1e-3,
                        max_bytes: float = 4e9, of: str = "eigenpairs",
                        name: str = "class_mean_subspace") -> Transform:
    r"""The class structure of the top-k subspace (module docstring): Papyan's decomposition of
    the Gauss-Newton matrix at the class and cross-class means, and the class-mean gradients,
    against the top-k eigenvectors of the Hessian (``of``) and of the Gauss-Newton matrix.

    Record ``class_mean_subspace``: ``fractions`` (π_c), ``eigenvalues`` (``G0``, ``G1``,
    ``G2``, ``G12``: each part's largest ``num_eigenvalues``, default 2k), and for ``hessian``
    (and ``ggn``) ``{SPAN: {"overlap": eq. 5, "captured": Tr(P_span P_top)/k, "dim"}}`` with
    SPAN ``class_gradients`` (span of the C vectors g_c), ``G0``, ``G1``, ``G12`` (the span of
    each part's top min(k, rank) eigenvectors); ``ggn_eigenvalues`` (top k of G, computed
    here, warm-started from the Hessian's, with ``ggn_residuals``).

    Needs softmax cross-entropy logits: ``output_fn(params, batch[, state]) -> (b, C)``
    (default: the analyzer's Gauss-Newton ``output_fn``) and integer labels ``batch["y"]``.

    Args:
      k: size of the top subspace (the paper: the number of classes).
      ggn: also the Gauss-Newton matrix's top-k (one more eigensolve).
      output_fn: the logits (None: the analyzer's).
      num_eigenvalues: eigenvalues recorded per part (None: 2k).
      tol: residual tolerance of the Gauss-Newton eigensolve.
      max_bytes: the C² + C vectors of p parameters are held at once; more than this many
        bytes is refused before any work (CIFAR-100's 10,100 vectors of a ResNet do not fit).
      of: the Hessian eigenpairs entry.
      name: the transform's name.
    """
    k = _tree.check_int("k", k, 1)
    if output_fn is not None and not callable(output_fn):
        raise TypeError(f"`output_fn` must be callable, got {type(output_fn).__name__}")
    if num_eigenvalues is not None:
        num_eigenvalues = _tree.check_int("num_eigenvalues", num_eigenvalues, 1)
    if not float(tol) > 0:
        raise ValueError(f"`tol` must be > 0, got {tol!r}")
    if isinstance(max_bytes, bool) or not float(max_bytes) > 0:
        raise ValueError(f"`max_bytes` must be > 0, got {max_bytes!r}")
    shown = num_eigenvalues or 2 * k

    def update(ctx, state):
        fn = ctx.bind(output_fn) if output_fn is not None else ctx["output_fn"]
        if fn is None:
            raise ValueError(f"{name} needs the logits: give `output_fn`, or the analyzer's "
                             "Operator(output_fn=..., output_loss=...)")
        op = ctx["operator"]
        if hasattr(op, "select"):
            raise ValueError(f"{name} measures all parameters; the analyzer's operator is a "
                             "block (config.operator.block)")
        batch = ctx["batches"].first_batch()
        labels = batch.get("y") if isinstance(batch, dict) else None
        if labels is None or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(f"{name} needs integer class labels in the analysis data's 'y'")
        num = int(jax.eval_shape(fn, ctx["params"], batch).shape[-1])
        need = (num * num + num) * op.dim * np.dtype(_tree.resolve_dtype(None, op.like)).itemsize
        if need > max_bytes:
            raise ValueError(f"{name}: {num} classes need {num * num + num} vectors of "
                             f"{op.dim} parameters ({need / 1e9:.1f} GB) at once, more than "
                             f"`max_bytes` = {max_bytes / 1e9:.1f} GB")
        out = class_vectors(fn, ctx["params"], ctx["batches"])
        delta = np.asarray(_tree.to_host(out["delta"]), np.float64)
        grads = np.asarray(_tree.to_host(out["class_gradients"]), np.float64)
        fractions = np.asarray(_tree.to_host(out["fractions"]), np.float64)
        if not (np.all(np.isfinite(delta)) and np.all(np.isfinite(grads))):
            raise FloatingPointError(f"{name}: a class-mean vector is not finite")
        present = fractions > 0
        factors = papyan_factors(delta, fractions)
        eig = ctx[of]
        top_h = np.asarray(eig.eigenvectors[:k], np.float64)
        spans, values = {"class_gradients": _span(grads[present])}, {}
        for part, rows in factors.items():
            vals, basis = factor_eigenpairs(rows)
            values[part] = vals[:shown]
            if part != "G2":
                spans[part] = basis[:min(k, basis.shape[0])]
        record = dict(classes=int(fractions.shape[0]), fractions=fractions,
                      classes_present=int(present.sum()), eigenvalues=values,
                      hessian={s: _compare(b, top_h) for s, b in spans.items()})
        if ggn:
            gop = ctx.operator("ggn", output_fn=output_fn,
                               output_loss=None if output_fn is None else softmax_cross_entropy)
            key = ctx.rng(21)
            geig = hs.top_eigenpairs(gop, warm_start_vector(key, top_h, gop.like), k,
                                     tol=tol, key=key)
            ctx.count_hvps(int(geig.num_matvecs))
            top_g = np.asarray(geig.eigenvectors, np.float64)
            record.update(ggn={s: _compare(b, top_g) for s, b in spans.items()},
                          ggn_eigenvalues=np.asarray(geig.eigenvalues, np.float64),
                          ggn_residuals=np.asarray(geig.residuals),
                          ggn_converged=bool(np.all(geig.converged)))
        return {name: record}, state

    return Transform(name=name, update=update, requires=(of,), provides=(name,),
                     config=dict(k=k, ggn=ggn, output_fn=output_fn,
                                 num_eigenvalues=num_eigenvalues, tol=tol, of=of),
                     records=(name,), needs={of: k})
