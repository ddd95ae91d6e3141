r"""Benchmark of the metric pipeline; prints one JSON object.

  python benchmarks/pipeline.py                       # FC 784-100-100-10 on Fashion-MNIST
  python benchmarks/pipeline.py --num_analysis=60000  # the whole training set as analysis set

Trains the FC net with SGD (η = 0.1, batch 64) for --train_steps steps with checkpoints, then
runs the default transform set over every checkpoint twice: with the Lanczos start vector taken
from the previous checkpoint's top subspace (warm) and from a random vector (cold). Reports,
per checkpoint, the time spent, the HVPs used and the overhead of everything but the HVPs
(time − HVPs × HVP time, with the HVP time measured in the same run), and warm-vs-cold HVPs.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import jax
from absl import app, flags

import _common
import hessian_subspace as hs
from hessian_subspace.analysis import config as config_lib
from hessian_subspace.paper import experiment
from hessian_subspace.training import checkpoint, tasks

FLAGS = flags.FLAGS
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string("fashion_mnist", os.path.join(os.path.dirname(_REPO), "shared", "data",
                                                   "fashion-mnist"), "IDX directory.")
flags.DEFINE_integer("train_steps", 300, "SGD steps of the benchmarked run.")
flags.DEFINE_string("schedule", "1:10,10:100,50", "Checkpoint schedule.")
flags.DEFINE_integer("num_analysis", 10000, "Analysis-set size (fixed subset of the 60k).")
flags.DEFINE_integer("batch_size", 10000, "Examples per HVP batch.")
flags.DEFINE_float("tol", 1e-3, "Relative residual of the eigenpairs.")
flags.DEFINE_string("workdir", None, "Where to put the run and results (default: a temp dir).")
flags.DEFINE_string("json_out", None, "Also write the JSON here.")


def _hvp_seconds(analyzer, model, task, params, model_state, repeats=5):
    loss = hs.curvature.bind_state(tasks.inference_loss(model, task), model_state)
    op = hs.dataset_hvp(loss, params, analyzer.data, batch_size=analyzer.batch_size)
    v = hs.random_start_vector(jax.random.key(0), params)
    jax.block_until_ready(op(v))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(op(v))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _analyse(workdir, results, warm):
    config_json, num_outputs = experiment.read_run_config(workdir)
    config = experiment.ConfigDict(config_json)
    config.data.num_analysis = FLAGS.num_analysis
    data = experiment.load_data(config)
    model = experiment.build_model(config, num_outputs)
    acfg = config_lib.as_config(dict(operator=dict(batch_size=FLAGS.batch_size),
                                     eigenpairs=dict(tol=FLAGS.tol, warm_start=warm)))
    analyzer = experiment.analyzer_for(config, num_outputs, data["analysis"], results,
                                       analysis_config=acfg, progress=False, model=model)
    records = analyzer.run(checkpoint.run_checkpoints(os.path.join(workdir, "checkpoints")))
    return analyzer, model, config.task, records


def main(argv):
    del argv
    root = FLAGS.workdir or tempfile.mkdtemp(prefix="bench_pipeline_")
    workdir = os.path.join(root, "run")
    config = experiment.default_config()
    config.data.name = f"idx:{FLAGS.fashion_mnist}"
    config.num_steps = FLAGS.train_steps
    config.checkpoint_schedule = FLAGS.schedule
    config.data.num_test = 2000
    start = time.perf_counter()
    state = experiment.train_from_config(config, workdir, progress=False)
    train_seconds = time.perf_counter() - start

    analyzer, model, task, warm = _analyse(workdir, os.path.join(root, "warm"), True)
    *_, cold = _analyse(workdir, os.path.join(root, "cold"), False)
    t_hvp = _hvp_seconds(analyzer, model, task, state.params, state.model_state)

    rows = []
    for w, c in zip(warm, cold, strict=True):
        rows.append(dict(
            step=w["step"], seconds=w["seconds"], hvps=w["hvps"],
            overhead_seconds=round(w["seconds"] - w["hvps"] * t_hvp, 3),
            lanczos_hvps_warm=w["lanczos_hvps"], lanczos_hvps_cold=c["lanczos_hvps"],
            converged_warm=w["all_converged"], converged_cold=c["all_converged"],
            f_top=round(w["f_top"], 4)))
    steady = rows[1:]  # the first checkpoint includes compilation
    out = dict(
        machine=_common.machine(),
        versions=_common.versions(),
        setup=dict(model="FC 784-100-100-10", data="Fashion-MNIST (IDX)",
                   analysis_examples=FLAGS.num_analysis, hvp_batch=FLAGS.batch_size,
                   transforms=list(config_lib.DEFAULT_TRANSFORMS), k=10, eigenpairs=20,
                   tol=FLAGS.tol, train_steps=FLAGS.train_steps, schedule=FLAGS.schedule,
                   precision="float32, default matmul precision"),
        train_seconds=round(train_seconds, 2),
        hvp_seconds=t_hvp,
        first_checkpoint_seconds=rows[0]["seconds"],
        mean_seconds_per_checkpoint=statistics.mean(r["seconds"] for r in steady),
        mean_hvps_per_checkpoint=statistics.mean(r["hvps"] for r in steady),
        mean_overhead_fraction=statistics.mean(
            r["overhead_seconds"] / r["seconds"] for r in steady),
        mean_lanczos_hvps_warm=statistics.mean(r["lanczos_hvps_warm"] for r in steady),
        mean_lanczos_hvps_cold=statistics.mean(r["lanczos_hvps_cold"] for r in steady),
        checkpoints=rows,
    )
    _common.emit(out, FLAGS.json_out)


if __name__ == "__main__":
    app.run(main)
