"""A self-contained demonstration of the paper's main effect, on built-in synthetic data.

Trains a fully connected net with SGD on a k-class Gaussian mixture and, at a few steps,
computes the top-k Hessian eigenpairs of the full-data loss and the paper's metrics: the
fraction f_top of the gradient in the top subspace (eq. 2), overlap(g, Hg) (eq. 3) and the
overlap of the top subspace with the one found at the previous measurement (eq. 5).
No network and no files are needed.
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from tqdm import tqdm

import hessian_subspace as hs
from hessian_subspace import data as data_lib
from hessian_subspace import models


def run_demo(*, num_classes: int = 10, dim: int = 100, num_examples: int = 4000,
             sigma: float = 0.35, hidden: Sequence[int] = (100, 100), learning_rate: float = 0.1,
             batch_size: int = 64, measure_at: Sequence[int] = (0, 10, 25, 50, 100, 200, 400, 800),
             seed: int = 0, progress: bool = True) -> list[dict]:
    """Trains on a Gaussian mixture and measures the top-k subspace at ``measure_at`` steps.

    Args:
      num_classes: k, also the number of top eigenpairs.
      dim: input dimension.
      num_examples: training-set size (the Hessian and gradient use all of it).
      sigma: noise of the mixture around its unit-norm class means.
      hidden: widths of the hidden layers.
      learning_rate: SGD step size η.
      batch_size: SGD mini-batch size.
      measure_at: steps at which to measure (sorted; training runs to the last).
      seed: seed of the data, the initialisation and the batch order.
      progress: show a progress bar.

    Returns:
      One dict per measurement: step, loss, accuracy, top eigenvalues, f_top,
      overlap(g, Hg), subspace overlap with the previous measurement, matvecs used, seconds.
    """
    measure_at = sorted(set(int(s) for s in measure_at))
    ds = data_lib.gaussian_mixture(num_classes=num_classes, dim=dim, num_examples=num_examples,
                                   sigma=sigma, seed=seed)
    train = {"x": jnp.asarray(ds["x"]), "y": jnp.asarray(ds["y"])}
    model = models.MLP(hidden=tuple(hidden), num_outputs=num_classes)
    loss_fn = models.cross_entropy_loss(model)
    params = models.init_params(model, jax.random.key(seed), train["x"][:1])
    tx = optax.sgd(learning_rate)
    opt_state = tx.init(params)

    @jax.jit
    def sgd_step(params, opt_state, batch):
        grads = jax.grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(seed)
    records, previous_basis = [], None
    v0 = hs.random_start_vector(jax.random.key(seed + 1), params)
    bar = tqdm(total=measure_at[-1], desc="demo", unit="step", disable=not progress)
    step = 0
    for target in measure_at:
        while step < target:
            idx = rng.integers(0, num_examples, batch_size)
            params, opt_state = sgd_step(params, opt_state, {"x": train["x"][idx],
                                                             "y": train["y"][idx]})
            step += 1
            bar.update(1)
        start = time.perf_counter()
        loss, grad = hs.dataset_value_and_grad(loss_fn, params, train, batch_size=1000)
        hessian = hs.dataset_hvp(loss_fn, params, train, batch_size=1000)
        top = hs.top_eigenpairs(hessian, v0, num_classes)
        hg = hessian(grad)
        record = dict(
            step=step,
            loss=float(loss),
            accuracy=float(hs.dataset_mean(
                lambda b, p=params: models.accuracy(model, p, b), train, batch_size=1000)),
            eigenvalues=np.asarray(top.eigenvalues).round(5).tolist(),
            converged=int(np.sum(top.converged)),
            f_top=float(hs.gradient_fraction(grad, top.eigenvectors)),
            overlap_g_hg=float(hs.hessian_gradient_overlap(grad, hg)),
            subspace_overlap_prev=(None if previous_basis is None else
                                   float(hs.subspace_overlap(top.eigenvectors, previous_basis))),
            matvecs=int(top.num_matvecs),
            seconds=round(time.perf_counter() - start, 3),
        )
        previous_basis = top.eigenvectors
        records.append(record)
        logging.info("step %d: loss %.4f  f_top %.3f  overlap(g,Hg) %.3f  lambda_max %.3f",
                     step, record["loss"], record["f_top"], record["overlap_g_hg"],
                     record["eigenvalues"][0])
    bar.close()
    return records


def format_table(records: list[dict]) -> str:
    """The demo's records as a fixed-width text table."""
    lines = [f"{'step':>5} {'loss':>7} {'acc':>6} {'f_top':>6} {'ov(g,Hg)':>8} "
             f"{'ov(prev)':>8} {'lambda_1':>9} {'lambda_k':>9} {'conv':>4} {'HVPs':>5}"]
    for r in records:
        prev = "-" if r["subspace_overlap_prev"] is None else f"{r['subspace_overlap_prev']:.3f}"
        lines.append(
            f"{r['step']:>5} {r['loss']:>7.4f} {r['accuracy']:>6.3f} {r['f_top']:>6.3f} "
            f"{r['overlap_g_hg']:>8.3f} {prev:>8} {r['eigenvalues'][0]:>9.4f} "
            f"{r['eigenvalues'][-1]:>9.4f} {r['converged']:>4} {r['matvecs']:>5}")
    return "\n".join(lines)
