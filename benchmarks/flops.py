r"""FLOPs per example of the gradient and the HVP of benchmarks/gpu.py's two models, from XLA's
cost analysis of one batch's compiled program (on whatever backend runs it; CPU is enough);
prints one JSON object. With the GPU timings they give the achieved rate (BUILD_NOTES, issue
21, GPU rows).

  python benchmarks/flops.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

import _common
import hessian_subspace as hs
from hessian_subspace.paper import models, synthetic
from hessian_subspace.training import tasks

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 8, "Examples in the analysed batch.")
flags.DEFINE_string("json_out", None, "Also write the JSON here.")


def _flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) / FLAGS.batch / 1e9


def _per_example(loss_fn, params, batch):
    grad = _flops(lambda p, b: jax.grad(loss_fn)(p, b), params, batch)
    hvp = _flops(lambda p, v, b: hs.hvp(loss_fn, p, v, b), params, params, batch)
    return dict(gradient_gflop=round(grad, 4), hvp_gflop=round(hvp, 4),
                hvp_over_gradient=round(hvp / grad, 3))


def main(argv):
    del argv
    n = FLAGS.batch
    x = jnp.zeros((n, 32, 32, 3))
    y = jnp.zeros((n,), jnp.int32)
    model = models.build_model("resnet18", num_outputs=10, width=64)
    params, state = tasks.init_variables(model, jax.random.key(0), x[:2])
    loss = hs.curvature.bind_state(tasks.inference_loss(model, "classification"), state)
    resnet = _per_example(loss, params, {"x": x, "y": y})
    text = synthetic.text_sequences(context=64)
    batch = {"x": jnp.asarray(text["x"][:n]), "y": jnp.asarray(text["y"][:n])}
    gpt_model = models.GPT(context=64, width=768, depth=12, heads=12)
    gpt_params = models.init_params(gpt_model, jax.random.key(0), batch["x"][:1])
    gpt = _per_example(tasks.cross_entropy_loss(gpt_model), gpt_params, batch)
    _common.emit(dict(benchmark="flops", machine=_common.machine(),
                      versions=_common.versions(), batch=n,
                      resnet18_per_image=resnet, gpt2_small_shape_per_window=gpt),
                 FLAGS.json_out)


if __name__ == "__main__":
    app.run(main)
