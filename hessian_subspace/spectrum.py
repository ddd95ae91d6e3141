r"""Spectra of large symmetric operators: stochastic Lanczos quadrature and Hutchinson's trace.

The spectral density :math:`\phi(t) = \frac1p\sum_i \delta(t-\lambda_i)` is estimated by
stochastic Lanczos quadrature (SLQ): for each random unit probe :math:`v`, m Lanczos steps give
:math:`T_m = S\,\mathrm{diag}(\theta)\,S^\top`, and
:math:`v^\top f(H) v \approx \sum_j \tau_j f(\theta_j)` with nodes :math:`\theta_j` (Ritz
values) and weights :math:`\tau_j = S_{1j}^2` (squared first components). Averaging over probes
and smoothing each node with a Gaussian of width σ gives

.. math:: \hat\phi(t) = \frac{1}{n_v}\sum_{l=1}^{n_v}\sum_{j=1}^{m} \tau_j^{(l)}
          \,\mathcal{N}(t;\,\theta_j^{(l)},\sigma^2).

References:
  Ghorbani, Krishnan, Xiao, "An investigation into neural net optimization via Hessian
  eigenvalue density", ICML 2019.
  Hutchinson, "A stochastic estimator of the trace of the influence matrix", 1989.
  Ubaru, Chen, Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature", 2017.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import flatten_util

from hessian_subspace import _linalg, _tree, krylov, linearization

PyTree = Any


class SpectralDensity(NamedTuple):
    """Output of :func:`spectral_density`."""

    grid: jax.Array  # (g,); points where the density is evaluated.
    density: jax.Array  # (g,); smoothed density; integrates to ~1 over a wide enough grid.
    nodes: jax.Array  # (num_probes, num_steps); Ritz values per probe (padding: weight 0).
    weights: jax.Array  # (num_probes, num_steps); squared first components; rows sum to 1.


class TraceEstimate(NamedTuple):
    """Output of :func:`hutchinson_trace`."""

    estimate: jax.Array  # () the mean of z^T H z over the probes.
    standard_error: jax.Array  # () its standard error (sample std / sqrt(num_probes)).


def _template(matvec, like):
    if like is None:
        like = getattr(matvec, "like", None)
    if like is None:
        raise ValueError(
            "`like` is required: a pytree or flat array shaped like the vectors `matvec` acts on "
            "(operators from `dataset_hvp` provide it themselves)."
        )
    _tree.check_floating("like", like)
    return like


def _probe(key, like_flat, kind):
    if kind == "rademacher":
        return jax.random.rademacher(key, like_flat.shape, like_flat.dtype)
    return jax.random.normal(key, like_flat.shape, like_flat.dtype)


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


@functools.partial(jax.jit, static_argnames=("num_probes", "num_steps", "probe", "probe_batch",
                                             "dtype"))
def _slq(matvec, like, key, *, num_probes, num_steps, probe, probe_batch, dtype):
    like_flat, unravel = flatten_util.ravel_pytree(like)

    def one(k):
        v0 = unravel(_probe(k, like_flat, probe))
        return krylov.gauss_quadrature(krylov.lanczos(matvec, v0, num_steps, dtype=dtype))

    keys = jax.random.split(key, num_probes)
    return jax.lax.map(one, keys, batch_size=probe_batch)


def slq_quadrature(matvec: Callable[[PyTree], PyTree], key: jax.Array, *, num_probes: int,
                   num_steps: int, like: PyTree = None, probe: str = "gaussian",
                   probe_batch: int | None = None, dtype=None) -> krylov.Quadrature:
    """SLQ nodes and weights, ``(num_probes, num_steps)`` each, without smoothing: a
    :class:`~hessian_subspace.krylov.Quadrature` rule per probe, stacked.

    Arguments as in :func:`spectral_density`. Padding after a breakdown has weight 0; a
    non-finite matvec makes every node NaN.
    """
    matvec = _tree.as_operator(matvec)
    like = _template(matvec, like)
    _tree.check_key("key", key)
    _linalg.check_operator_output(matvec, like)
    dim = _tree.tree_size(like)
    num_probes = _tree.check_int("num_probes", num_probes, 1)
    num_steps = _tree.check_int("num_steps", num_steps, 1, dim)
    if probe not in ("gaussian", "rademacher"):
        raise ValueError(f"`probe` must be 'gaussian' or 'rademacher', got {probe!r}.")
    if probe_batch is None:
        probe_batch = default_probe_batch(matvec, like, num_probes, num_steps)
    probe_batch = _tree.check_int("probe_batch", probe_batch, 1)
    dtype = _tree.resolve_dtype(dtype, like)
    with _tree.x64_scope(dtype):
        return _slq(matvec, like, key, num_probes=num_probes, num_steps=num_steps, probe=probe,
                    probe_batch=probe_batch, dtype=jnp.dtype(dtype))


def spectral_density(matvec: Callable[[PyTree], PyTree], key: jax.Array, *, num_probes: int,
                     num_steps: int, grid, sigma: float, like: PyTree = None,
                     probe: str = "gaussian", probe_batch: int | None = None,
                     dtype=None) -> SpectralDensity:
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

    Returns:
      :class:`SpectralDensity` with ``grid``, ``density``, ``nodes`` and ``weights``.

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
                                    like=like, probe=probe, probe_batch=probe_batch, dtype=dtype)
    with _tree.x64_scope(nodes.dtype):
        grid = jnp.asarray(grid, nodes.dtype)
        density = jax.jit(gaussian_smoothing)(nodes, weights, grid, jnp.asarray(sigma, nodes.dtype))
    return SpectralDensity(grid=grid, density=density, nodes=nodes, weights=weights)


@functools.partial(jax.jit, static_argnames=("num_probes", "probe_batch"))
def _hutchinson(matvec, like, key, *, num_probes, probe_batch):
    like_flat, _ = flatten_util.ravel_pytree(like)
    mv, _ = _tree.flat_matvec(matvec, like, like_flat.dtype)

    def one(k):
        z = _probe(k, like_flat, "rademacher")
        return jnp.dot(z, mv(z), precision=jax.lax.Precision.HIGHEST)

    samples = jax.lax.map(one, jax.random.split(key, num_probes), batch_size=probe_batch)
    return jnp.mean(samples), jnp.std(samples, ddof=1) / jnp.sqrt(num_probes)


def hutchinson_trace(matvec: Callable[[PyTree], PyTree], key: jax.Array, *, num_probes: int,
                     like: PyTree = None, probe_batch: int | None = None
                     ) -> TraceEstimate:
    r"""Hutchinson's estimate of :math:`\mathrm{Tr}\,H = \mathbb{E}[z^\top H z]`, z Rademacher.

    Args:
      matvec: ``v -> H v`` on pytrees like ``like``.
      key: PRNG key.
      num_probes: number of probes (>= 2, for the standard error).
      like: template of the vectors (defaults to ``matvec.like``).
      probe_batch: probes vmapped together (one batched product per group); default
        :func:`default_probe_batch`.

    Returns:
      :class:`TraceEstimate` ``(estimate, standard_error)``, two scalars.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> est, err = hutchinson_trace(lambda v: 2.0 * v, jax.random.key(0), num_probes=4,
      ...                             like=jnp.zeros(10))
      >>> float(est), float(err)
      (20.0, 0.0)
    """
    matvec = _tree.as_operator(matvec)
    like = _template(matvec, like)
    _tree.check_key("key", key)
    _linalg.check_operator_output(matvec, like)
    num_probes = _tree.check_int("num_probes", num_probes, 2)
    if probe_batch is None:
        probe_batch = default_probe_batch(matvec, like, num_probes, 1)
    probe_batch = _tree.check_int("probe_batch", probe_batch, 1)
    return TraceEstimate(*_hutchinson(matvec, like, key, num_probes=num_probes,
                                      probe_batch=probe_batch))


def eigenvalue_summary(eigenvalues) -> dict:
    """Plain-Python summary of a set of eigenvalues (for logs and result records)."""
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1]
    return dict(max=float(lam[0]), min=float(lam[-1]), num_negative=int(np.sum(lam < 0)),
                sum=float(np.sum(lam)))
