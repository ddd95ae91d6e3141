r"""Reproduce an experiment of the paper: train, analyse, plot, summarise. One command each.

  python -m launch.reproduce --experiment=fig1_fc_mnist                 # MNIST via tfds
  python -m launch.reproduce --experiment=table1 --dataset=idx:../shared/data/fashion-mnist
  python -m launch.reproduce --experiment=fig2_subspace_overlap --dataset=gaussian_mixture
  python -m launch.reproduce --experiment=all --smoke --dataset=gaussian_mixture
  python -m launch.reproduce --experiment=table1 --seeds=0,1,2 \
      --dataset=idx:../shared/data/fashion-mnist              # mean ± std over seeds

Experiments: see launch/configs/paper.py. Results: ROOT/EXPERIMENT/{*.png,*.pdf,summary.json,
summary.md}; runs (checkpoints, analyses) under ROOT/runs/, shared between experiments and
resumed when a command is started again.
"""

import os

from absl import app, flags, logging

from hessian_subspace import _io
from hessian_subspace.paper import reproduce, summaries
from launch import _runtime
from launch.configs import paper

FLAGS = flags.FLAGS
flags.DEFINE_list("experiment", None,
                  f"Experiments, 'all', or 'list' (print them): {sorted(paper.EXPERIMENTS)}.")
flags.DEFINE_string("dataset", None, "Data set override: idx:DIR, gaussian_mixture, or a tfds "
                    "name.")
flags.DEFINE_bool("smoke", False, "Tiny sizes: every experiment in well under a minute on CPU.")
flags.DEFINE_integer("num_analysis", None, "Measure g and H on a fixed subset of this size.")
flags.DEFINE_string("root", "results", "Output root directory.")
flags.DEFINE_list("runs", None, "Only these runs of the experiment (e.g. the table1 rows).")
flags.DEFINE_list("seeds", None, "Run every run once per seed (e.g. 0,1,2): figures draw the "
                  "mean with a ±std band, numbers report mean, std and min-max over seeds.")
flags.DEFINE_bool("progress", True, "Progress bars.")


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    if FLAGS.experiment == ["list"]:
        for name in sorted(paper.EXPERIMENTS):
            print(f"{name:28s} {paper.get_config(name).description}")
        return
    names = sorted(paper.EXPERIMENTS) if FLAGS.experiment == ["all"] else FLAGS.experiment
    unknown = [n for n in names if n not in paper.EXPERIMENTS]
    if unknown:
        raise ValueError(f"--experiment: unknown {unknown}; choose from "
                         f"{sorted(paper.EXPERIMENTS)}, 'all' or 'list'")
    seeds = reproduce.check_seeds(FLAGS.seeds)
    if FLAGS.coordinator_address is not None:
        raise ValueError("--coordinator_address: experiments train, which is single-host; train "
                         "with launch.train and analyse on several hosts with launch.analyze")
    mesh = _runtime.initialize() if FLAGS.mesh else None
    for name in names:
        summary = reproduce.run_experiment(
            paper.get_config(name), FLAGS.root, dataset=FLAGS.dataset, smoke_size=FLAGS.smoke,
            num_analysis=FLAGS.num_analysis, only_runs=FLAGS.runs, progress=FLAGS.progress,
            mesh=mesh, seeds=seeds)
        text = summaries.summary_markdown(summary)
        _io.write_text(os.path.join(FLAGS.root, name, "summary.md"), text)
        print(text)


if __name__ == "__main__":
    flags.mark_flags_as_required(["experiment"])
    app.run(main)
