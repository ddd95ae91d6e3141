r"""Benchmark: tracking the top-k subspace across checkpoints against cold Lanczos; prints JSON.

  python benchmarks/tracker.py --workdir=results/fmnist/runs/fc_mnist-XXXX

Takes a training run's checkpoints (default: trains FC 784-100-100-10 on Fashion-MNIST for
--train_steps steps), and at each checkpoint t >= --min_step computes the top-k eigenpairs
(relative residual <= --tol) twice: cold (`top_eigenpairs` from a random vector: Krylov matvecs
+ 1 verification matvec) and tracked (`track_eigenpairs` seeded with the previous checkpoint's
top k + --guard eigenvectors: every matvec counted, residuals from stored products). Reports
matvecs, the ratio tracked/cold, residuals and eigenvalue differences.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

import _common
import hessian_subspace as hs
from hessian_subspace import training
from hessian_subspace.paper import experiment
from hessian_subspace.training import checkpoint, tasks

FLAGS = flags.FLAGS
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string("workdir", None, "A training run (default: train one in a temp dir).")
flags.DEFINE_string("fashion_mnist", os.path.join(os.path.dirname(_REPO), "shared", "data",
                                                   "fashion-mnist"), "IDX directory.")
flags.DEFINE_integer("train_steps", 400, "Steps of the run trained when --workdir is unset.")
flags.DEFINE_integer("min_step", 100, "First checkpoint measured (the subspace has settled).")
flags.DEFINE_integer("max_checkpoints", 8, "Checkpoints measured.")
flags.DEFINE_integer("num_analysis", 10000, "Analysis-set size.")
flags.DEFINE_integer("k", 10, "Eigenpairs.")
flags.DEFINE_integer("guard", 2, "Extra previous eigenvectors in the start block.")
flags.DEFINE_float("tol", 1e-3, "Relative residual.")
flags.DEFINE_string("json_out", None, "Also write the JSON here.")


def main(argv):
    del argv
    workdir = FLAGS.workdir
    if workdir is None:
        workdir = tempfile.mkdtemp(prefix="bench_tracker_")
        config = experiment.default_config()
        config.data.name = f"idx:{FLAGS.fashion_mnist}"
        config.num_steps = FLAGS.train_steps
        config.checkpoint_schedule = "10:100,50"
        experiment.train_from_config(config, workdir, progress=False)
    config_json, num_outputs = experiment.read_run_config(workdir)
    config = experiment.ConfigDict(config_json)
    config.data.num_analysis = FLAGS.num_analysis
    data = experiment.load_data(config)
    model = experiment.build_model(config, num_outputs)
    analysis = {"x": data["analysis"]["x"], "y": data["analysis"]["y"]}
    ckpt_dir = os.path.join(workdir, training.CHECKPOINT_DIR)
    steps = [s for s in checkpoint.list_steps(ckpt_dir) if s >= FLAGS.min_step]
    steps = steps[: FLAGS.max_checkpoints + 1]
    k, m = FLAGS.k, FLAGS.k + FLAGS.guard
    rows, previous = [], None
    for step in steps:
        params, model_state = checkpoint.run_checkpoints(ckpt_dir).load(step)
        loss = hs.curvature.bind_state(tasks.inference_loss(model, config.task), model_state)
        op = hs.dataset_hvp(loss, params, analysis, batch_size=FLAGS.num_analysis)
        v0 = hs.random_start_vector(jax.random.fold_in(jax.random.key(0), step), params)
        hs.top_eigenpairs(op, v0, m, tol=FLAGS.tol)  # compile
        start = time.perf_counter()
        cold = hs.top_eigenpairs(op, v0, m, tol=FLAGS.tol)  # top k + guards for the next step
        cold_k = hs.top_eigenpairs(op, v0, k, tol=FLAGS.tol)
        t_cold = time.perf_counter() - start
        row = dict(step=step, cold_matvecs_k=int(cold_k.num_matvecs),
                   cold_converged=bool(np.all(cold_k.converged)))
        if previous is not None:
            hs.track_eigenpairs(op, previous, k, like=params, tol=FLAGS.tol)  # compile
            start = time.perf_counter()
            tracked = hs.track_eigenpairs(op, previous, k, like=params, tol=FLAGS.tol)
            jax.block_until_ready(tracked)
            row.update(
                tracked_matvecs=int(tracked.num_matvecs),
                ratio=int(tracked.num_matvecs) / int(cold_k.num_matvecs),
                tracked_converged=bool(np.all(tracked.converged)),
                tracked_max_rel_residual=float(np.max(np.asarray(tracked.residuals) / np.abs(
                    np.asarray(tracked.eigenvalues)))),
                max_eigenvalue_rel_diff=float(np.max(np.abs(
                    np.asarray(tracked.eigenvalues) - np.asarray(cold_k.eigenvalues))
                    / np.abs(np.asarray(cold_k.eigenvalues)))),
                tracked_seconds=round(time.perf_counter() - start, 3),
                cold_seconds=round(t_cold / 2, 3))
        rows.append(row)
        previous = np.asarray(cold.eigenvectors)
    measured = [r for r in rows if "ratio" in r]
    out = dict(
        machine=_common.machine(),
        versions=_common.versions(),
        setup=dict(workdir=workdir, k=k, guard=FLAGS.guard, tol=FLAGS.tol,
                   analysis_examples=FLAGS.num_analysis, min_step=FLAGS.min_step,
                   precision="float32, default matmul precision"),
        mean_ratio=statistics.mean(r["ratio"] for r in measured) if measured else None,
        max_ratio=max(r["ratio"] for r in measured) if measured else None,
        checkpoints=rows)
    _common.emit(out, FLAGS.json_out)


if __name__ == "__main__":
    app.run(main)
