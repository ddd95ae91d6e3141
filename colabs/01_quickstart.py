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
# # hessian_subspace quickstart: where gradient descent moves in *your* model
#
# Open in Colab: upload this notebook (File → Upload notebook), or, where the repository is
# hosted on GitHub, open https://colab.research.google.com/github/OWNER/REPO/blob/main/colabs/01_quickstart.ipynb
# and set HESSIAN_SUBSPACE_SOURCE in the first code cell.
#
# Gur-Ari, Roberts & Dyer (2018) found that during training the gradient lies mostly in the span
# of the top-k Hessian eigenvectors (k = number of classes), and that this subspace then changes
# slowly. This notebook asks that of your own model, inside your own training loop, with the
# metric pipeline: a chain of metric transforms (the paper's, and one of yours) that writes one
# record per checkpoint, resumably.

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

# %% [markdown]
# ## Your model, your loss
# The only contract is `loss_fn(params, batch) -> mean loss over the batch`: a plain function,
# flax (`model.apply`), nnx (`nnx.merge`) or Equinox (`eqx.combine`) all reduce to it. The loss
# analysed is exactly this one: the weight-decay term below is part of the Hessian.

# %%
import jax
import jax.numpy as jnp
import optax

import hessian_subspace as hs
from hessian_subspace import analysis
from hessian_subspace.paper import data

SMOKE = os.environ.get("HS_SMOKE", "0") == "1"  # CI runs this notebook at smoke size
num_steps, every = (200, 50) if SMOKE else (800, 100)


def loss_fn(params, batch):
    h = jax.nn.relu(batch["x"] @ params["w1"] + params["b1"])
    h = jax.nn.relu(h @ params["w2"] + params["b2"])
    logits = h @ params["w3"] + params["b3"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return ce + 1e-4 * sum(jnp.sum(params[w] ** 2) for w in ("w1", "w2", "w3"))


# §3's Gaussian mixture: 10 classes, unit class means in 100 dimensions, noise 0.35.
ds = data.gaussian_mixture(num_classes=10, dim=100, num_examples=4000, sigma=0.35, seed=0)
train = {"x": jnp.asarray(ds["x"]), "y": jnp.asarray(ds["y"])}
keys = jax.random.split(jax.random.key(0), 3)
sizes = [(100, 100), (100, 100), (100, 10)]  # FC 100-100-100-10, LeCun-normal weights
params = {}
for i, (key, (m, n)) in enumerate(zip(keys, sizes, strict=True), start=1):
    params[f"w{i}"] = jax.random.normal(key, (m, n)) / jnp.sqrt(m)
    params[f"b{i}"] = jnp.zeros(n)

# %% [markdown]
# ## The pipeline: the paper's metrics and one of yours
# Transforms run in the order given; `chain` checks before any work that each one's inputs are
# there. A metric of your own is a plain function of the context: here, the fraction of the
# gradient in the top-**5** subspace.

# %%
def f_top5(ctx):
    return {"f_top5": hs.gradient_fraction(ctx["gradient"], ctx["eigenpairs"].eigenvectors[:5])}


pipe = analysis.chain(
    analysis.loss(), analysis.gradient(), analysis.eigenpairs(k=20), analysis.f_top(k=10),
    analysis.overlap_g_hg(), analysis.subspace_overlap(k=10, reference_steps=(every,)),
    analysis.transform("f_top5", f_top5, requires=("gradient", "eigenpairs")))
analyzer = analysis.Analyzer(pipe, loss_fn, data=train, batch_size=1000,
                             results=analysis.Results(
                                 "results_quickstart",
                                 writers=[analysis.CSVWriter("results_quickstart/scalars.csv")]),
                             schedule=analysis.Schedule(every_steps=every))

# %% [markdown]
# ## Your training loop, one extra line
# `analyzer(step, params)` analyses the scheduled steps (every `every` steps here) and does
# nothing at the others. Run the notebook again from the top and the finished steps are
# reused from the result files (their fingerprints match the parameters); run only this cell
# again and it trains on from where it stopped: the analyzer refuses those other parameters at
# step 0 (`StaleResultsError`) instead of mixing two runs in one directory.

# %%
tx = optax.sgd(0.1)
opt_state = tx.init(params)


@jax.jit
def train_step(params, opt_state, batch):
    updates, opt_state = tx.update(jax.grad(loss_fn)(params, batch), opt_state)
    return optax.apply_updates(params, updates), opt_state


for step in range(num_steps + 1):
    analyzer(step, params)
    i = (step * 64) % 3936
    params, opt_state = train_step(params, opt_state, {k: v[i:i + 64] for k, v in train.items()})

# %% [markdown]
# ## The records
# One JSON record per analysed step (also in `results_quickstart/results.jsonl`), with the
# Ritz-residual error bar on f_top and the subspace overlap with step `every` (eq. 5).

# %%
for r in analysis.read_results("results_quickstart"):
    overlap = r["subspace_overlap"].get(str(every), {}).get("top10")
    print(f"step {r['step']:4d}  loss {r['train_loss']:.3f}  f_top {r['f_top']:.3f} "
          f"(± {r['f_top_bound']:.0e})  f_top5 {r['f_top5']:.3f}  "
          f"overlap(g, Hg) {r['overlap_g_hg']:.3f}  "
          f"top-10 overlap with step {every}: {'-' if overlap is None else f'{overlap:.3f}'}")

# %% [markdown]
# ## Per-layer eigenvectors
# The eigenpairs transform's state after a step, which the store keeps, is that step's
# basis: the top eigenvectors as rows in `ravel_pytree` order; `as_pytrees` turns them back
# into parameter-shaped pytrees, one leading-axis entry per eigenvector.

# %%
last = analysis.read_results("results_quickstart")[-1]["step"]
basis = analyzer.store.state(last)["eigenpairs/eigenvectors"]
trees = hs.as_pytrees(basis, params)
print({name: leaf.shape for name, leaf in trees.items()})
print("top eigenvector's mass by layer:",
      {k: round(float(v), 3) for k, v in hs.mass_by_leaf(basis[0], params).items()})
