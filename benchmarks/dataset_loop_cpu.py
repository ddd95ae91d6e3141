r"""The data-set batch loop of a ConvNet on CPU, as a loop and written out; prints one JSON.

  python benchmarks/dataset_loop_cpu.py                      # Keras ConvNet, 2 x 1,000 images
  python benchmarks/dataset_loop_cpu.py --examples=400 --batch_size=200 --repeats=2

XLA:CPU runs convolutions inside a loop body (``fori_loop``) many times slower than in
straight-line code, so ``dataset_mean`` writes the batch loop out by default when the program
holds a convolution on CPU (``hessian_subspace/_xla.py``). Measured here, in one run on the
same parameters and data (Fashion-MNIST-shaped random images, the Table 1 ConvNet): the mean
loss and gradient, and one Hessian-vector product, with ``unroll=False`` (the loop) and with
the default; the ratios loop ÷ default are the speed-up.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from absl import app, flags

import _common
import hessian_subspace as hs
from hessian_subspace import curvature
from hessian_subspace.paper import models
from hessian_subspace.training import tasks

FLAGS = flags.FLAGS
flags.DEFINE_integer("examples", 2000, "Images (28 x 28 x 1) in the data set.")
flags.DEFINE_integer("batch_size", 1000, "Batch size of the data-set loop.")
flags.DEFINE_string("model", "convnet", "A model of hessian_subspace.paper.models.")
flags.DEFINE_integer("repeats", 3, "Timing repeats (median reported).")
flags.DEFINE_string("json_out", None, "Also write the JSON here.")


def main(_):
    rng = np.random.default_rng(0)
    n = FLAGS.examples
    data = {"x": rng.random((n, 28, 28, 1), np.float32),
            "y": rng.integers(0, 10, n).astype(np.int32)}
    model = models.build_model(FLAGS.model, num_outputs=10)
    params = models.init_params(model, jax.random.key(0), data["x"][:1])
    loss = tasks.cross_entropy_loss(model)
    b = FLAGS.batch_size

    def value_and_grad(unroll):
        return jax.jit(lambda p: curvature.dataset_mean(
            lambda batch: jax.value_and_grad(loss)(p, batch), data, batch_size=b,
            unroll=unroll))

    auto = hs.dataset_hvp(loss, params, data, batch_size=b, cache=False)
    looped = dataclasses.replace(auto, unroll=False)
    v = hs.random_start_vector(jax.random.key(1), params)
    result = dict(benchmark="dataset_loop_cpu", machine=_common.machine(),
                  versions=_common.versions(), model=FLAGS.model,
                  num_params=auto.dim,
                  examples=n, batch_size=b, batches=auto.data_batches, repeats=FLAGS.repeats)
    for name, fn in (("grad_loop_s", value_and_grad(False)), ("grad_default_s",
                                                               value_and_grad(None))):
        result[name] = _common.median_time(lambda fn=fn: fn(params), FLAGS.repeats)
    for name, op in (("hvp_loop_s", looped), ("hvp_default_s", auto)):
        result[name] = _common.median_time(lambda op=op: op(v), FLAGS.repeats)
    result["grad_loop_over_default"] = result["grad_loop_s"] / result["grad_default_s"]
    result["hvp_loop_over_default"] = result["hvp_loop_s"] / result["hvp_default_s"]
    result["hvp_over_grad_default"] = result["hvp_default_s"] / result["grad_default_s"]
    _common.emit(result, FLAGS.json_out)


if __name__ == "__main__":
    app.run(main)
