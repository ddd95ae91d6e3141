# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Figure 1 end to end: train, stream the checkpoints through the metric pipeline, plot
#
# Open in Colab: upload this notebook (File → Upload notebook), or, where the repository is
# hosted on GitHub, open https://colab.research.google.com/github/OWNER/REPO/blob/main/colabs/02_figure1.ipynb
# and set HESSIAN_SUBSPACE_SOURCE in the first code cell.
#
# The paper's Fig. 1: f_top (the fraction of the full-data gradient in the top-k Hessian
# subspace) with the training loss and accuracy, for FC 2x100 on MNIST trained by SGD (batch 64,
# lr 0.1). The experiment trains with checkpoints, analyses every checkpoint and plots from the
# result files. `DATASET` picks the data: MNIST through tensorflow-datasets (needs a network),
# MNIST-format IDX files, or the paper's Gaussian mixture (no files at all).

# %%
# Install (Colab). One setting says where the package is hosted, HESSIAN_SUBSPACE_SOURCE:
# the git URL of the repository (cloned), a directory holding a copy of it, or a built wheel
# (`python -m build` in the repository; upload the .whl). Set it in the environment or on the
# next line. Skipped where the package is already importable (a local checkout, CI).
import importlib.util
import os
import subprocess
import sys

SOURCE = os.environ.get("HESSIAN_SUBSPACE_SOURCE", "")  # e.g. "https://.../hessian_subspace.git"
if importlib.util.find_spec("hessian_subspace") is None:
    if not SOURCE:
        raise RuntimeError("hessian_subspace is not installed here: set HESSIAN_SUBSPACE_SOURCE "
                           "to the repository's git URL, a copy of the repository, or a wheel, "
                           "and run this cell again (README, 'Notebooks').")
    if SOURCE.endswith(".whl"):  # the package alone (not launch/configs)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", SOURCE], check=True)
    else:
        repo = SOURCE
        if not os.path.isdir(SOURCE):
            repo = "hs_repo"
            subprocess.run(["git", "clone", "-q", "--depth=1", SOURCE, repo], check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", repo], check=True)
        sys.path.insert(0, os.path.abspath(repo))  # the package and launch/configs

# %%
import os

from hessian_subspace.paper import reproduce
from launch.configs import paper

SMOKE = os.environ.get("HS_SMOKE", "0") == "1"  # CI runs this notebook at smoke size
DATASET = "gaussian_mixture"  # or None (MNIST via tfds), or "idx:/path/to/mnist-idx"
ROOT = "results_colab"

summary = reproduce.run_experiment(paper.get_config("fig1_fc_mnist"), ROOT, dataset=DATASET,
                                   smoke_size=SMOKE, num_analysis=None if SMOKE else 5000,
                                   progress=False)
print({k: summary[k] for k in ("experiment", "dataset", "seconds")})

# %% [markdown]
# ## The figure, from the result files

# %%
from hessian_subspace import analysis, training
from hessian_subspace.paper import figures

run = summary["runs"]["fc_mnist"]
records = analysis.read_results(run["results"])
fig = figures.fig1_ftop(records, training.read_train_log(run["workdir"]), title="FC on " +
                         summary["dataset"])
fig

# %% [markdown]
# f_top over training (the paper: it starts small and rises to near 1 within tens to hundreds
# of steps):

# %%
for r in records[:: max(1, len(records) // 12)]:
    if r["status"] == "ok":
        print(f"step {r['step']:5d}  f_top {r['f_top']:.3f}  loss {r['train_loss']:.3f}  "
              f"lambda_max {r['lambda_max']:.3f}")
