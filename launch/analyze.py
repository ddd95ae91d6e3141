r"""Stream a training run's checkpoints through the metric pipeline into result files.

  python -m launch.analyze --workdir=runs/fc --results=runs/fc/analysis
  python -m launch.analyze --workdir=runs/fc --watch          # follow a live run
  python -m launch.analyze --workdir=runs/fc --steps=0,10,100 \
      --transforms=loss,gradient,eigenpairs,f_top

Restarting with the same arguments reuses every record computed from the same checkpoint
content, loss, data and settings (each record's fingerprints); a results directory holding
records of other inputs (another run's checkpoints, a retrained run, another loss) is refused
with the step and what changed, unless --overwrite (the old records are moved to
RESULTS/replaced/). The checkpoint directory is only read. One line per checkpoint: time spent,
HVPs used, metrics. Exit status 1 when no checkpoint is found, when checkpoints failed (each
listed; --allow_failures keeps their failure records and exits 0), or when --watch times out.

On a device mesh (examples over 'data', parameters FSDP over 'model'), and over several
processes (run one command per process; the results directory must be shared, process 0
writes it):

  python -m launch.analyze --workdir=runs/fc --mesh=data:4,model:2
  python -m launch.analyze --workdir=runs/fc --mesh=data:4 \
      --coordinator_address=localhost:12355 --num_processes=2 --process_id=0   # and =1
"""

import os
import sys

from absl import app, flags, logging

from hessian_subspace import analysis
from hessian_subspace.analysis import presets
from hessian_subspace.paper import experiment
from launch import _runtime

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training run directory (holds checkpoints/).")
flags.DEFINE_string("results", None, "Results directory (default: WORKDIR/analysis).")
flags.DEFINE_bool("watch", False, "Follow a live run until its last step is analysed.")
flags.DEFINE_list("steps", None, "Only these checkpoint steps.")
flags.DEFINE_list("transforms", list(presets.DEFAULT_TRANSFORMS),
                  f"Metric transforms, from {presets.TRANSFORMS}.")
flags.DEFINE_integer("k", None, "Top-k size (default: number of classes).")
flags.DEFINE_integer("lanczos_steps", None, "Krylov cap for the 2k eigenpairs.")
flags.DEFINE_float("tol", 1e-3, "Relative residual tolerance of the eigenpairs.")
flags.DEFINE_integer("block_size", 1, "Lanczos block size (>1 resolves repeated eigenvalues).")
flags.DEFINE_enum("dtype", "float32", ["float32", "float64"], "Analysis dtype.")
flags.DEFINE_string("precision", None, "HVP matmul precision (default, high, highest).")
flags.DEFINE_integer("batch_size", 1000, "Examples per HVP batch.")
flags.DEFINE_integer("num_analysis", None, "Use a fixed random subset of the training set.")
flags.DEFINE_list("reference_steps", ["0", "10", "50", "100", "200", "500", "1000"],
                  "Steps t1 whose top subspaces each checkpoint is compared with.")
flags.DEFINE_bool("warm_start", True, "Start Lanczos from the previous checkpoint's subspace.")
flags.DEFINE_list("slq_steps", [], "Steps at which to estimate the spectral density (SLQ).")
flags.DEFINE_list("dense_steps", [], "Steps at which to compute the full spectrum.")
flags.DEFINE_bool("test_metrics", False, "Also measure test loss and accuracy.")
flags.DEFINE_enum("curvature", "hessian", ["hessian", "ggn"],
                  "Curvature operator of every curvature metric: Hessian or Gauss-Newton.")
flags.DEFINE_bool("also_ggn", False, "With the Hessian, also the GGN top-k and f_top in it.")
flags.DEFINE_list("block", None, "Only these parameter leaves (path prefixes, e.g. dense_1).")
flags.DEFINE_bool("next_bound", False, "One more Ritz pair: error bars on next-k quantities.")
flags.DEFINE_bool("tracker", False, "Warm start by block Krylov from the previous basis.")
flags.DEFINE_bool("retry_failed", True, "Analyse again checkpoints whose record says failed.")
flags.DEFINE_bool("overwrite", False, "Compute again (moving the old ones to RESULTS/replaced/) "
                  "records made from other inputs than these checkpoints, loss, data and "
                  "settings; without it they are refused.")
flags.DEFINE_bool("allow_failures", False, "Exit 0 even if checkpoints failed (their records say "
                  "why); by default the run analyses every other checkpoint, then exits 1.")
flags.DEFINE_float("memory_budget", None, "Bytes per device for a Krylov basis (thick-restarted "
                   "Lanczos when the unrestarted basis would not fit).")
flags.DEFINE_enum("hvp_cache", "auto", ["auto", "true", "false"],
                  "Linearise the HVP once per solve (auto: when the stored activations fit a "
                  "quarter of the memory).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_float("poll_seconds", 2.0, "Polling interval with --watch.")
flags.DEFINE_float("timeout_seconds", 600.0, "With --watch, give up after this long without a "
                   "new checkpoint (exit status 1: the run did not finish).")


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    _runtime.check_flags()
    ints = lambda xs: tuple(int(x) for x in xs or ())  # noqa: E731
    settings = presets.Settings(
        transforms=tuple(FLAGS.transforms), k=FLAGS.k, lanczos_steps=FLAGS.lanczos_steps,
        tol=FLAGS.tol, block_size=FLAGS.block_size, dtype=FLAGS.dtype,
        precision=FLAGS.precision, batch_size=FLAGS.batch_size,
        reference_steps=ints(FLAGS.reference_steps), warm_start=FLAGS.warm_start,
        slq_steps=ints(FLAGS.slq_steps), dense_steps=ints(FLAGS.dense_steps),
        curvature=FLAGS.curvature, also_ggn=FLAGS.also_ggn,
        block=tuple(FLAGS.block) if FLAGS.block else None, next_bound=FLAGS.next_bound,
        tracker=FLAGS.tracker, memory_budget=FLAGS.memory_budget,
        hvp_cache={"auto": "auto", "true": True, "false": False}[FLAGS.hvp_cache])
    try:
        mesh = _runtime.initialize()
    except (RuntimeError, ValueError) as e:  # a peer missing, a bad mesh: one line
        sys.exit(f"launch.analyze: {e}")
    results = FLAGS.results or os.path.join(FLAGS.workdir, "analysis")
    try:
        records = experiment.analyze_run(
            FLAGS.workdir, results, settings=settings,
            steps=ints(FLAGS.steps) if FLAGS.steps else None, watch=FLAGS.watch,
            poll_seconds=FLAGS.poll_seconds, timeout_seconds=FLAGS.timeout_seconds,
            num_analysis=FLAGS.num_analysis, test_metrics=FLAGS.test_metrics,
            retry_failed=FLAGS.retry_failed, progress=FLAGS.progress, mesh=mesh,
            overwrite=FLAGS.overwrite, allow_failures=FLAGS.allow_failures)
    except TimeoutError as e:  # --watch: the run did not finish; exit non-zero
        logging.error("--watch: %s", e)
        sys.exit(f"launch.analyze: the watched run did not finish (--timeout_seconds="
                 f"{FLAGS.timeout_seconds:g}): {e}")
    except analysis.FailedStepsError as e:
        sys.exit(f"launch.analyze: {e}\n(results in {results}; --allow_failures to exit 0)")
    except analysis.PeerLostError as e:  # at once: JAX's clean-up would wait on the dead peer
        _runtime.exit_now(f"launch.analyze: {e}")
    except (analysis.StaleResultsError, FileNotFoundError, analysis.CheckpointError,
            OSError) as e:
        sys.exit(f"launch.analyze: {e}")
    failed = [r["step"] for r in records if r.get("status") == "failed"]
    logging.info("analysed %d checkpoints into %s (%d failed: %s)", len(records), results,
                 len(failed), failed)
    _runtime.finished()


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
