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
# # hessian_subspace quickstart: the top Hessian subspace of your own flax model
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/hessian-subspace/hessian_subspace/blob/main/colabs/01_quickstart.ipynb)
#
# Gur-Ari, Roberts & Dyer (2018) found that during training the gradient lies mostly in the span
# of the top-k Hessian eigenvectors (k = number of classes). This notebook measures that
# fraction, f_top = ‖P_top g‖² / ‖g‖², for a small flax model in about ten lines.

# %%
# Install from the repository (on Colab); skipped where the package is already installed (CI).
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("hessian_subspace") is None:
    subprocess.run(["git", "clone", "-q", "--depth=1",
                    "https://github.com/hessian-subspace/hessian_subspace.git", "hs_repo"],
                   check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "hs_repo"], check=True)
    sys.path.insert(0, os.path.abspath("hs_repo"))  # the package and launch/configs

# %% [markdown]
# ## Your model and your loss
# Any `loss(params, batch) -> scalar` that returns the **mean** loss over the batch works.

# %%
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import hessian_subspace as hs
from hessian_subspace import data


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(100)(x))
        x = nn.relu(nn.Dense(100)(x))
        return nn.Dense(10)(x)


def loss_fn(params, batch):
    logits = Net().apply({"params": params}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


# §3's Gaussian mixture: 10 classes, unit class means in 100 dimensions, noise 0.35.
ds = data.gaussian_mixture(num_classes=10, dim=100, num_examples=4000, sigma=0.35, seed=0)
train = {"x": jnp.asarray(ds["x"]), "y": jnp.asarray(ds["y"])}
params = Net().init(jax.random.key(0), train["x"][:1])["params"]

# %% [markdown]
# ## f_top during training, in ten lines
# `dataset_hvp` is the Hessian of the mean loss over the whole training set (the paper measures
# g and H on all of it); `top_eigenpairs` runs Lanczos under `jax.jit`.

# %%
tx = optax.sgd(0.1)
opt_state = tx.init(params)
sgd = jax.jit(lambda p, o, b: (lambda u, o: (optax.apply_updates(p, u), o))(
    *tx.update(jax.grad(loss_fn)(p, b), o)))
for t in range(801):
    if t in (0, 100, 200, 400, 800):
        H = hs.dataset_hvp(loss_fn, params, train, batch_size=1000)    # v -> H v
        top = hs.top_eigenpairs(H, hs.random_start_vector(jax.random.key(t), params), k=10)
        loss, g = hs.dataset_value_and_grad(loss_fn, params, train, batch_size=1000)
        print(f"step {t:3d}  loss {loss:.3f}  f_top {hs.gradient_fraction(g, top.eigenvectors):.3f}"
              f"  overlap(g, Hg) {hs.hessian_gradient_overlap(g, H(g)):.3f}")
    i = (t * 64) % 3936
    batch = {name: x[i:i + 64] for name, x in train.items()}
    params, opt_state = sgd(params, opt_state, batch)

# %% [markdown]
# ## Per-eigenvector overlaps and per-layer eigenvectors
# `eigenvector_overlaps` gives c_i² = (v_i·g)²/‖g‖²; `as_pytrees` turns the flat eigenvectors
# back into parameter-shaped pytrees, one leading axis entry per eigenvector.

# %%
print("c_i^2:", hs.eigenvector_overlaps(g, top.eigenvectors).round(4))
trees = hs.as_pytrees(top.eigenvectors, params)
print({layer: {name: leaf.shape for name, leaf in leaves.items()}
       for layer, leaves in trees.items()})
