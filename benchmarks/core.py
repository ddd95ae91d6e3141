r"""Benchmark of the numerical core; prints one JSON object.

  python benchmarks/core.py                                  # FC on Fashion-MNIST + conv net
  python benchmarks/core.py --fc_examples=10000 --conv_examples=2000   # quicker

Measured, all in one run and on the same data:
- gradient time and HVP time over the whole data set, and their ratio (target <= 2.5);
- Lanczos time / (steps x HVP time) (target <= 1.05);
- compile time of the Lanczos loop at 20 and 80 steps (target: 80 <= 1.5 x 20);
- matvecs to reach relative residual 1e-4 on the top 10: ours against SciPy's ARPACK
  (`eigsh`, the paper's method) driven by the same jitted HVP, with each result's explicit
  residual checked by the same code, at initialisation and after SGD training.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy
import scipy.sparse.linalg as sla
from absl import app, flags
from jax import flatten_util

import _common
import hessian_subspace as hs
from hessian_subspace import krylov
from hessian_subspace.paper import data as data_lib
from hessian_subspace.paper import models
from hessian_subspace.training import tasks

FLAGS = flags.FLAGS
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string("fashion_mnist", os.path.join(os.path.dirname(_REPO), "shared", "data",
                                                   "fashion-mnist"), "IDX directory.")
flags.DEFINE_integer("fc_examples", 60000, "Examples of Fashion-MNIST used (60000 = all).")
flags.DEFINE_integer("conv_examples", 500, "CIFAR-shaped random examples for the conv net.")
flags.DEFINE_integer("conv_lanczos_steps", 10, "Lanczos steps timed for the conv net.")
flags.DEFINE_integer("batch_size", 10000, "Batch size inside the data-set HVP and gradient.")
flags.DEFINE_integer("train_steps", 300, "SGD steps before the 'trained' measurement.")
flags.DEFINE_integer("repeats", 5, "Timing repeats (median reported).")
flags.DEFINE_integer("k", 10, "Eigenpairs for the ARPACK comparison.")
flags.DEFINE_float("tol", 1e-4, "Relative residual target for the ARPACK comparison.")
flags.DEFINE_string("json_out", None, "Also write the JSON here.")
flags.DEFINE_bool("conv", True, "Also benchmark the small conv net.")


def _relative_residuals(op_flat, values, vectors):
    """Explicit ||Hv - λv|| / |λ| for rows of `vectors`, with float64 bookkeeping."""
    hv = np.stack([np.asarray(op_flat(jnp.asarray(v, jnp.float32)), np.float64) for v in vectors])
    return np.linalg.norm(hv - values[:, None] * vectors, axis=1) / np.abs(values)


def _ratios(loss_fn, params, data, batch_size, repeats, steps=40):
    op = hs.dataset_hvp(loss_fn, params, data, batch_size=batch_size)
    v = hs.random_start_vector(jax.random.key(0), params)
    grad_fn = jax.jit(lambda p: hs.dataset_mean(lambda b: jax.grad(loss_fn)(p, b), data,
                                                batch_size=batch_size))
    t_grad = _common.median_time(lambda: grad_fn(params), repeats)
    t_hvp = _common.median_time(lambda: op(v), repeats)
    # The same gradient as one batch outside any loop: XLA:CPU runs convolutions inside loop
    # bodies far slower than outside (jax-ml/jax#12868), which this exposes.
    whole = jax.jit(lambda p: jax.grad(loss_fn)(p, data))
    t_whole = _common.median_time(lambda: whole(params), repeats)
    t_lanczos = _common.median_time(lambda: hs.lanczos(op, v, steps), max(1, repeats // 2))
    out = dict(grad_s=t_grad, hvp_s=t_hvp, hvp_over_grad=t_hvp / t_grad,
               grad_one_batch_no_loop_s=t_whole,
               lanczos_steps=steps, lanczos_s=t_lanczos,
               lanczos_over_steps_x_hvp=t_lanczos / (steps * t_hvp))
    for n in (20, 80):
        start = time.perf_counter()
        krylov._lanczos_jit.lower(op, v, num_steps=n, reorth=2, dtype=jnp.dtype(jnp.float32),
                                  breakdown_factor=krylov.DEFAULT_BREAKDOWN_FACTOR).compile()
        out[f"compile_s_{n}_steps"] = time.perf_counter() - start
    out["compile_80_over_20"] = out["compile_s_80_steps"] / out["compile_s_20_steps"]
    return out, op


def _top_vs_arpack(op, params, k, tol):
    flat0, unravel = flatten_util.ravel_pytree(params)
    op_flat = jax.jit(lambda x: flatten_util.ravel_pytree(op(unravel(x)))[0])
    v0 = hs.random_start_vector(jax.random.key(1), params)
    v0_flat = np.asarray(flatten_util.ravel_pytree(v0)[0], np.float64)

    # A generous step cap: the solve stops by itself once the Ritz estimates reach `tol`.
    cap = min(op.dim, 300)
    hs.top_eigenpairs(op, v0, k, tol=tol, num_steps=cap)  # compile
    start = time.perf_counter()
    ours = hs.top_eigenpairs(op, v0, k, tol=tol, num_steps=cap)
    jax.block_until_ready(ours)
    t_ours = time.perf_counter() - start
    ours_vals = np.asarray(ours.eigenvalues, np.float64)
    ours_rel = _relative_residuals(op_flat, ours_vals, np.asarray(ours.eigenvectors, np.float64))

    count = [0]

    def matvec(x):
        count[0] += 1
        return np.asarray(op_flat(jnp.asarray(x, jnp.float32)), np.float64)

    linop = sla.LinearOperator((flat0.size, flat0.size), matvec=matvec, dtype=np.float64)
    matvec(v0_flat)  # compile outside the timing
    count[0] = 0
    start = time.perf_counter()
    vals, vecs = sla.eigsh(linop, k=k, which="LA", tol=tol, v0=v0_flat)
    t_arpack = time.perf_counter() - start
    order = np.argsort(-vals)
    vals, vecs = vals[order], vecs[:, order].T
    arpack_matvecs = count[0]
    arpack_rel = _relative_residuals(op_flat, vals, vecs)
    krylov_matvecs = int(ours.num_matvecs) - 1  # verify="relation": one confirming product
    return dict(
        ours_matvecs_total=int(ours.num_matvecs), ours_krylov_matvecs=krylov_matvecs,
        ours_verification_matvecs=1, ours_s=t_ours, ours_max_rel_residual=float(ours_rel.max()),
        ours_all_converged=bool(np.all(ours.converged)),
        arpack_matvecs=arpack_matvecs, arpack_s=t_arpack,
        arpack_max_rel_residual=float(arpack_rel.max()),
        max_eigenvalue_rel_diff=float(np.max(np.abs(vals - ours_vals) / np.abs(vals))),
        top_eigenvalues=ours_vals.round(5).tolist(),
    )


def _train(loss_fn, params, data, steps, seed=0):
    tx = optax.sgd(0.1)
    opt = tx.init(params)

    @jax.jit
    def step(p, o, batch):
        g = jax.grad(loss_fn)(p, batch)
        u, o = tx.update(g, o)
        return optax.apply_updates(p, u), o

    rng = np.random.default_rng(seed)
    n = jax.tree_util.tree_leaves(data)[0].shape[0]
    for _ in range(steps):
        idx = rng.integers(0, n, 64)
        batch = {name: x[idx] for name, x in data.items()}
        params, opt = step(params, opt, batch)
    return params


def main(argv):
    del argv
    result = dict(
        machine=_common.machine(),
        versions=_common.versions(scipy=scipy.__version__),
        precision=dict(hvp="float32, default matmul precision", lanczos="float32",
                       arpack="float64 recurrence over the float32 HVP"),
    )
    # FC 784-100-100-10 on Fashion-MNIST.
    ds = data_lib.load_idx_dataset(FLAGS.fashion_mnist, "train")
    n = FLAGS.fc_examples
    fc_data = {"x": jnp.asarray(ds["x"][:n]), "y": jnp.asarray(ds["y"][:n])}
    fc = models.MLP(hidden=(100, 100), num_outputs=10)
    fc_loss = tasks.cross_entropy_loss(fc)
    fc_params = models.init_params(fc, jax.random.key(0), fc_data["x"][:1])
    timing, op = _ratios(fc_loss, fc_params, fc_data, FLAGS.batch_size, FLAGS.repeats)
    fc_out = dict(model="FC 784-100-100-10", data=f"Fashion-MNIST, {n} examples",
                  num_params=op.dim, **timing)
    fc_out["top_vs_arpack_init"] = _top_vs_arpack(op, fc_params, FLAGS.k, FLAGS.tol)
    trained = _train(fc_loss, fc_params, fc_data, FLAGS.train_steps)
    op = hs.dataset_hvp(fc_loss, trained, fc_data, batch_size=FLAGS.batch_size)
    fc_out[f"top_vs_arpack_after_{FLAGS.train_steps}_sgd_steps"] = _top_vs_arpack(
        op, trained, FLAGS.k, FLAGS.tol)
    result["fc_fashion_mnist"] = fc_out

    if FLAGS.conv:
        result["small_convnet_cifar_shaped"] = _conv_benchmark()
    _common.emit(result, FLAGS.json_out)


def _conv_benchmark():
    """Small conv net on CIFAR-shaped random data."""
    rng = np.random.default_rng(0)
    m = FLAGS.conv_examples
    conv_data = {"x": jnp.asarray(rng.normal(size=(m, 32, 32, 3)), jnp.float32),
                 "y": jnp.asarray(rng.integers(0, 10, m), jnp.int32)}
    conv = models.SmallConvNet(channels=(16, 32), num_outputs=10)
    conv_loss = tasks.cross_entropy_loss(conv)
    conv_params = models.init_params(conv, jax.random.key(0), conv_data["x"][:1])
    timing, op = _ratios(conv_loss, conv_params, conv_data, min(FLAGS.batch_size, m // 2),
                         max(1, FLAGS.repeats // 2), steps=FLAGS.conv_lanczos_steps)
    return dict(model="SmallConvNet (16, 32) + dense", data=f"random CIFAR-shaped, {m} examples",
                num_params=op.dim, **timing)


if __name__ == "__main__":
    app.run(main)
