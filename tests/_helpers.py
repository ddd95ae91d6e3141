"""Shared test helpers: reference constructions and a compilation counter (no mocks)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

import jax
import jax.numpy as jnp
import jax.monitoring
import numpy as np

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Process:
    """A subprocess in the repository root whose output goes to a file (a pipe nobody reads
    would block it)."""

    def __init__(self, cmd, log_path):
        self.log_path = str(log_path)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)

    def finish(self, timeout=600):
        self.proc.wait(timeout=timeout)
        self._log.close()
        return self.proc.returncode, open(self.log_path).read()

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._log.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def device_env(devices: int, **extra) -> dict:
    """The environment of a subprocess on ``devices`` simulated CPU devices (other XLA flags of
    this process kept)."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    return dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", **extra)


def two_processes(cmd, log_prefix, *, devices=2, timeout=600, env=None):
    """Runs ``cmd`` as processes 0 and 1 of a 2-process JAX run on localhost (each on
    ``devices`` CPU devices); ``[(exit status, output)]`` of each."""
    port = free_port()
    procs = []
    for pid in (0, 1):
        full = cmd + [f"--coordinator_address=localhost:{port}", "--num_processes=2",
                      f"--process_id={pid}"]
        log = open(f"{log_prefix}.{pid}.log", "w")
        procs.append((subprocess.Popen(full, cwd=REPO, env=env or device_env(devices),
                                       stdout=log, stderr=subprocess.STDOUT), log))
    out = []
    for proc, log in procs:
        proc.wait(timeout=timeout)
        log.close()
        out.append((proc.returncode, open(log.name).read()))
    return out


@contextlib.contextmanager
def count_compilations():
    """Counts XLA backend compilations inside the block: ``with count_compilations() as n: ...``
    then ``n[0]``."""
    count = [0]

    def listener(event, duration, **kwargs):
        del duration, kwargs
        if event == _COMPILE_EVENT:
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def matrix_with_spectrum(eigenvalues, seed=0):
    """A dense symmetric float64 numpy matrix Q diag(λ) Q^T with a random orthogonal Q, and Q."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(lam.size, lam.size)))
    return (q * lam) @ q.T, q


def projector(rows):
    rows = np.asarray(rows, dtype=np.float64)
    return rows.T @ rows


def top_subspace(matrix, k, which="LA"):
    """Reference (eigenvalues, eigenvector rows) of a dense symmetric matrix by numpy eigh."""
    w, v = np.linalg.eigh(np.asarray(matrix, dtype=np.float64))
    order = {"LA": np.argsort(-w), "SA": np.argsort(w), "LM": np.argsort(-np.abs(w))}[which]
    return w[order[:k]], v[:, order[:k]].T


def eps(dtype):
    return float(jnp.finfo(dtype).eps)


# --------------------------------------------------------------------------------------------
# Plain-JAX models, so that the core's tests need no flax (the paper's models have their own).

_ACTIVATIONS = {"relu": jax.nn.relu, "softplus": jax.nn.softplus, "tanh": jnp.tanh}


def mlp(sizes, *, seed=0, activation="relu"):
    """A fully connected net as plain functions: ``(params, outputs)``, with params
    ``{"dense_0": {"kernel", "bias"}, ...}`` (kernels N(0, 1/fan_in), zero biases) for layer
    sizes ``(inputs, hidden..., outputs)`` and ``outputs(params, batch)`` the logits of
    ``batch["x"]`` (flattened per example)."""
    keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
    # Drawn in float32 whatever jax_enable_x64 says (the same values in and out of the scope).
    params = {f"dense_{i}": {"kernel": jax.random.normal(keys[i], (a, b), jnp.float32)
                             / np.float32(np.sqrt(a)), "bias": jnp.zeros(b, jnp.float32)}
              for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))}
    act, depth = _ACTIVATIONS[activation], len(sizes) - 1

    def outputs(p, batch):
        x = jnp.reshape(batch["x"], (batch["x"].shape[0], -1))
        for i in range(depth):
            x = x @ p[f"dense_{i}"]["kernel"] + p[f"dense_{i}"]["bias"]
            x = act(x) if i < depth - 1 else x
        return x

    return params, jax.tree_util.Partial(outputs)


def convnet(channels, num_outputs, image_shape, *, seed=0):
    """3x3 SAME convolutions (relu, 2x2 max-pool each) and a dense head, as plain functions:
    ``(params, outputs)`` with params ``conv_i`` and ``dense_out``."""
    h, w, c = image_shape
    keys = jax.random.split(jax.random.key(seed), len(channels) + 1)
    params = {}
    for i, out in enumerate(channels):
        params[f"conv_{i}"] = {"kernel": jax.random.normal(keys[i], (3, 3, c, out), jnp.float32)
                               / np.float32(np.sqrt(9 * c)), "bias": jnp.zeros(out, jnp.float32)}
        c, h, w = out, h // 2, w // 2
    params["dense_out"] = {
        "kernel": jax.random.normal(keys[-1], (h * w * c, num_outputs), jnp.float32)
        / np.float32(np.sqrt(h * w * c)), "bias": jnp.zeros(num_outputs, jnp.float32)}

    def outputs(p, batch):
        x = batch["x"]
        for i in range(len(channels)):
            x = jax.lax.conv_general_dilated(x, p[f"conv_{i}"]["kernel"], (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            x = jax.nn.relu(x + p[f"conv_{i}"]["bias"])
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                      "VALID")
        x = jnp.reshape(x, (x.shape[0], -1))
        return x @ p["dense_out"]["kernel"] + p["dense_out"]["bias"]

    return params, jax.tree_util.Partial(outputs)


def _cross_entropy(logits, batch):
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None].astype(jnp.int32), 1))


def _squared_error(outputs, batch):
    return jnp.mean((outputs - batch["y"]) ** 2)


def _composed(outputs, output_loss, params, batch):
    return output_loss(outputs(params, batch), batch)


# Functions are passed as ``jax.tree_util.Partial`` (pytrees), as the package's own losses
# are, so that jitted code takes them as arguments and compiles once per function.
cross_entropy = jax.tree_util.Partial(_cross_entropy)  # mean softmax CE of integer labels
squared_error = jax.tree_util.Partial(_squared_error)  # mean of (f - y)² over every entry:
# output Hessian 2I/m per example, over n examples.


def loss_of(outputs, output_loss=cross_entropy):
    """``loss(params, batch) = output_loss(outputs(params, batch), batch)``, a pytree."""
    return jax.tree_util.Partial(_composed, outputs, output_loss)
