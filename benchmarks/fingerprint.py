r"""What the fingerprints of a record cost beside one HVP, and the store's per-checkpoint write
time over many checkpoints; prints one JSON object.

  python benchmarks/fingerprint.py                  # FC on Fashion-MNIST, ResNet-18, 200 records
  python benchmarks/fingerprint.py --resnet_images=0 --records=0   # the FC net only

Measured in one run, each a median of --repeats calls after a warm-up:

- the checkpoint fingerprint (``fingerprints.tree_content`` of the parameters, on the device)
  against one HVP over the analysis set, for the FC 784-100-100-10 net (89,610 parameters) on
  --num_analysis Fashion-MNIST images, and for ResNet-18 (11.2 M parameters) on
  --resnet_images CIFAR-shaped images: the ratio fingerprint ÷ HVP;
- the loss fingerprint (a trace of the loss: once per analysis), same two models;
- SHA-256 of the same parameters on the host (the training checkpoints' checksum), for scale;
- the result store: milliseconds per ``write_step`` of a record with a small basis file, for
  the first, middle and last ten of --records checkpoints (results.jsonl is appended, so the
  time per checkpoint should not grow with the number of records; it used to be rewritten).
"""

from __future__ import annotations

import hashlib
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import _common
import hessian_subspace as hs
from hessian_subspace.analysis import fingerprints as fp
from hessian_subspace.analysis import store as store_lib
from hessian_subspace.paper import data as data_lib
from hessian_subspace.paper import models
from hessian_subspace.training import tasks

FLAGS = flags.FLAGS
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string("fashion_mnist", os.path.join(os.path.dirname(_REPO), "shared", "data",
                                                   "fashion-mnist"), "IDX directory.")
flags.DEFINE_integer("num_analysis", 10000, "Fashion-MNIST images of the FC net's HVP.")
flags.DEFINE_integer("resnet_images", 32, "CIFAR-shaped images of ResNet-18's HVP (0: skip).")
flags.DEFINE_integer("records", 400, "Records written to time the store (0: skip).")
flags.DEFINE_integer("store_basis_params", 2000, "Parameters of each stored basis (20 rows).")
flags.DEFINE_integer("repeats", 5, "Timed calls per median.")
flags.DEFINE_string("json_out", None, "Also write the JSON here.")


def _host_sha256(params) -> float:
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]

    def run():
        h = hashlib.sha256()
        for x in leaves:
            h.update(x.tobytes())
        return h.hexdigest()

    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _model_costs(name: str, model, data: dict) -> dict:
    params, state = tasks.init_variables(model, jax.random.key(0), data["x"][:1])
    loss = hs.curvature.bind_state(tasks.inference_loss(model, "classification"), state)
    batch = min(len(data["y"]), 1000)
    op = hs.dataset_hvp(loss, params, data, batch_size=batch, cache=False)
    v = hs.random_start_vector(jax.random.key(1), params)
    hvp = _common.median_time(lambda: op(v), FLAGS.repeats)
    content = _common.median_time(lambda: fp.tree_content({"params": params, "state": state}),
                                  FLAGS.repeats)
    like = fp.shapes_of(params)
    start = time.perf_counter()
    fp.loss_fingerprint(tasks.inference_loss(model, "classification"), like,
                        jax.tree_util.tree_map(lambda x: x[:batch], data), fp.shapes_of(state))
    loss_seconds = time.perf_counter() - start
    return dict(model=name, num_params=int(models.param_count(params)),
                num_examples=int(len(data["y"])), hvp_seconds=round(hvp, 4),
                checkpoint_fingerprint_seconds=round(content, 4),
                fingerprint_over_hvp=round(content / hvp, 4),
                host_sha256_seconds=round(_host_sha256(params), 4),
                loss_fingerprint_seconds_once=round(loss_seconds, 3))


def _store_costs(num: int) -> dict:
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(20, FLAGS.store_basis_params)).astype(np.float32)
    times = []
    with tempfile.TemporaryDirectory() as directory:
        store = store_lib.ResultStore(directory)
        for step in range(num):
            record = dict(status="ok", f_top=float(rng.random()),
                          eigenvalues=list(rng.random(20)), c2=list(rng.random(20)),
                          subspace_overlap={str(t): {f"top{d}": 0.5 for d in range(1, 21)}
                                            for t in range(6)},
                          fingerprints=dict(checkpoint="0" * 64, loss="1" * 64,
                                            data="2" * 64, settings="3" * 64))
            start = time.perf_counter()
            store.write_step(step, record, {"bases": {"eigenvectors": basis}})
            times.append(time.perf_counter() - start)
    def ms(part):
        return round(1e3 * statistics.median(part), 2)

    return dict(records=num, basis_bytes=int(basis.nbytes), first_10_median_ms=ms(times[:10]),
                middle_10_median_ms=ms(times[num // 2:num // 2 + 10]),
                last_10_median_ms=ms(times[-10:]))


def main(argv):
    del argv
    out = dict(machine=_common.machine(), versions=_common.versions(), models=[])
    train = data_lib.load_dataset(f"idx:{FLAGS.fashion_mnist}", "train")
    subset = data_lib.analysis_set(train, num_examples=FLAGS.num_analysis, seed=0)
    fc = models.build_model("fc", num_outputs=10, hidden=(100, 100), activation="relu")
    out["models"].append(_model_costs("fc_784_100_100_10", fc, {
        "x": jnp.asarray(subset["x"]), "y": jnp.asarray(subset["y"])}))
    if FLAGS.resnet_images:
        rng = np.random.default_rng(0)
        images = {"x": jnp.asarray(rng.random((FLAGS.resnet_images, 32, 32, 3), np.float32)),
                  "y": jnp.asarray(rng.integers(0, 10, FLAGS.resnet_images))}
        out["models"].append(_model_costs("resnet18", models.build_model(
            "resnet18", num_outputs=10), images))
    if FLAGS.records:
        out["store"] = _store_costs(FLAGS.records)
    _common.emit(out, FLAGS.json_out)


if __name__ == "__main__":
    app.run(main)
