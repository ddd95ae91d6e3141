r"""Estimators at the limit (issue 21): verified top-k against matfree's unverified Lanczos, and
trace / diagonal / density deflated by the top eigenpairs against the plain estimators, on one
problem in one process; prints one JSON object.

  python benchmarks/estimators.py                    # FC 784-100-100-10, 5,000 images
  python benchmarks/estimators.py --rounds=3 --trace_repeats=5   # quicker

Problem: the paper's FC net on the first ``--examples`` Fashion-MNIST training images after
``--train_steps`` full-batch SGD steps (lr 0.1), float32; the product is our cached
linearisation for every solver (each solver linearises inside its own compiled call).

Top-k (``--k``): reference ARPACK in float64 over a float64 HVP (tol 1e-10). Timed,
interleaved over ``--rounds`` rounds (median): ours with the default check
(``verify="relation"``: one confirming product), ours with ``verify="explicit"`` (k
products), and matfree's ``eigh_partial(tridiag_sym(depth, reortho="full"))`` at the smallest
depth of a sweep whose largest relative eigenvalue error is at most ours' (found untimed).

Trace and diagonal: for each of ``--probes``, the deflated estimator with that many probes
(deflated by ours' top-k) against plain Hutchinson with that many probes **plus** the
eigensolve's HVPs (equal HVPs, the eigensolve counted), and XTrace / XDiag with as many
products (rounded down to even) and XTrace deflated by the same top-k; each repeated
``--trace_repeats`` times with fresh keys: the spread of the estimates beside the mean stated
standard error.
Density: SLQ (``--slq_probes`` × ``--slq_steps``) plain and deflated, seconds and where the
mass above the bulk goes.
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy
import scipy.sparse.linalg as sla
from absl import app, flags, logging
from jax import flatten_util

import _common
import hessian_subspace as hs
from hessian_subspace import linearization
from hessian_subspace.paper import data as data_lib
from hessian_subspace.paper import models
from hessian_subspace.training import tasks

FLAGS = flags.FLAGS
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string("fashion_mnist", os.path.join(os.path.dirname(_REPO), "shared", "data",
                                                   "fashion-mnist"), "IDX directory.")
flags.DEFINE_integer("examples", 5000, "Fashion-MNIST training images.")
flags.DEFINE_integer("train_steps", 100, "Full-batch SGD steps (lr 0.1) before measuring.")
flags.DEFINE_integer("k", 10, "Top eigenpairs.")
flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds of the eigensolvers (median).")
flags.DEFINE_list("probes", ["10", "50"], "Probe counts of the deflated trace.")
flags.DEFINE_integer("trace_repeats", 10, "Repetitions (fresh keys) of every trace estimate.")
flags.DEFINE_integer("slq_probes", 10, "SLQ probes.")
flags.DEFINE_integer("slq_steps", 80, "SLQ Lanczos steps per probe.")
flags.DEFINE_bool("density", True, "Also time the SLQ densities.")
flags.DEFINE_string("json_out", None, "Also write the JSON here.")


def _sync(x):
    return jax.block_until_ready(x)


def _problem():
    ds = data_lib.load_idx_dataset(FLAGS.fashion_mnist, "train")
    n = FLAGS.examples
    model = models.MLP(hidden=(100, 100), num_outputs=10)
    data = {"x": jnp.asarray(ds["x"][:n]), "y": jnp.asarray(ds["y"][:n])}
    loss_fn = tasks.cross_entropy_loss(model)
    params = models.init_params(model, jax.random.key(0), data["x"][:1])
    grad = jax.jit(jax.grad(loss_fn))
    for _ in range(FLAGS.train_steps):
        params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grad(params, data))
    return loss_fn, _sync(params), data


def _reference(loss_fn, params, data, k):
    flat0, unravel = flatten_util.ravel_pytree(params)
    with jax.enable_x64(True):
        params64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        data64 = {"x": jnp.asarray(data["x"], jnp.float64), "y": data["y"]}
        op64 = hs.dataset_hvp(loss_fn, params64, data64, batch_size=int(data["y"].shape[0]))
        prepared = linearization.prepare(op64)
        mv = jax.jit(lambda m, x: flatten_util.ravel_pytree(m(unravel(x)))[0])
        lin = sla.LinearOperator((flat0.size,) * 2, dtype=np.float64,
                                 matvec=lambda x: np.asarray(mv(prepared, x)))
        vals = sla.eigsh(lin, k=k, which="LA", tol=1e-10, v0=np.ones(flat0.size))[0]
    return np.sort(vals)[::-1]


def _matfree_solver(depth, k):
    from matfree import decomp, eig

    solve = eig.eigh_partial(decomp.tridiag_sym(depth, reortho="full"))

    @jax.jit
    def run(op, v0):
        m = op.prepared()  # linearised inside the call, as top_eigenpairs does
        vals, _ = solve(lambda v: m(v), v0)
        return jnp.sort(vals)[::-1][:k]

    return run


def _interleaved(methods, rounds):
    times = {name: [] for name in methods}
    for fn in methods.values():
        _sync(fn())
    for r in range(rounds):
        for name, fn in methods.items():
            start = time.perf_counter()
            _sync(fn())
            times[name].append(time.perf_counter() - start)
        logging.info("round %d/%d", r + 1, rounds)
    return {name: statistics.median(t) for name, t in times.items()}, times


def _topk(op, params, ref, k):
    def err(values):
        values = np.sort(np.asarray(values, np.float64))[::-1][:k]
        return float(np.max(np.abs(values - ref) / np.abs(ref)))

    v0 = hs.random_start_vector(jax.random.key(1), params)
    rel = _sync(hs.top_eigenpairs(op, v0, k))
    exp = _sync(hs.top_eigenpairs(op, v0, k, verify="explicit"))
    target = err(rel.eigenvalues)
    sweep, depth = {}, None
    for d in range(k + 2, 90, 2):
        e = err(_matfree_solver(d, k)(op, v0))
        sweep[d] = e
        if e <= target:
            depth = d
            break
    logging.info("matfree depth sweep: %s", sweep)
    run_mf = _matfree_solver(depth, k)
    prepared = linearization.prepare(op)
    hvp = jax.jit(lambda m, v: m(v))
    methods = {
        "ours_relation": lambda: hs.top_eigenpairs(op, v0, k),
        "ours_explicit": lambda: hs.top_eigenpairs(op, v0, k, verify="explicit"),
        "matfree": lambda: run_mf(op, v0),
        "hvp": lambda: hvp(prepared, v0),
    }
    med, raw = _interleaved(methods, FLAGS.rounds)
    t_hvp = med["hvp"]
    out = dict(
        reference="ARPACK float64 over a float64 HVP, tol 1e-10",
        hvp_seconds=t_hvp,
        ours_relation=dict(seconds=med["ours_relation"], hvps=int(rel.num_matvecs),
                           all_converged=bool(np.all(rel.converged)), max_rel_error=target),
        ours_explicit=dict(seconds=med["ours_explicit"], hvps=int(exp.num_matvecs),
                           all_converged=bool(np.all(exp.converged)),
                           max_rel_error=err(exp.eigenvalues)),
        matfree=dict(depth=depth, seconds=med["matfree"], hvps=depth,
                     max_rel_error=sweep.get(depth), sweep=sweep),
        ratio_relation_over_matfree=med["ours_relation"] / med["matfree"],
        ratio_explicit_over_matfree=med["ours_explicit"] / med["matfree"],
        verification_hvp_equivalents=dict(
            relation=None, explicit_minus_relation=(med["ours_explicit"] - med["ours_relation"])
            / t_hvp),
        same_converged=bool(np.array_equal(np.asarray(rel.converged),
                                           np.asarray(exp.converged))),
        max_residual_difference=float(np.max(np.abs(np.asarray(rel.residuals)
                                                    - np.asarray(exp.residuals)))),
        raw_seconds=raw,
    )
    return out, rel


def _trace(op, eig):
    solve_hvps = int(eig.num_matvecs)
    out = {}
    for n in (int(x) for x in FLAGS.probes):
        rows = {}
        even = (n + solve_hvps) // 2 * 2
        for name, probes, deflate, fn in (
                ("plain_equal_hvps", n + solve_hvps, None, hs.hutchinson_trace),
                ("plain_same_probes", n, None, hs.hutchinson_trace),
                ("deflated", n, eig, hs.hutchinson_trace),
                ("xtrace_equal_hvps", even, None, hs.xtrace),
                ("xtrace_deflated", n // 2 * 2, eig, hs.xtrace)):
            est, se = [], []
            start = time.perf_counter()
            for r in range(FLAGS.trace_repeats):
                key = jax.random.key(100 + r)
                t = _sync(fn(op, key, num_probes=probes, deflate=deflate) if fn is
                          hs.hutchinson_trace else fn(op, key, num_matvecs=probes,
                                                      deflate=deflate))
                est.append(float(t.estimate))
                se.append(float(t.standard_error))
            rows[name] = dict(probes=probes, hvps=probes + (solve_hvps if deflate else 0),
                              mean_estimate=float(np.mean(est)),
                              spread=float(np.std(est, ddof=1)),
                              stated_standard_error=float(np.sqrt(np.mean(np.square(se)))),
                              seconds_each=(time.perf_counter() - start) / FLAGS.trace_repeats)
        rows["se_ratio_plain_equal_hvps_over_deflated"] = (
            rows["plain_equal_hvps"]["stated_standard_error"]
            / rows["deflated"]["stated_standard_error"])
        rows["spread_ratio_plain_equal_hvps_over_xtrace"] = (
            rows["plain_equal_hvps"]["spread"] / rows["xtrace_equal_hvps"]["spread"])
        rows["spread_ratio_deflated_over_xtrace"] = (
            rows["deflated"]["spread"] / rows["xtrace_equal_hvps"]["spread"])
        out[f"probes_{n}"] = rows
    # The diagonal, once each, at the largest probe count.
    n = max(int(x) for x in FLAGS.probes)
    plain = _sync(hs.hutchinson_diagonal(op, jax.random.key(7), num_probes=n + solve_hvps))
    defl = _sync(hs.hutchinson_diagonal(op, jax.random.key(7), num_probes=n, deflate=eig))
    se_p = flatten_util.ravel_pytree(plain.standard_error)[0]
    se_d = flatten_util.ravel_pytree(defl.standard_error)[0]
    d_d = flatten_util.ravel_pytree(defl.diagonal)[0]
    xd = _sync(hs.xdiag(op, jax.random.key(7), num_matvecs=(n + solve_hvps) // 2 * 2))
    se_x = flatten_util.ravel_pytree(xd.standard_error)[0]
    out["diagonal"] = dict(
        probes_plain=n + solve_hvps, probes_deflated=n,
        median_se_ratio_plain_over_deflated=float(np.median(np.asarray(se_p / se_d))),
        median_relative_se_deflated=float(np.median(np.asarray(se_d / jnp.abs(d_d)))),
        xdiag_matvecs=(n + solve_hvps) // 2 * 2,
        # Over the entries every estimator sees as random (a parameter the loss ignores has a
        # zero row: standard error 0 everywhere).
        median_se_ratio_plain_over_xdiag=_median_ratio(se_p, se_x),
        median_se_ratio_deflated_over_xdiag=_median_ratio(se_d, se_x),
        trace_from_diagonal=float(defl.trace), trace_standard_error=float(
            defl.trace_standard_error))
    return out


def _median_ratio(a, b):
    a, b = np.asarray(a), np.asarray(b)
    live = (a > 0) & (b > 0)
    return float(np.median(a[live] / b[live]))


def _density(op, eig):
    """Seconds of each, and the weight each probe puts at λ_1 (nodes within 1 % of it):
    1/p exactly when deflated; plain SLQ's is the probe's (v_1·z)², a χ²₁/p draw."""
    out = {}
    lam1 = float(np.max(np.asarray(eig.eigenvalues)))
    for name, deflate in (("plain", None), ("deflated", eig)):
        q = _sync(hs.slq_quadrature(op, jax.random.key(3), num_probes=FLAGS.slq_probes,
                                    num_steps=FLAGS.slq_steps, deflate=deflate))
        start = time.perf_counter()
        q = _sync(hs.slq_quadrature(op, jax.random.key(3), num_probes=FLAGS.slq_probes,
                                    num_steps=FLAGS.slq_steps, deflate=deflate))
        seconds = time.perf_counter() - start
        near = np.abs(np.asarray(q.nodes) - lam1) <= 0.01 * lam1
        w = np.sum(np.where(near, np.asarray(q.weights), 0.0), axis=1) * op.dim
        out[name] = dict(seconds=seconds, hvps=FLAGS.slq_probes * FLAGS.slq_steps,
                         weight_at_lambda1_times_p=dict(mean=float(np.mean(w)),
                                                        min=float(np.min(w)),
                                                        max=float(np.max(w))))
    return out


def main(argv):
    del argv
    import matfree  # noqa: F401

    loss_fn, params, data = _problem()
    n = int(data["y"].shape[0])
    op = hs.dataset_hvp(loss_fn, params, data, batch_size=n)
    ref = _reference(loss_fn, params, data, FLAGS.k)
    topk, eig = _topk(op, params, ref, FLAGS.k)
    from importlib import metadata
    result = dict(
        machine=_common.machine(),
        versions=_common.versions(scipy=scipy.__version__,
                                  matfree=metadata.version("matfree")),
        problem=dict(model="FC 784-100-100-10", examples=n, dtype="float32",
                     train_steps=FLAGS.train_steps, params=int(op.dim), k=FLAGS.k),
        reference_eigenvalues=ref.round(6).tolist(),
        topk=topk, trace=_trace(op, eig),
        density=_density(op, eig) if FLAGS.density else None)
    _common.emit(result, FLAGS.json_out)


if __name__ == "__main__":
    app.run(main)
