"""The fingerprints a record carries: a content hash that sees one changed bit and does not
depend on where the arrays live (host or device, one device or eight, another process), and a
loss fingerprint that sees a changed body or constant and nothing else."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hessian_subspace.analysis import fingerprints as fp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    return {"dense": {"w": rng.normal(size=(30, 7)).astype(np.float32),
                      "b": np.zeros(7, np.float32)},
            "count": np.arange(5, dtype=np.int32), "flag": np.array([True, False]),
            "half": rng.normal(size=(3,)).astype(jnp.bfloat16)}


def test_content_sees_every_change_and_nothing_else():
    tree = _tree()
    base = fp.tree_content(tree)
    assert fp.tree_content(jax.tree_util.tree_map(np.copy, tree)) == base
    assert fp.tree_content(jax.tree_util.tree_map(jnp.asarray, tree)) == base  # host or device
    for path, change in (
            ("one ulp", lambda t: t["dense"]["w"].__setitem__(
                (29, 6), np.nextafter(t["dense"]["w"][29, 6], np.float32(np.inf)))),
            ("-0.0", lambda t: t["dense"]["b"].__setitem__(3, -0.0)),
            ("an int", lambda t: t["count"].__setitem__(0, 1)),
            ("a bool", lambda t: t["flag"].__setitem__(1, True)),
            ("bfloat16", lambda t: t["half"].__setitem__(0, t["half"][0] * 2)),
            ("two swapped", lambda t: t["dense"]["w"].__setitem__(
                slice(0, 2), t["dense"]["w"][[1, 0]]))):
        other = jax.tree_util.tree_map(np.copy, tree)
        change(other)
        assert fp.tree_content(other) != base, path
    # Structure, dtype and shape are part of the content.
    assert fp.tree_content({**tree, "count": tree["count"].astype(np.int64)}) != base
    assert fp.tree_content({**tree, "count": tree["count"].reshape(5, 1)}) != base
    renamed = {"dense2": tree["dense"], **{k: v for k, v in tree.items() if k != "dense"}}
    assert fp.tree_content(renamed) != base
    # Two changes that cancel in a plain sum do not cancel here.
    a = np.zeros(8, np.float32).view(np.uint32)
    b = a.copy()
    b[2] += 5
    b[6] -= 5
    assert fp.tree_content({"x": a.view(np.float32)}) != fp.tree_content(
        {"x": b.view(np.float32)})


def test_float64_host_leaves_keep_their_precision_and_the_global_config_is_untouched():
    x64 = jax.config.jax_enable_x64
    a = {"w": np.linspace(0.0, 1.0, 11)}
    b = {"w": a["w"].copy()}
    b["w"][3] = np.nextafter(b["w"][3], 2.0)  # invisible in float32
    assert np.float32(a["w"][3]) == np.float32(b["w"][3])
    assert fp.tree_content(a) != fp.tree_content(b)
    assert jax.config.jax_enable_x64 == x64


_SHARDED = """
import json, sys
import jax, numpy as np
from hessian_subspace.analysis import fingerprints as fp
rng = np.random.default_rng(0)
tree = {"w": rng.normal(size=(64, 24)).astype(np.float32), "b": np.arange(24, dtype=np.int32)}
out = {"host": fp.tree_content(tree)}
if jax.device_count() > 1:
    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    out["sharded"] = fp.tree_content({"w": jax.device_put(tree["w"], spec),
                                      "b": jax.device_put(tree["b"], spec)})
x = jax.ShapeDtypeStruct((4, 3), np.float32)
out["loss"] = fp.function_fingerprint(lambda w: jax.nn.relu(w).sum() * 1e-3, x)
print(json.dumps(out))
"""


def test_the_same_content_on_one_device_or_eight_and_in_another_process():
    outs = []
    for flags in ("--xla_force_host_platform_device_count=8",
                  "--xla_force_host_platform_device_count=1 --xla_cpu_max_isa=SSE4_2"):
        proc = subprocess.run([sys.executable, "-c", _SHARDED], cwd=REPO, capture_output=True,
                              text=True, timeout=300,
                              env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert outs[0]["sharded"] == outs[0]["host"] == outs[1]["host"]
    assert outs[0]["loss"] == outs[1]["loss"]  # no object addresses (relu is a custom_jvp)


def test_the_loss_fingerprint_sees_the_body_and_the_constants():
    w = jax.ShapeDtypeStruct((5, 3), jnp.float32)
    batch = {"x": jax.ShapeDtypeStruct((8, 5), jnp.float32),
             "y": jax.ShapeDtypeStruct((8,), jnp.int32)}

    def make(decay):
        def loss(p, b):
            ce = optax.softmax_cross_entropy_with_integer_labels(b["x"] @ p, b["y"]).mean()
            return ce + decay * jnp.sum(p ** 2)
        return loss

    base = fp.function_fingerprint(make(1e-3), w, batch)
    assert fp.function_fingerprint(make(1e-3), w, batch) == base
    assert fp.function_fingerprint(make(0.3), w, batch) != base
    assert fp.function_fingerprint(make(1e-3), w, {**batch, "x": jax.ShapeDtypeStruct(
        (16, 5), jnp.float32), "y": jax.ShapeDtypeStruct((16,), jnp.int32)}) != base

    def bound(scale, p, b):
        return make(0.0)(p, b) + jnp.sum(scale * p)

    one = fp.function_fingerprint(jax.tree_util.Partial(bound, jnp.ones(3)), w, batch)
    two = fp.function_fingerprint(jax.tree_util.Partial(bound, 2 * jnp.ones(3)), w, batch)
    assert one != two  # a bound array's values are part of the loss
    captured = jnp.arange(3.0)
    three = fp.function_fingerprint(lambda p, b: make(0.0)(p, b) + jnp.sum(captured * p),
                                    w, batch)
    captured = jnp.arange(3.0) + 1
    four = fp.function_fingerprint(lambda p, b: make(0.0)(p, b) + jnp.sum(captured * p),
                                   w, batch)
    assert three != four


def test_arrays_content_ignores_order_of_names_and_sees_values():
    a = {"x": np.arange(3.0), "y": np.ones(2)}
    assert fp.arrays_content(a) == fp.arrays_content({"y": np.ones(2), "x": np.arange(3.0)})
    assert fp.arrays_content(a) != fp.arrays_content({"x": np.arange(3.0), "y": np.zeros(2)})
    with pytest.raises(TypeError):
        fp.tree_content({"x": object()})
