# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Hessian spectra: dense (Fig. 4) and stochastic Lanczos quadrature (Fig. 5)
#
# Open in Colab: upload this notebook (File → Upload notebook), or, where the repository is
# hosted on GitHub, open https://colab.research.google.com/github/OWNER/REPO/blob/main/colabs/04_spectra.ipynb
# and set HESSIAN_SUBSPACE_SOURCE in the first code cell.
#
# A small net trained on a 10-class problem has a Hessian with a bulk of near-zero eigenvalues
# and about k = 10 outliers (paper App. B). For a small model the full spectrum is affordable
# (p HVPs and one `eigh`); for a large one, SLQ estimates the density from a few Lanczos runs.

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

import jax
import jax.numpy as jnp
import numpy as np

import hessian_subspace as hs
from hessian_subspace import training
from hessian_subspace.paper import data, figures, models
from hessian_subspace.training import batches, tasks

SMOKE = os.environ.get("HS_SMOKE", "0") == "1"
n, dim, steps = (600, 16, 150) if SMOKE else (4000, 50, 1500)
ds = data.gaussian_mixture(num_classes=10, dim=dim, num_examples=n, sigma=0.5, seed=0)
dataset = {"x": jnp.asarray(ds["x"]), "y": jnp.asarray(ds["y"])}
model = models.build_model("fc", num_outputs=10, hidden=(16, 16))
params, state = tasks.init_variables(model, jax.random.key(0), dataset["x"][:1])

tx = training.make_optimizer("sgd", 0.1)
step_fn = training.make_train_step(model, tx, "classification", seed=0)
st = training.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      model_state=state)
for t in range(steps):
    idx = batches.batch_indices(n, 64, t, 0)
    st, _ = step_fn(st, {"x": ds["x"][idx], "y": ds["y"][idx]})
loss = hs.curvature.bind_state(tasks.inference_loss(model, "classification"), st.model_state)
H = hs.dataset_hvp(loss, st.params, dataset, batch_size=n)
print("parameters:", H.dim)

# %% [markdown]
# ## The full spectrum (Fig. 4)

# %%
dense = np.linalg.eigvalsh(np.asarray(hs.dense_matrix(H, st.params), np.float64))
print("top 12 eigenvalues:", np.sort(dense)[::-1][:12].round(4))
figures.fig4_dense_spectrum(dense, title="FC 16-16, 10 classes", k=10)

# %% [markdown]
# ## Stochastic Lanczos quadrature (Fig. 5)
# Nodes are Ritz values, weights the squared first components of T's eigenvectors (Ghorbani et
# al. 2019); the density below is their Gaussian-smoothed average over probes.

# %%
nodes, weights = hs.slq_quadrature(H, jax.random.key(0), num_probes=4 if SMOKE else 16,
                                   num_steps=40 if SMOKE else 80)
figures.fig5_slq_density(np.asarray(nodes), np.asarray(weights))

# %% [markdown]
# SLQ against the exact spectrum: the fraction of spectral mass above the bulk.

# %%
edge = np.sort(dense)[::-1][10]
print("exact fraction of eigenvalues above the 11th:", np.mean(dense > edge).round(4))
print("SLQ estimate:", float(np.mean(np.sum(np.where(np.asarray(nodes) > edge,
                                                         np.asarray(weights), 0), axis=1))))
