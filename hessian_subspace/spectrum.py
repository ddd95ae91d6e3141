r"""Spectra of large symmetric operators: stochastic Lanczos quadrature, Hutchinson's trace and
diagonal, each optionally deflated by known top eigenpairs.

The spectral density :math:`\phi(t) = \frac1p\sum_i \delta(t-\lambda_i)` is estimated by
stochastic Lanczos quadrature (SLQ): for each random unit probe :math:`v`, m Lanczos steps give
:math:`T_m = S\,\mathrm{diag}(\theta)\,S^\top`, and
:math:`v^\top f(H) v \approx \sum_j \tau_j f(\theta_j)` with nodes :math:`\theta_j` (Ritz
values) and weights :math:`\tau_j = S_{1j}^2` (squared first components). Averaging over probes
and smoothing each node with a Gaussian of width σ gives

.. math:: \hat\phi(t) = \frac{1}{n_v}\sum_{l=1}^{n_v}\sum_{j=1}^{m} \tau_j^{(l)}
          \,\mathcal{N}(t;\,\theta_j^{(l)},\sigma^2).

**Deflation.** Given k orthonormal vectors V (rows) and values Λ (the top-k eigenpairs the
pipeline already has, as an :class:`~hessian_subspace.Eigenpairs` or ``(values, vectors)``),
``deflate=`` splits :math:`H = V^\top\Lambda V + (H - V^\top\Lambda V)`: the first part
exactly, only the second by random probes. Trace and diagonal stay unbiased for *any* V and Λ
(:math:`\mathrm{Tr}\,V^\top\Lambda V = \sum_i\lambda_i\|v_i\|^2`); their variance
drops by what the top part carried (Hutchinson's variance is
:math:`2\sum_{a\ne b}A_{ab}^2`). The density puts weight 1/p on each λ_i exactly and runs
SLQ on :math:`PHP` (:math:`P = I - V^\top V`) from probes in the complement, weighted
(p − k)/p: exact when V spans an invariant subspace, off by the pairs' residuals otherwise.

References:
  Ghorbani, Krishnan, Xiao, "An investigation into neural net optimization via Hessian
  eigenvalue density", ICML 2019.
  Hutchinson, "A stochastic estimator of the trace of the influence matrix", 1989.
  Ubaru, Chen, Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature", 2017.
  Meyer, Musco, Musco, Woodruff, "Hutch++: optimal stochastic trace estimation", SOSA 2021
  (the low-rank part exactly, the rest by probes; here the low-rank part is the eigensolve's).
  Bekas, Kokiopoulou, Saad, "An estimator for the diagonal of a matrix", 2007.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import flatten_util

from hessian_subspace import _linalg, _probes, _tree, krylov, linearization

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


class SpectralDensity(NamedTuple):
    """Output of :func:`spectral_density`."""

    grid: jax.Array  # (g,); points where the density is evaluated.
    density: jax.Array  # (g,); smoothed density; integrates to ~1 over a wide enough grid.
    nodes: jax.Array  # (num_probes, num_steps); Ritz values per probe (padding: weight 0).
    weights: jax.Array  # (num_probes, num_steps); squared first components; rows sum to 1.


class TraceEstimate(NamedTuple):
    """Output of :func:`hutchinson_trace`."""

    estimate: jax.Array  # () the mean of z^T H z over the probes (plus the deflated part).
    standard_error: jax.Array  # () its standard error (sample std / sqrt(num_probes)).


class DiagonalEstimate(NamedTuple):
    """Output of :func:`hutchinson_diagonal`: the diagonal, and the trace from the same probes."""

    diagonal: PyTree  # like the operator's vectors: the mean of z ⊙ Hz (plus the deflated part).
    standard_error: PyTree  # like them: per entry, sample std / sqrt(num_probes).
    trace: jax.Array  # () Hutchinson: the diagonal's sum; XDiag: XTrace's (same products).
    trace_standard_error: jax.Array  # ()


def _check_orthonormal(vectors, tol=1e-3) -> None:
    if not _tree.is_concrete(vectors):
        return
    v = np.asarray(vectors, np.float64)
    err = float(np.max(np.abs(v @ v.T - np.eye(v.shape[0]))))
    if err > tol:
        raise ValueError(f"the density's `deflate` vectors must be orthonormal rows (max "
                         f"|V V^T - I| = {err:.2e} > {tol}): the top part is placed as k "
                         f"eigenvalues of weight 1/p")


def default_probe_batch(matvec, like, num_probes: int, vectors_per_probe: int,
                        budget: float | None = None) -> int:
    """How many probes to vmap together: as many as fit ``budget`` bytes (default: a quarter
    of what :func:`hessian_subspace.linearization.default_cache_budget` allows), counting per
    probe ``vectors_per_probe + 4`` vectors of p numbers (a Lanczos basis, or a few vectors for
    Hutchinson) and, for the data-set operators, one more copy of the activations their
    products keep (:func:`hessian_subspace.linearization.linearization_bytes`)."""
    flat, _ = flatten_util.ravel_pytree(like)
    per_probe = (vectors_per_probe + 4) * flat.size * flat.dtype.itemsize
    if hasattr(matvec, "_matvec") and hasattr(matvec, "like"):
        try:
            per_probe += linearization.linearization_bytes(matvec)
        except Exception:  # noqa: BLE001 -- an operator that cannot be traced alone
            pass
    budget = 0.25 * linearization.default_cache_budget() if budget is None else budget
    return int(max(1, min(num_probes, budget // max(per_probe, 1))))


def gaussian_smoothing(nodes: jax.Array, weights: jax.Array, grid: jax.Array, sigma) -> jax.Array:
    """Mean over probes of Σ_j weights_j N(grid; nodes_j, sigma²). Shapes: (n, m), (n, m), (g,)."""
    z = (grid[:, None, None] - nodes[None]) / sigma
    kernel = jnp.exp(-0.5 * z**2) / (sigma * jnp.sqrt(2 * jnp.pi))
    return jnp.mean(jnp.sum(kernel * weights[None], axis=-1), axis=-1)


def _project_out(vectors, x):
    """x minus its components along the rows of `vectors` (twice: classical Gram-Schmidt)."""
    for _ in range(2):
        x = x - jnp.dot(jnp.dot(vectors, x, precision=_HIGHEST), vectors, precision=_HIGHEST)
    return x


def _deflated_matvec(matvec, vectors, v, *, unravel):
    """P H P v with P = I - Vᵀ V: the operator on the complement of the deflated subspace."""
    x = _project_out(vectors, flatten_util.ravel_pytree(v)[0])
    hx = flatten_util.ravel_pytree(matvec(unravel(x.astype(vectors.dtype))))[0]
    return unravel(_project_out(vectors, hx.astype(vectors.dtype)))


@functools.partial(jax.jit, static_argnames=("num_probes", "num_steps", "probe", "probe_batch",
                                             "dtype"))
def _slq(matvec, like, key, deflation, *, num_probes, num_steps, probe, probe_batch, dtype):
    like_flat, unravel = flatten_util.ravel_pytree(like)
    if deflation is not None:
        values, vectors = deflation
        prepare = getattr(matvec, "prepared", None)
        base = prepare() if callable(prepare) else matvec  # linearised once for every probe
        matvec = jax.tree_util.Partial(functools.partial(_deflated_matvec, unravel=unravel),
                                       base, vectors)

    def one(k):
        z = _probes.probe(k, like_flat, probe)
        if deflation is not None:
            z = _project_out(deflation[1], z)
        return krylov.gauss_quadrature(krylov.lanczos(matvec, unravel(z), num_steps, dtype=dtype))

    keys = jax.random.split(key, num_probes)
    nodes, weights = jax.lax.map(one, keys, batch_size=probe_batch)
    if deflation is None:
        return krylov.Quadrature(nodes, weights)
    p, k = like_flat.shape[0], values.shape[0]
    top_nodes = jnp.broadcast_to(values.astype(nodes.dtype), (num_probes, k))
    top_weights = jnp.full((num_probes, k), 1.0 / p, weights.dtype)
    return krylov.Quadrature(jnp.concatenate([nodes, top_nodes], axis=1),
                             jnp.concatenate([weights * ((p - k) / p), top_weights], axis=1))


def slq_quadrature(matvec: Callable[[PyTree], PyTree], key: jax.Array, *, num_probes: int,
                   num_steps: int, like: PyTree = None, probe: str = "gaussian",
                   probe_batch: int | None = None, dtype=None,
                   deflate=None) -> krylov.Quadrature:
    """SLQ nodes and weights, ``(num_probes, num_steps)`` each, without smoothing: a
    :class:`~hessian_subspace.krylov.Quadrature` rule per probe, stacked. With ``deflate``
    (k pairs), ``(num_probes, num_steps + k)``: the complement's rule weighted (p − k)/p, then
    the k eigenvalues with weight 1/p each (module docstring).

    Arguments as in :func:`spectral_density`. Padding after a breakdown has weight 0; a
    non-finite matvec makes every node NaN.
    """
    matvec = _tree.as_operator(matvec)
    like = _probes.template(matvec, like)
    _tree.check_key("key", key)
    _linalg.check_operator_output(matvec, like)
    deflation = _probes.deflation(deflate, like)
    if deflation is not None:
        _check_orthonormal(deflation[1])
    dim = _tree.tree_size(like) - (0 if deflation is None else deflation[0].shape[0])
    num_probes = _tree.check_int("num_probes", num_probes, 1)
    num_steps = _tree.check_int("num_steps", num_steps, 1, dim)
    if probe not in ("gaussian", "rademacher"):
        raise ValueError(f"`probe` must be 'gaussian' or 'rademacher', got {probe!r}.")
    if probe_batch is None:
        probe_batch = default_probe_batch(matvec, like, num_probes, num_steps)
    probe_batch = _tree.check_int("probe_batch", probe_batch, 1)
    dtype = _tree.resolve_dtype(dtype, like)
    with _tree.x64_scope(dtype):
        return _slq(matvec, like, key, deflation, num_probes=num_probes, num_steps=num_steps,
                    probe=probe, probe_batch=probe_batch, dtype=jnp.dtype(dtype))


def spectral_density(matvec: Callable[[PyTree], PyTree], key: jax.Array, *, num_probes: int,
                     num_steps: int, grid, sigma: float, like: PyTree = None,
                     probe: str = "gaussian", probe_batch: int | None = None,
                     dtype=None, deflate=None) -> SpectralDensity:
    r"""Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    Lanczos (full reorthogonalisation) runs on ``num_probes`` random probes, vmapped in groups
    of ``probe_batch``; weights are squared first components of T's eigenvectors
    (Ghorbani et al. 2019). Padding after a breakdown carries zero weight.

    Args:
      matvec: ``v -> H v`` on pytrees like ``like`` (or flat arrays).
      key: PRNG key for the probes.
      num_probes: number of random probes (more: less variance).
      num_steps: Lanczos steps per probe, ``1 <= num_steps <= p`` (more: finer resolution).
      grid: ``(g,)`` points where the density is evaluated.
      sigma: width of the Gaussian kernel (same units as the eigenvalues), > 0.
      like: template of the vectors (defaults to ``matvec.like`` for :func:`dataset_hvp`).
      probe: "gaussian" or "rademacher" (normalised inside either way).
      probe_batch: probes vmapped together (one batched product per Lanczos step for the
        group); default :func:`default_probe_batch`, as many as fit a memory budget, since
        each probe holds a ``(num_steps, p)`` basis and its own activations.
      dtype: recurrence dtype (``float64`` under a scoped ``enable_x64``).
      deflate: top eigenpairs (an :class:`~hessian_subspace.Eigenpairs` or ``(values (k,),
        vectors (k, p))``, orthonormal rows): placed exactly, weight 1/p each; the probes and
        the Lanczos runs live in their complement (module docstring). None: plain SLQ.

    Returns:
      :class:`SpectralDensity` with ``grid``, ``density``, ``nodes`` and ``weights``
      (with ``deflate``, the k eigenvalues are the last k nodes of every probe).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> a = jnp.diag(jnp.array([1.0, 1.0, 3.0, 3.0]))
      >>> sd = spectral_density(lambda v: a @ v, jax.random.key(0), num_probes=8, num_steps=4,
      ...                       grid=jnp.linspace(0, 4, 5), sigma=0.1, like=jnp.zeros(4))
      >>> float(jnp.sum(jnp.where(sd.nodes > 2, sd.weights, 0.0)) / 8) > 0.2
      True
    """
    grid = np.asarray(grid)
    if grid.ndim != 1 or grid.size < 1:
        raise ValueError(f"`grid` must be a non-empty 1-D array, got shape {grid.shape}.")
    if not float(sigma) > 0:
        raise ValueError(f"`sigma` must be > 0, got {sigma}.")
    nodes, weights = slq_quadrature(matvec, key, num_probes=num_probes, num_steps=num_steps,
                                    like=like, probe=probe, probe_batch=probe_batch, dtype=dtype,
                                    deflate=deflate)
    with _tree.x64_scope(nodes.dtype):
        grid = jnp.asarray(grid, nodes.dtype)
        density = jax.jit(gaussian_smoothing)(nodes, weights, grid, jnp.asarray(sigma, nodes.dtype))
    return SpectralDensity(grid=grid, density=density, nodes=nodes, weights=weights)


@functools.partial(jax.jit, static_argnames=("num_probes", "probe_batch"))
def _hutchinson(matvec, like, key, deflation, *, num_probes, probe_batch):
    like_flat, _ = flatten_util.ravel_pytree(like)
    mv, _ = _tree.flat_matvec(matvec, like, like_flat.dtype)

    def one(k):
        z = _probes.probe(k, like_flat, "rademacher")
        return jnp.dot(z, _probes.deflated_product(mv, deflation, z), precision=_HIGHEST)

    samples = jax.lax.map(one, jax.random.split(key, num_probes), batch_size=probe_batch)
    exact, _ = _probes.exact_part(deflation, like_flat)
    return exact + jnp.mean(samples), jnp.std(samples, ddof=1) / jnp.sqrt(num_probes)


def hutchinson_trace(matvec: Callable[[PyTree], PyTree], key: jax.Array, *, num_probes: int,
                     like: PyTree = None, probe_batch: int | None = None, deflate=None
                     ) -> TraceEstimate:
    r"""Hutchinson's estimate of :math:`\mathrm{Tr}\,H = \mathbb{E}[z^\top H z]`, z Rademacher;
    with ``deflate``, of :math:`\sum_i\lambda_i\|v_i\|^2 + \mathbb{E}[z^\top(H - V^\top
    \Lambda V)z]` (Hutch++-style: the top part exactly, the probes only see the rest).

    Args:
      matvec: ``v -> H v`` on pytrees like ``like``.
      key: PRNG key.
      num_probes: number of probes (>= 2, for the standard error).
      like: template of the vectors (defaults to ``matvec.like``).
      probe_batch: probes vmapped together (one batched product per group); default
        :func:`default_probe_batch`.
      deflate: top eigenpairs, an :class:`~hessian_subspace.Eigenpairs` or ``(values (k,),
        vectors (k, p))``; unbiased for any vectors and values, lower variance the more of
        H's off-diagonal mass they carry (module docstring). None: plain Hutchinson.

    Returns:
      :class:`TraceEstimate` ``(estimate, standard_error)``, two scalars. A non-finite
      product raises ``FloatingPointError`` (called outside jit).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> est, err = hutchinson_trace(lambda v: 2.0 * v, jax.random.key(0), num_probes=4,
      ...                             like=jnp.zeros(10))
      >>> float(est), float(err)
      (20.0, 0.0)
    """
    matvec = _tree.as_operator(matvec)
    like = _probes.template(matvec, like)
    _tree.check_key("key", key)
    _linalg.check_operator_output(matvec, like)
    num_probes = _tree.check_int("num_probes", num_probes, 2)
    deflation = _probes.deflation(deflate, like)
    if probe_batch is None:
        probe_batch = default_probe_batch(matvec, like, num_probes, 1)
    probe_batch = _tree.check_int("probe_batch", probe_batch, 1)
    return _probes.finite(TraceEstimate(*_hutchinson(matvec, like, key, deflation,
                                              num_probes=num_probes, probe_batch=probe_batch)))


@functools.partial(jax.jit, static_argnames=("num_probes", "probe_batch"))
def _diagonal(matvec, like, key, deflation, *, num_probes, probe_batch):
    like_flat, unravel = flatten_util.ravel_pytree(like)
    mv, _ = _tree.flat_matvec(matvec, like, like_flat.dtype)
    num_batches = -(-num_probes // probe_batch)
    keys = jax.random.split(key, num_probes)  # the same probes whatever the batching
    pad = num_batches * probe_batch - num_probes
    keys = jnp.concatenate([keys, keys[:pad]]).reshape(num_batches, probe_batch)  # pad: masked

    def batch(carry, xs):
        """Welford's running mean and sum of squared deviations, merged one batch at a time
        (Chan et al. 1979): no (num_probes, p) array, no cancellation of a large mean."""
        count, mean, m2, tmean, tm2 = carry
        index, ks = xs
        ok = (index * probe_batch + jnp.arange(probe_batch)) < num_probes
        z = jax.vmap(lambda k: _probes.probe(k, like_flat, "rademacher"))(ks)
        samples = z * jax.vmap(lambda z: _probes.deflated_product(mv, deflation, z))(z)
        traces = jnp.sum(samples, axis=1)
        n_b = jnp.sum(ok).astype(like_flat.dtype)
        w = ok.astype(like_flat.dtype)

        def merge(mean, m2, x, w):
            b_mean = jnp.tensordot(w, x, 1) / n_b
            b_m2 = jnp.tensordot(w, (x - b_mean) ** 2, 1)
            total = count + n_b
            delta = b_mean - mean
            return mean + delta * n_b / total, m2 + b_m2 + delta**2 * count * n_b / total

        mean, m2 = merge(mean, m2, samples, w)
        tmean, tm2 = merge(tmean, tm2, traces, w)
        return (count + n_b, mean, m2, tmean, tm2), None

    zero = jnp.zeros((), like_flat.dtype)
    init = (zero, jnp.zeros_like(like_flat), jnp.zeros_like(like_flat), zero, zero)
    (count, mean, m2, tmean, tm2), _ = jax.lax.scan(
        batch, init, (jnp.arange(num_batches), keys))
    exact_trace, exact_diag = _probes.exact_part(deflation, like_flat)
    se = jnp.sqrt(m2 / (count - 1) / count)
    return DiagonalEstimate(diagonal=unravel(exact_diag + mean), standard_error=unravel(se),
                            trace=exact_trace + tmean,
                            trace_standard_error=jnp.sqrt(tm2 / (count - 1) / count))


def hutchinson_diagonal(matvec: Callable[[PyTree], PyTree], key: jax.Array, *, num_probes: int,
                        like: PyTree = None, probe_batch: int | None = None, deflate=None
                        ) -> DiagonalEstimate:
    r"""Hutchinson's (Bekas et al.'s) estimate of the diagonal, :math:`\mathrm{diag}\,H =
    \mathbb{E}[z \odot Hz]`, z Rademacher, with a standard error per entry, and the trace
    from the same probes. With ``deflate``: :math:`\sum_i \lambda_i v_i^2 + \mathbb{E}[z
    \odot (H - V^\top\Lambda V) z]`, unbiased for any V, Λ; entry a's variance is
    :math:`\sum_{b\ne a} A_{ab}^2`, so deflating the top eigenpairs removes what they
    contribute off the diagonal.

    Probes run ``probe_batch`` at a time (one vmapped product each) and are reduced on the fly
    (Welford), so memory is a few vectors per probe of the batch whatever ``num_probes`` is.

    Args:
      matvec, key, num_probes, like, probe_batch, deflate: as in :func:`hutchinson_trace`.

    Returns:
      :class:`DiagonalEstimate`: ``diagonal`` and ``standard_error`` shaped like the vectors
      (``like``), ``trace`` and ``trace_standard_error``. A non-finite product raises
      ``FloatingPointError`` (called outside jit).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> a = jnp.diag(jnp.arange(1.0, 5.0))
      >>> d = hutchinson_diagonal(lambda v: a @ v, jax.random.key(0), num_probes=3,
      ...                         like=jnp.zeros(4))
      >>> d.diagonal.tolist(), float(d.trace)
      ([1.0, 2.0, 3.0, 4.0], 10.0)
    """
    matvec = _tree.as_operator(matvec)
    like = _probes.template(matvec, like)
    _tree.check_key("key", key)
    _linalg.check_operator_output(matvec, like)
    num_probes = _tree.check_int("num_probes", num_probes, 2)
    deflation = _probes.deflation(deflate, like)
    if probe_batch is None:
        probe_batch = default_probe_batch(matvec, like, num_probes, 3)
    probe_batch = _tree.check_int("probe_batch", probe_batch, 1)
    return _probes.finite(_diagonal(matvec, like, key, deflation, num_probes=num_probes,
                             probe_batch=min(probe_batch, num_probes)))


def eigenvalue_summary(eigenvalues) -> dict:
    """Plain-Python summary of a set of eigenvalues (for logs and result records)."""
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1]
    return dict(max=float(lam[0]), min=float(lam[-1]), num_negative=int(np.sum(lam < 0)),
                sum=float(np.sum(lam)))
