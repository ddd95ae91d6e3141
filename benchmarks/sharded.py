r"""The analysis on a device mesh against one device, and what a transformer's analysis costs;
prints one JSON object.

  python benchmarks/sharded.py                       # 1 device vs 8 simulated CPU devices
  python benchmarks/sharded.py --specs=data:8 --gpt_sizes=64x2

Each mesh runs in its own process (``--xla_force_host_platform_device_count``), on the same
data and parameters:
- FC 784-100-100-10 on Fashion-MNIST: the top-k eigenvalues (float32) and their largest relative
  difference from one device's; gradient and HVP time over the data set and their ratio; the
  Lanczos loop's time per HVP (the basis's memory per device: tests/test_sharded.py);
- GPT-style decoders (``--gpt_sizes`` width x depth) on byte-level text: parameters, gradient and
  HVP time over ``--gpt_examples`` sequences and their ratio, and the time of a top-``--gpt_k``
  solve (at most ``--gpt_steps`` HVPs) per HVP, so a user can extrapolate the cost to their
  model (time ~ HVPs x HVP time, HVP time ~ examples x parameters).

Simulated devices share this machine's cores, so times across meshes measure overhead, not
speed-up; the eigenvalue agreement and the memory split are the portable numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_string("fashion_mnist", os.path.join(os.path.dirname(_REPO), "shared", "data",
                                                   "fashion-mnist"), "IDX directory.")
flags.DEFINE_list("specs", ["data:8", "data:4,model:2"], "Meshes on 8 devices, each against 1.")
flags.DEFINE_integer("devices", 8, "Simulated devices for the meshes.")
flags.DEFINE_integer("examples", 10000, "Fashion-MNIST examples in the Hessian.")
flags.DEFINE_integer("batch_size", 2000, "Global batch size inside the data-set HVP.")
flags.DEFINE_integer("k", 10, "Top eigenpairs.")
flags.DEFINE_float("tol", 1e-4, "Relative residual target of the solves.")
flags.DEFINE_integer("repeats", 3, "Timing repeats (median reported).")
flags.DEFINE_list("gpt_sizes", ["64x2", "128x2", "128x4"], "GPT width x depth to time.")
flags.DEFINE_integer("gpt_examples", 256, "Sequences of 64 bytes in the GPT's Hessian.")
flags.DEFINE_integer("gpt_k", 10, "Top eigenpairs of the GPT's Hessian.")
flags.DEFINE_integer("gpt_steps", 30, "Lanczos steps timed for the GPT.")
flags.DEFINE_string("child", None, "Internal: run one mesh in this process ('' = no mesh).")
flags.DEFINE_string("json_out", None, "Also write the JSON here.")


def _costs(loss_fn, params, batches, k, steps, repeats, sharding, tol):
    """Gradient, HVP and Lanczos times of one problem, and its top-k eigenvalues."""
    import jax
    import numpy as np

    import _common
    import hessian_subspace as hs

    op = hs.dataset_hvp(loss_fn, params, batches)
    v = hs.random_start_vector(jax.random.key(1), params)
    # Data and operator enter as arguments (pytrees), never as constants of the program.
    grad = jax.jit(lambda p, b: hs.dataset_value_and_grad(loss_fn, p, b))
    t_grad = _common.median_time(lambda: grad(params, batches), repeats)
    t_hvp = _common.median_time(lambda: op(v), repeats)
    solve = jax.jit(lambda op, v: hs.top_eigenpairs(op, v, k, num_steps=steps, tol=tol,
                                                    sharding=sharding))
    t_solve = _common.median_time(lambda: solve(op, v), max(1, repeats // 2))
    res = solve(op, v)
    hvps = int(res.num_matvecs)
    return op, v, dict(num_params=op.dim, grad_s=t_grad, hvp_s=t_hvp, hvp_over_grad=t_hvp / t_grad,
                       top_k=k, max_steps=steps, hvps=hvps, converged=int(np.sum(res.converged)),
                       solve_s=t_solve, solve_over_hvps_x_hvp=t_solve / (hvps * t_hvp),
                       eigenvalues=np.asarray(res.eigenvalues, np.float64).tolist())


def _child(spec):
    import jax
    import jax.numpy as jnp

    import _common
    import hessian_subspace as hs
    from hessian_subspace import sharding as sh
    from hessian_subspace.paper import data as data_lib
    from hessian_subspace.paper import models, synthetic
    from hessian_subspace.training import tasks

    mesh = sh.parse_mesh(spec) if spec else None

    def place(params):
        return params if mesh is None else jax.device_put(params, sh.fsdp_shardings(params, mesh))

    vec = sh.vector_sharding(mesh)
    out = dict(spec=spec or "1 device", devices=jax.device_count(), machine=_common.machine(),
               versions=_common.versions())

    ds = data_lib.load_idx_dataset(FLAGS.fashion_mnist, "train")
    n = FLAGS.examples
    data = {"x": ds["x"][:n], "y": ds["y"][:n]}
    model = models.MLP(hidden=(100, 100), num_outputs=10)
    loss_fn = tasks.cross_entropy_loss(model)
    params = place(models.init_params(model, jax.random.key(0), jnp.asarray(data["x"][:1])))
    batches = hs.batch_data(data, batch_size=FLAGS.batch_size, mesh=mesh)
    op, v, fc = _costs(loss_fn, params, batches, FLAGS.k, 150, FLAGS.repeats, vec, FLAGS.tol)

    # The basis's memory per device is measured by tests/test_sharded.py (compiled memory
    # analysis of a solve whose basis dominates its buffers; here the data set would).
    fc.update(layout=batches.describe())
    out["fc_fashion_mnist"] = fc

    text = synthetic.text_sequences(context=64)
    tdata = {"x": text["x"][:FLAGS.gpt_examples], "y": text["y"][:FLAGS.gpt_examples]}
    gpt = []
    for size in FLAGS.gpt_sizes:
        width, depth = (int(s) for s in size.split("x"))
        model = models.GPT(context=64, width=width, depth=depth, heads=4)
        loss_fn = tasks.cross_entropy_loss(model)
        params = place(models.init_params(model, jax.random.key(0),
                                          jnp.asarray(tdata["x"][:1])))
        batches = hs.batch_data(tdata, batch_size=min(128, FLAGS.gpt_examples), mesh=mesh)
        _, _, row = _costs(loss_fn, params, batches, FLAGS.gpt_k, FLAGS.gpt_steps,
                           max(1, FLAGS.repeats - 1), vec, FLAGS.tol)
        gpt.append(dict(width=width, depth=depth, **row))
    out["gpt_text"] = gpt
    print(json.dumps(out))


def _run_child(spec, devices):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    args = [sys.executable, os.path.abspath(__file__), f"--child={spec}",
            *(a for a in sys.argv[1:] if not a.startswith("--json_out"))]
    proc = subprocess.run(args, env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    if proc.returncode:
        raise RuntimeError(f"mesh {spec or '1 device'} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    if FLAGS.child is not None:
        return _child(FLAGS.child)
    import numpy as np

    import _common

    one = _run_child("", 1)
    runs = [one]
    for spec in FLAGS.specs:
        run = _run_child(spec, FLAGS.devices)
        for name in ("fc_fashion_mnist",):
            a = np.asarray(one[name]["eigenvalues"])
            b = np.asarray(run[name]["eigenvalues"])
            run[name]["max_eigenvalue_rel_diff_vs_1_device"] = float(np.max(np.abs(a - b) / a))
        for a, b in zip(one["gpt_text"], run["gpt_text"], strict=True):
            x, y = np.asarray(a["eigenvalues"]), np.asarray(b["eigenvalues"])
            b["max_eigenvalue_rel_diff_vs_1_device"] = float(np.max(np.abs(x - y) / np.abs(x)))
        runs.append(run)
    _common.emit(dict(benchmark="sharded", precision="float32, default matmul precision",
                      runs=runs), FLAGS.json_out)


if __name__ == "__main__":
    app.run(main)
