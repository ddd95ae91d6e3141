r"""Stream a training run's checkpoints through the metric pipeline into result files.

  python -m launch.analyze --workdir=runs/fc --results=runs/fc/analysis
  python -m launch.analyze --workdir=runs/fc --watch          # follow a live run
  python -m launch.analyze --workdir=runs/fc --steps=0,10,100 \
      --config.transforms=loss,gradient,eigenpairs,f_top --config.k=20

What is measured is the analysis config (``launch/configs/analysis.py``: one section per
transform, its fields the factory's arguments; ``--config.SECTION.FIELD=VALUE`` overrides any
of them). The flat flags of earlier versions (--k, --tol, --lanczos_steps, --reference_steps,
--transforms ...) are aliases onto its fields (``hessian_subspace.analysis.config.ALIASES``);
a flag given on the command line is applied after the config's overrides.

Your own model's orbax checkpoints, without writing a script (``module:attribute`` names,
imported from the working directory and PYTHONPATH; see launch/configs/analysis.py):

  python -m launch.analyze --results=results/mine --config.k=10 \
      --config.source.checkpoints=ckpts --config.source.loss=my_model:loss \
      --config.source.data=my_model:analysis_set --config.source.params=my_model:init_params

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

import functools
import importlib
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from hessian_subspace import analysis, sharding
from hessian_subspace.analysis import config as config_lib
from hessian_subspace.paper import experiment
from launch import _runtime

FLAGS = flags.FLAGS
try:  # a default config file is read, with its overrides, when the flag is defined
    config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                               "analysis.py"),
        "Analysis config (default launch/configs/analysis.py); --config.FIELD=VALUE overrides.",
        lock_config=True)
except (AttributeError, KeyError) as _error:  # an override of no field: one line, exit 1
    from launch.configs import analysis as _default

    _runtime.bad_override(sys.argv, _default.get_config(), _error)
flags.DEFINE_string("workdir", None, "Training run directory of launch.train (holds "
                    "checkpoints/); or give --config.source.checkpoints for your own model.")
flags.DEFINE_string("results", None, "Results directory (default: WORKDIR/analysis).")
flags.DEFINE_bool("watch", False, "Follow a live run until its last step is analysed.")
flags.DEFINE_list("steps", None, "Only these checkpoint steps.")
flags.DEFINE_integer("num_analysis", None, "Use a fixed random subset of the training set.")
flags.DEFINE_bool("test_metrics", False, "Also measure test loss and accuracy.")
flags.DEFINE_bool("retry_failed", True, "Analyse again checkpoints whose record says failed.")
flags.DEFINE_bool("overwrite", False, "Compute again (moving the old ones to RESULTS/replaced/) "
                  "records made from other inputs than these checkpoints, loss, data and "
                  "settings; without it they are refused.")
flags.DEFINE_bool("allow_failures", False, "Exit 0 even if checkpoints failed (their records say "
                  "why); by default the run analyses every other checkpoint, then exits 1.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_float("poll_seconds", 2.0, "Polling interval with --watch.")
flags.DEFINE_float("timeout_seconds", 600.0, "With --watch, give up after this long without a "
                   "new checkpoint (exit status 1: the run did not finish).")

# Aliases onto the analysis config (hessian_subspace.analysis.config.ALIASES), applied only
# when given on the command line.
_ALIAS = "alias of --config."
flags.DEFINE_list("transforms", None, f"{_ALIAS}transforms, from {list(config_lib.TRANSFORMS)}.")
flags.DEFINE_integer("k", None, f"{_ALIAS}k: top-k size (default: number of classes).")
flags.DEFINE_integer("lanczos_steps", None, f"{_ALIAS}eigenpairs.num_steps (and ggn's).")
flags.DEFINE_float("tol", None, f"{_ALIAS}eigenpairs.tol (and ggn's, block_spectra's, adam's).")
flags.DEFINE_integer("block_size", None, f"{_ALIAS}eigenpairs.block_size (and ggn's).")
flags.DEFINE_enum("dtype", None, ["float32", "float64"], f"{_ALIAS}operator.dtype.")
flags.DEFINE_string("precision", None, f"{_ALIAS}operator.precision.")
flags.DEFINE_integer("batch_size", None, f"{_ALIAS}operator.batch_size.")
flags.DEFINE_list("reference_steps", None, f"{_ALIAS}subspace_overlap.reference_steps.")
flags.DEFINE_bool("warm_start", None, f"{_ALIAS}eigenpairs.warm_start.")
flags.DEFINE_list("slq_steps", None, f"{_ALIAS}slq.steps.")
flags.DEFINE_list("dense_steps", None, f"{_ALIAS}dense_spectrum.steps.")
flags.DEFINE_enum("curvature", None, ["hessian", "ggn"], f"{_ALIAS}operator.curvature.")
flags.DEFINE_bool("also_ggn", None, "Adds 'ggn' to --config.transforms.")
flags.DEFINE_list("block", None, f"{_ALIAS}operator.block.")
flags.DEFINE_bool("next_bound", None, f"{_ALIAS}eigenpairs.next_bound.")
flags.DEFINE_bool("tracker", None, f"{_ALIAS}eigenpairs.tracker.")
flags.DEFINE_float("memory_budget", None, f"{_ALIAS}eigenpairs.memory_budget.")
flags.DEFINE_enum("hvp_cache", None, ["auto", "true", "false"], f"{_ALIAS}operator.hvp_cache.")
ALIAS_FLAGS = ("transforms", "k", "lanczos_steps", "tol", "block_size", "dtype", "precision",
               "batch_size", "reference_steps", "warm_start", "slq_steps", "dense_steps",
               "curvature", "also_ggn", "block", "next_bound", "tracker", "memory_budget",
               "hvp_cache")
_INT_LISTS = ("reference_steps", "slq_steps", "dense_steps")


def analysis_config():
    """The analysis config: --config with its overrides, then the alias flags given, checked
    (a ``ValueError`` naming the field)."""
    given = {}
    for name in ALIAS_FLAGS:
        if FLAGS[name].present:
            value = FLAGS[name].value
            given[name] = tuple(int(x) for x in value) if name in _INT_LISTS else value
    fields = {key: value for key, value in FLAGS.config.to_dict().items() if key != "source"}
    config = config_lib.apply_aliases(config_lib.as_config(fields), **given)
    return config_lib.validate(config)


def load_attribute(field: str, name: str | None, *, call: bool = False):
    """The object that ``module:attribute`` names (``call``: a function of no arguments is
    called for it); None for None; a ``ValueError`` naming ``--config.source.FIELD``."""
    if not name:
        return None
    module, sep, attribute = name.partition(":")
    if not sep or not module or not attribute:
        raise ValueError(f"--config.source.{field} must be 'module:attribute', got {name!r}")
    try:
        obj = importlib.import_module(module)
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--config.source.{field}={name}: {e}") from None
    return obj() if call and callable(obj) else obj


def analyze_own_model(config, source, results: str, *, mesh) -> list[dict]:
    """Analyses the orbax checkpoints of a user's model that ``source`` names
    (``--config.source.*``): its loss, analysis data and parameter template as
    ``module:attribute``; on ``mesh``, parameters FSDP over its ``model`` axis and examples over
    ``data`` (every process restores only its shards)."""
    missing = [f for f in ("loss", "data", "params") if not source.get(f)]
    if missing:
        raise ValueError("--config.source.checkpoints needs "
                         + ", ".join(f"--config.source.{f}" for f in missing)
                         + " (module:attribute names)")
    todo = config_lib.names(config)
    if config.k is None and set(todo) - {"loss", "gradient", "overlap_g_hg", "slq",
                                         "dense_spectrum", "layers"}:
        raise ValueError("--config.k must be set for your own model (the size of the top "
                         "subspace: the number of classes)")
    loss_fn = load_attribute("loss", source.loss)
    data = load_attribute("data", source.data, call=True)
    template = load_attribute("params", source.params)
    like = jax.eval_shape(template) if callable(template) else jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), template)
    param_sharding = None
    if mesh is not None:
        param_sharding = functools.partial(sharding.fsdp_shardings, mesh=mesh)
        like = jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), like,
            param_sharding(like))
    chain = config_lib.build_chain(config, k=config.k or 1,
                                   metrics_fn=load_attribute("metrics", source.metrics))
    analyzer = analysis.Analyzer(
        chain, loss_fn, data=data,
        test_data=load_attribute("test_data", source.test_data, call=True),
        results=analysis.Results(
            results, overwrite=FLAGS.overwrite, retry_failed=FLAGS.retry_failed,
            record_fields=dict(k=config.k, source={f: source[f] for f in source}),
            progress=FLAGS.progress),
        **config_lib.analyzer_options(
            config, output_fn=load_attribute("output_fn", source.output_fn),
            output_loss=load_attribute("output_loss", source.output_loss), mesh=mesh,
            param_sharding=param_sharding))
    checkpoints = analysis.orbax_checkpoints(source.checkpoints, like=like, item=source.item,
                                             params_key=source.params_key)
    return analyzer.run(checkpoints, steps=_ints(FLAGS.steps) if FLAGS.steps else None,
                        watch=FLAGS.watch, poll_seconds=FLAGS.poll_seconds,
                        timeout_seconds=FLAGS.timeout_seconds,
                        allow_failures=FLAGS.allow_failures)


def _ints(values) -> tuple[int, ...]:
    return tuple(int(x) for x in values or ())


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    _runtime.check_flags()
    source = FLAGS.config.source
    if (FLAGS.workdir is None) == (source.checkpoints is None):
        raise app.UsageError("give --workdir (a run of launch.train) or "
                             "--config.source.checkpoints (your own model's checkpoints), "
                             "not both")
    if source.checkpoints is not None and FLAGS.results is None:
        raise app.UsageError("--results is required with --config.source.checkpoints")
    if source.checkpoints is not None and (FLAGS.num_analysis is not None or FLAGS.test_metrics):
        raise app.UsageError("--num_analysis and --test_metrics are for a run of launch.train "
                             "(--workdir); your model's analysis set and test set are "
                             "--config.source.data and --config.source.test_data")
    try:
        config = analysis_config()
    except (TypeError, ValueError) as e:
        raise app.UsageError(str(e)) from None
    try:
        mesh = _runtime.initialize()
    except (RuntimeError, ValueError) as e:  # a peer missing, a bad mesh: one line
        sys.exit(f"launch.analyze: {e}")
    results = FLAGS.results or os.path.join(FLAGS.workdir, "analysis")
    try:
        if source.checkpoints is not None:
            records = analyze_own_model(config, source, results, mesh=mesh)
        else:
            records = experiment.analyze_run(
                FLAGS.workdir, results, analysis_config=config,
                steps=_ints(FLAGS.steps) if FLAGS.steps else None, watch=FLAGS.watch,
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
            OSError, ValueError) as e:
        sys.exit(f"launch.analyze: {e}")
    failed = [r["step"] for r in records if r.get("status") == "failed"]
    logging.info("analysed %d checkpoints into %s (%d failed: %s)", len(records), results,
                 len(failed), failed)
    _runtime.finished()


if __name__ == "__main__":
    app.run(main, flags_parser=_runtime.parse_flags)
