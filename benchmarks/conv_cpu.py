r"""What moves the ConvNet's HVP on XLA:CPU (issue 21, item 3); prints one JSON object.

  python benchmarks/conv_cpu.py                   # half-width Keras ConvNet, 500 images
  python benchmarks/conv_cpu.py --examples=200 --repeats=3      # quicker

1. XLA:CPU options of the installed jaxlib, one fresh process per setting (XLA_FLAGS is read
   at start-up): ``jax.jit(hs.hvp)`` and ``jax.grad`` of the flax model, medians.
2. The same network written out in plain JAX three times, same weights: ``lax.conv`` (what
   flax emits), convolutions as ``lax.conv_general_dilated_patches`` + matmul, and as im2col by
   shifted slices + one matmul; HVP and gradient medians (interleaved), and how far each HVP is
   from the ``lax.conv`` one.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from jax import flatten_util, lax

import _common
import hessian_subspace as hs
from hessian_subspace.paper import data as data_lib
from hessian_subspace.paper import models
from hessian_subspace.training import tasks

FLAGS = flags.FLAGS
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string("fashion_mnist", os.path.join(os.path.dirname(_REPO), "shared", "data",
                                                   "fashion-mnist"), "IDX directory.")
flags.DEFINE_integer("examples", 500, "Fashion-MNIST training images.")
flags.DEFINE_float("width", 0.5, "Width multiplier of the Keras ConvNet.")
flags.DEFINE_integer("repeats", 5, "Timed calls per method (median).")
flags.DEFINE_list("xla_flags", [
    "", "--xla_cpu_use_onednn=true", "--xla_cpu_experimental_onednn_custom_call=true",
    "--xla_cpu_use_xnnpack=true", "--xla_cpu_enable_fast_math=true",
    "--xla_cpu_prefer_vector_width=512", "--xla_cpu_use_thunk_runtime=false"],
    "XLA_FLAGS settings to compare ('' : none).")
flags.DEFINE_bool("child", False, "Internal: measure the flax model once in this process.")
flags.DEFINE_string("json_out", None, "Also write the JSON here.")

_DN = ("NHWC", "HWIO", "NHWC")


def _problem():
    ds = data_lib.load_idx_dataset(FLAGS.fashion_mnist, "train")
    model = models.KerasConvNet(num_outputs=10, width=FLAGS.width)
    data = {"x": jnp.asarray(ds["x"][:FLAGS.examples]), "y": jnp.asarray(ds["y"][:FLAGS.examples])}
    params = models.init_params(model, jax.random.key(0), data["x"][:1])
    return model, data, params


def _median(fn):
    jax.block_until_ready(fn())
    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _child():
    model, data, params = _problem()
    loss_fn = tasks.cross_entropy_loss(model)
    v = hs.random_start_vector(jax.random.key(1), params)
    hvp = jax.jit(lambda p, v: hs.hvp(loss_fn, p, v, data))
    grad = jax.jit(jax.grad(loss_fn))
    print(json.dumps(dict(hvp=_median(lambda: hvp(params, v)),
                          grad=_median(lambda: grad(params, data)))))


def conv_lax(x, w, pad):
    return lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=_DN)


def conv_patches(x, w, pad):
    kh, kw, cin, cout = w.shape
    p = lax.conv_general_dilated_patches(x, (kh, kw), (1, 1), pad, dimension_numbers=_DN)
    return p @ jnp.transpose(w, (2, 0, 1, 3)).reshape(cin * kh * kw, cout)  # (cin, kh, kw)


def conv_slices(x, w, pad):
    """im2col by kh * kw shifted slices (pad, slice, concatenate: data movement only)."""
    kh, kw, cin, cout = w.shape
    if pad == "SAME":
        x = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    h, wd = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    cols = [x[:, i:i + h, j:j + wd, :] for i in range(kh) for j in range(kw)]
    return jnp.concatenate(cols, axis=-1) @ w.reshape(kh * kw * cin, cout)  # (kh, kw, cin)


def _forward(params, x, conv):
    """The Keras ConvNet (flax's `KerasConvNet`, no dropout) with `conv` for its convolutions."""
    h = x if x.ndim == 4 else x[..., None]
    for stage in range(2):
        for j, pad in ((2 * stage, "SAME"), (2 * stage + 1, "VALID")):
            c = params[f"conv_{j}"]
            h = jax.nn.relu(conv(h, c["kernel"], pad) + c["bias"])
        h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    h = h.reshape(h.shape[0], -1)
    h = jax.nn.relu(h @ params["dense_0"]["kernel"] + params["dense_0"]["bias"])
    return h @ params["dense_out"]["kernel"] + params["dense_out"]["bias"]


def _rewrites(model, data, params):
    x, y = data["x"], data["y"]
    # The written-out net is the flax model: same logits.
    flax_logits = model.apply({"params": params}, x)
    ours = _forward(params, x, conv_lax)
    same = float(jnp.max(jnp.abs(flax_logits - ours)))
    v = hs.random_start_vector(jax.random.key(1), params)
    out, products = {"max_logit_difference_to_flax": same}, {}
    for name, conv in (("lax_conv", conv_lax), ("patches_matmul", conv_patches),
                       ("slices_matmul", conv_slices)):
        def loss(p, conv=conv):
            logits = _forward(p, x, conv)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

        hvp = jax.jit(lambda p, v, f=loss: jax.jvp(jax.grad(f), (p,), (v,))[1])
        grad = jax.jit(jax.grad(loss))
        products[name] = flatten_util.ravel_pytree(hvp(params, v))[0]
        out[name] = dict(hvp=_median(lambda h=hvp: h(params, v)),
                         grad=_median(lambda g=grad: g(params)))
    for name in ("patches_matmul", "slices_matmul"):
        out[name]["hvp_relative_difference"] = float(
            jnp.linalg.norm(products[name] - products["lax_conv"])
            / jnp.linalg.norm(products["lax_conv"]))
        out[name]["hvp_over_lax_conv"] = out[name]["hvp"] / out["lax_conv"]["hvp"]
        out[name]["grad_over_lax_conv"] = out[name]["grad"] / out["lax_conv"]["grad"]
    return out


def main(argv):
    del argv
    if FLAGS.child:
        _child()
        return
    settings = {}
    for setting in FLAGS.xla_flags:
        env = dict(os.environ, XLA_FLAGS=setting)
        cmd = [sys.executable, os.path.abspath(__file__), "--child",
               f"--examples={FLAGS.examples}", f"--width={FLAGS.width}",
               f"--repeats={FLAGS.repeats}", f"--fashion_mnist={FLAGS.fashion_mnist}"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        settings[setting or "(none)"] = (json.loads(lines[-1]) if lines
                                         else dict(error=done.stderr[-500:]))
    model, data, params = _problem()
    result = dict(machine=_common.machine(), versions=_common.versions(),
                  problem=dict(model=f"Keras ConvNet width {FLAGS.width}",
                               examples=FLAGS.examples, params=models.param_count(params)),
                  xla_flags=settings, rewrites=_rewrites(model, data, params))
    _common.emit(result, FLAGS.json_out)


if __name__ == "__main__":
    app.run(main)
