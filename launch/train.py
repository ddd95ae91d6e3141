r"""Train one of the paper's models, leaving orbax train-state checkpoints in --workdir.

  python -m launch.train --config=launch/configs/train.py:smoke --workdir=/tmp/run

Starting again with the same --workdir resumes from the last finalised checkpoint. See
launch/configs/train.py for the config fields and overrides (--config.FIELD=VALUE).
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from hessian_subspace.paper import experiment
from launch import _runtime

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory (checkpoints, train_log.jsonl).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    mesh = _runtime.initialize()
    logging.info("JAX devices: %s", jax.devices())
    experiment.train_from_config(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress,
                                 mesh=mesh if FLAGS.mesh else None)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=_runtime.parse_flags)
