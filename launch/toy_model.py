r"""The toy model of §3 / App. E: softmax regression on a Gaussian mixture, full-batch GD.

  python -m launch.toy_model --out_dir=runs/toy            # d=1000, k=2,5,10 (~6 min, 2 CPUs)
  python -m launch.toy_model --out_dir=/tmp/toy --smoke    # d=50, 300 steps (~15 s)

Runs k = 2, 5, 10 x σ = 0, 0.02 x without/with biases (footnote 13: d = 1000, random unit
means; n = 1000, which the paper does not give) and k = 2, σ = 0, orthonormal means, no bias
against the late-time solution (eqs. 17-19). Full-batch GD with η = 1 for 10^4 steps (the paper
gives no η for the toy model): the solution is a late-time limit with relative corrections of
order log(ηt)/(ηt) (hessian_subspace/toy_model.py), so ηt = 10^4 puts them near 10^-4, and
the largest eigenvalue met in any run is 0.76 (at initialisation; later ≈ 3/(ηt)), far inside
GD's stability bound η·λ_max < 2. Writes OUT_DIR/toy_model.json (every measurement: eigenvalues,
f_top, c_i², overlaps, the errors against the analytic solution, the claims (a)-(c) with their
numbers) and prints a summary.
"""

import os

# One OpenBLAS thread for the dense eigh (p <= 1200) and Lanczos' small eigh: on a busy 2-core
# machine the threaded LAPACK took 3.4 s per 510 x 510 eigh (smoke run 100 s) against 0.03 s
# single-threaded (smoke run 16 s). Set before numpy/jaxlib load OpenBLAS; an explicit value wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import time  # noqa: E402

from absl import app, flags, logging  # noqa: E402

from hessian_subspace import _io  # noqa: E402
from hessian_subspace.paper import toy_claims  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", None, "Directory for toy_model.json.")
flags.DEFINE_bool("smoke", False, "Tiny version: d=50, n=200, 300 steps.")
flags.DEFINE_integer("dim", 1000, "Input dimension d.")
flags.DEFINE_integer("num_examples", 1000, "Examples n (balanced classes).")
flags.DEFINE_list("classes", ["2", "5", "10"], "Class counts k.")
flags.DEFINE_float("sigma", 0.02, "The non-zero noise level σ (σ = 0 always runs too).")
flags.DEFINE_float("learning_rate", 1.0, "GD learning rate η.")
flags.DEFINE_list("measure_at", [str(s) for s in toy_claims.DEFAULT_MEASURE_AT],
                  "Steps to measure at (training runs to the last).")
flags.DEFINE_integer("seed", 0, "Seed of data, initialisation and Lanczos.")
flags.DEFINE_bool("orthogonal_means", False, "Orthonormal means in the paper runs too.")

SMOKE = dict(dim=50, num_examples=200, measure_at=(0, 10, 30, 100, 300))


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    kwargs = dict(dim=FLAGS.dim, num_examples=FLAGS.num_examples,
                  classes=[int(k) for k in FLAGS.classes], sigma=FLAGS.sigma,
                  learning_rate=FLAGS.learning_rate,
                  measure_at=[int(s) for s in FLAGS.measure_at], seed=FLAGS.seed,
                  orthogonal_means=FLAGS.orthogonal_means)
    if FLAGS.smoke:
        kwargs.update(SMOKE)
    start = time.perf_counter()
    results = toy_claims.run_paper_configs(**kwargs)
    results["seconds"] = round(time.perf_counter() - start, 1)
    path = os.path.join(FLAGS.out_dir, "toy_model.json")
    _io.write_json(path, results)
    print(toy_claims.format_summary(results))
    logging.info("wrote %s in %.1f s", path, results["seconds"])


if __name__ == "__main__":
    flags.mark_flags_as_required(["out_dir"])
    app.run(main)
