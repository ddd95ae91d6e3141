r"""The built-in default job: no arguments, no network, a few minutes on a 2-core CPU.

  python -m launch.main                  # writes results/summary.md, figures, JSON
  python -m launch.main --root=/tmp/out --quick

Runs the paper's Fig. 1 experiment (FC net, f_top with loss and accuracy over training) on the
Gaussian mixture of §3, and the toy model of §3 against its analytic solution.
"""

from absl import app, flags, logging

from hessian_subspace.paper import reproduce
from launch.configs import paper

FLAGS = flags.FLAGS
flags.DEFINE_string("root", "results", "Output directory.")
flags.DEFINE_bool("quick", False, "Smoke sizes (seconds).")
flags.DEFINE_bool("progress", True, "Progress bars.")


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    reproduce.main_job(paper.get_config("fig1_fc_mnist"), FLAGS.root, quick=FLAGS.quick,
                       progress=FLAGS.progress)
    with open(f"{FLAGS.root}/summary.md") as f:
        print(f.read())


if __name__ == "__main__":
    app.run(main)
