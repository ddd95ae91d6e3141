r"""The main job on its built-in default: the paper's effect on a synthetic data set, no network.

  python -m launch.main                 # ~1 minute on a 2-core CPU
  python -m launch.main --num_classes=5 --measure_at=0,50,100

Trains a fully connected net with SGD on a Gaussian mixture and prints, at a few steps, the top-k
Hessian eigenvalues, f_top (the fraction of the gradient in the top-k subspace), overlap(g, Hg)
and the overlap of the top subspace with the previous measurement's.
"""

import json

from absl import app, flags, logging

from hessian_subspace import demo

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_classes", 10, "Classes k of the Gaussian mixture (= top eigenpairs).")
flags.DEFINE_integer("dim", 100, "Input dimension.")
flags.DEFINE_integer("num_examples", 4000, "Training-set size.")
flags.DEFINE_float("sigma", 0.35, "Noise of the mixture around its unit class means.")
flags.DEFINE_list("hidden", ["100", "100"], "Hidden layer widths.")
flags.DEFINE_float("learning_rate", 0.1, "SGD step size.")
flags.DEFINE_integer("batch_size", 64, "SGD batch size.")
flags.DEFINE_list("measure_at", ["0", "10", "25", "50", "100", "200", "400", "800"],
                  "Steps to measure at.")
flags.DEFINE_integer("seed", 0, "Seed for data, init and batch order.")
flags.DEFINE_string("json_out", None, "Also write the records to this JSON file.")


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    records = demo.run_demo(
        num_classes=FLAGS.num_classes, dim=FLAGS.dim, num_examples=FLAGS.num_examples,
        sigma=FLAGS.sigma, hidden=[int(h) for h in FLAGS.hidden],
        learning_rate=FLAGS.learning_rate, batch_size=FLAGS.batch_size,
        measure_at=[int(s) for s in FLAGS.measure_at], seed=FLAGS.seed)
    print(demo.format_table(records))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    app.run(main)
