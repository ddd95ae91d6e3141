r"""Train one of the paper's models, leaving orbax train-state checkpoints in --workdir.

  python -m launch.train --config=launch/configs/train.py:smoke --workdir=/tmp/run

Starting again with the same --workdir resumes from the last finalised checkpoint. See
launch/configs/train.py for the config fields and overrides (--config.FIELD=VALUE).
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from hessian_subspace.analysis.sources import CheckpointError
from hessian_subspace.paper import experiment
from launch import _runtime

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory (checkpoints, train_log.jsonl).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    try:
        mesh = _runtime.initialize()
    except (RuntimeError, ValueError) as e:  # a peer missing, a bad mesh: one line
        sys.exit(f"launch.train: {e}")
    logging.info("JAX devices: %s", jax.devices())
    try:
        experiment.train_from_config(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress,
                                     mesh=mesh if FLAGS.mesh else None)
    except (OSError, CheckpointError) as e:  # a full disk, an unreadable checkpoint: one line
        sys.exit(f"launch.train: {e} (the last finalised checkpoint resumes the run)")
    _runtime.finished()


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=_runtime.parse_flags)
