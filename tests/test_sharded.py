"""The analysis on a device mesh (8 simulated CPU devices, meshes 8x1 and 4x2) against one device:
the same records to round-off, no data moved inside the HVP loop, the Krylov basis split over
the devices (compiled memory), and the data layout's exact means."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import hessian_subspace as hs
from hessian_subspace import layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh process with N devices: the analysis of a small MLP on one mesh spec, the HLO
# of its HVP, and the compiled memory of a top-k solve with and without a split basis.
_SCRIPT = textwrap.dedent(
    """
    import json, re, sys, functools
    import jax, jax.numpy as jnp, numpy as np
    import hessian_subspace as hs
    from hessian_subspace import analysis, sharding
    from hessian_subspace.paper import models
    from hessian_subspace.training import tasks

    spec, batch_size = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(0)
    n = 1003  # not a multiple of the device count: a ragged rest and a replicated tail
    data = {"x": rng.normal(size=(n, 8)).astype(np.float32),
            "y": rng.integers(0, 4, n).astype(np.int32)}
    model = models.MLP(hidden=(32,), num_outputs=4)
    params = models.init_params(model, jax.random.key(0), data["x"][:1])
    mesh = sharding.parse_mesh(spec) if spec else None
    fsdp = None if mesh is None else functools.partial(sharding.fsdp_shardings, mesh=mesh)
    pipe = analysis.chain(analysis.loss(), analysis.gradient(),
                          analysis.eigenpairs(k=6, tol=1e-5), analysis.f_top(k=3),
                          analysis.overlap_g_hg(), analysis.c2(), analysis.layers())
    analyzer = analysis.Analyzer(pipe, tasks.cross_entropy_loss(model), data=data,
                                 batch_size=batch_size,
                                 placement=analysis.Placement(mesh=mesh, param_sharding=fsdp),
                                 results=analysis.Results(progress=False))
    records = [analyzer.process(t, jax.tree_util.tree_map(lambda x, t=t: x * (1 + 0.2 * t),
                                                         params)) for t in range(2)]

    # The HVP's compiled program: collectives inside while-loop bodies (the batch loop).
    op = hs.dataset_hvp(tasks.cross_entropy_loss(model), analyzer._place(params),
                        analyzer.batches)
    v = hs.random_start_vector(jax.random.key(1), op.like)
    hlo = hs.curvature.apply_operator.lower(op, v).compile().as_text()
    bodies = set(re.findall(r"body=(%[\\w.\\-]+)", hlo))
    blocks = {m.group(1): m.group(0) for m in re.finditer(
        r"^(%[\\w.\\-]+) \\(.*?^}", hlo, flags=re.S | re.M)}
    in_loop = "".join(blocks.get(b, "") for b in bodies)
    names = ("all-reduce", "collective-permute", "all-to-all", "all-gather", "reduce-scatter")
    loop = {c: len(re.findall(c + r"(-start)?\\(", in_loop)) for c in names}

    # The basis's share of a top-4 solve's compiled memory per device: the growth of the
    # temporaries from a 40- to a 120-vector basis (a 26,628-parameter MLP on small batches, so
    # that the basis is the largest buffer), split over the devices and on one device.
    big = models.MLP(hidden=(2048,), num_outputs=4)
    bparams = models.init_params(big, jax.random.key(0), data["x"][:1])
    bv = hs.random_start_vector(jax.random.key(2), bparams)
    def memory(batches, steps):  # the operator's vector_sharding comes from the batches' mesh
        bop = hs.dataset_hvp(tasks.cross_entropy_loss(big), bparams, batches)
        solve = jax.jit(lambda v: hs.top_eigenpairs(bop, v, 4, num_steps=steps))
        return int(solve.lower(bv).compile().memory_analysis().temp_size_in_bytes), bop.dim
    one_device = hs.batch_data(data, batch_size=32)
    split = hs.batch_data(data, batch_size=32, mesh=mesh)
    basis = {name: memory(b, 120)[0] - memory(b, 40)[0]
             for name, b in (("split", split), ("whole", one_device))}
    print(json.dumps(dict(
        devices=jax.device_count(), records=records, layout=analyzer.batches.describe(),
        loop=loop, basis_split=basis["split"], basis_whole=basis["whole"],
        p=int(memory(one_device, 40)[1]))))
    """
)


def _run(spec, devices, batch_size=96):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, spec, str(batch_size)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs():
    return {spec: _run(spec, devices) for spec, devices in
            (("", 1), ("data:8", 8), ("data:4,model:2", 8))}


def _numbers(record):
    return {k: record[k] for k in ("train_loss", "grad_norm", "eigenvalues", "f_top", "f_next",
                                   "overlap_g_hg", "c2", "lambda_max")}


@pytest.mark.slow  # three 8-device subprocess runs: ~75 s (CI runs -m slow)
@pytest.mark.parametrize("spec", ["data:8", "data:4,model:2"])
def test_sharded_records_equal_the_single_device_ones(runs, spec):
    one, many = runs[""], runs[spec]
    assert many["devices"] == 8 and one["devices"] == 1
    assert many["layout"]["data_parallel"] == (8 if spec == "data:8" else 4)
    for a, b in zip(one["records"], many["records"], strict=True):
        assert b["status"] == "ok" and b["all_converged"]
        assert b["hessian"]["mesh"] == {a: int(s) for a, s in
                                         (x.split(":") for x in spec.split(","))}
        for key, value in _numbers(a).items():
            np.testing.assert_allclose(b[key], value, rtol=2e-5, atol=2e-6, err_msg=key)


@pytest.mark.slow  # three 8-device subprocess runs: ~75 s (CI runs -m slow)
@pytest.mark.parametrize("spec", ["data:8", "data:4,model:2"])
def test_no_data_moves_inside_the_hvp_loop(runs, spec):
    loop = runs[spec]["loop"]
    # Data parallelism reduces products only; nothing permutes or exchanges examples. (On the
    # 4x2 mesh the FSDP-split kernels are gathered over the model axis: parameters, not data.)
    assert loop["collective-permute"] == 0 and loop["all-to-all"] == 0, loop
    if spec == "data:8":
        assert loop["all-gather"] == 0, loop


@pytest.mark.slow  # three 8-device subprocess runs: ~75 s (CI runs -m slow)
@pytest.mark.parametrize("spec", ["data:8", "data:4,model:2"])
def test_the_krylov_basis_is_split_over_the_devices(runs, spec):
    run = runs[spec]
    ideal = 80 * run["p"] * 4  # 80 more float32 vectors of p numbers
    # On one device the 80 extra vectors cost about their full size (measured 0.96 of it);
    # split over the 8 devices about an eighth, plus the growth of the replicated 120 x 120
    # projection and per-vector temporaries (measured 0.155 on 8x1, 0.194 on 4x2 of the full
    # size with the explicit residual check). Since the residuals come from the Arnoldi
    # relation (issue 21) the peak is the final product with the basis, which holds a second
    # split copy of it: 0.271 on both meshes (the explicit check: 0.018). Bound: 1/8 + 0.2,
    # far below the whole basis (1.0) that an unsplit one would cost.
    assert 0.8 * ideal < run["basis_whole"] < 1.2 * ideal, run["basis_whole"] / ideal
    assert run["basis_split"] < (1 / 8 + 0.2) * ideal, run["basis_split"] / ideal


def test_layout_plan_and_exact_means_for_any_batch_size():
    rng = np.random.default_rng(1)
    data = {"x": rng.normal(size=(37, 3)), "w": rng.normal(size=(37,))}
    for batch_size in (1, 5, 7, 36, 37, 100):
        for d in (1, 2, 3, 5):
            p = layout.plan(37, batch_size, d)
            assert d * p["chunk"] + p["tail"] == 37
            assert p["num_batches"] * p["local_batch"] + p["rest"] == p["chunk"]
    with jax.enable_x64(True):
        batched = hs.batch_data(data, batch_size=5)
        mean = hs.dataset_mean(lambda b: {"s": jax.numpy.mean(b["x"] * b["w"][:, None], 0)},
                               batched)
        np.testing.assert_allclose(mean["s"], np.mean(data["x"] * data["w"][:, None], 0),
                                   rtol=1e-13)
    with pytest.raises(ValueError, match="fewer than the 8 data-parallel devices"):
        layout.plan(5, 4, 8)


def test_mesh_specs_are_checked():
    with pytest.raises(ValueError, match="look like"):
        hs.sharding.parse_mesh("data=4")
    with pytest.raises(ValueError, match="multiply to the device count"):
        hs.sharding.parse_mesh(f"data:{jax.device_count() + 1}")
    with pytest.raises(ValueError, match="twice"):
        hs.sharding.parse_mesh("data:1,data:1")
    mesh = hs.sharding.parse_mesh("data:-1")
    assert dict(mesh.shape) == {"data": jax.device_count()}
    with pytest.raises(ValueError, match="not axes of the mesh"):
        hs.sharding.data_axes(mesh, "batch")
