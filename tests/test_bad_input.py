"""Issue 12, bad input: cases that used to end in a deep JAX traceback, as a table of
input → error type and message fragment (the metrics' shape cases are in test_metrics.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hessian_subspace as hs


def _loss(p, batch):
    return jnp.mean((batch["x"] @ p["w"] - batch["y"]) ** 2)


_PARAMS = {"w": jnp.ones((3, 2))}
_DATA = {"x": jnp.asarray(np.random.default_rng(0).normal(size=(10, 3)), jnp.float32),
         "y": jnp.zeros((10, 2))}


def _op():
    return hs.dataset_hvp(_loss, _PARAMS, _DATA, batch_size=5)


_CASES = [
    ("hvp, loss not callable",
     lambda: hs.hvp(3.0, _PARAMS, _PARAMS, _DATA), TypeError, "`loss_fn` must be callable"),
    ("hvp, loss returns a vector",
     lambda: hs.hvp(lambda p, b: (b["x"] @ p["w"]).sum(1), _PARAMS, _PARAMS, _DATA),
     ValueError, "must return a scalar"),
    ("dataset_hvp, loss returns a vector",
     lambda: hs.dataset_hvp(lambda p, b: (b["x"] @ p["w"]).sum(1), _PARAMS, _DATA,
                            batch_size=5), ValueError, "must return a scalar"),
    ("top_eigenpairs, v0 of another tree",
     lambda: hs.top_eigenpairs(_op(), {"v": jnp.ones((3, 2))}, 2), ValueError,
     "`v0` must be shaped like the operator's vectors"),
    ("top_eigenpairs, flat v0 for a pytree operator",
     lambda: hs.top_eigenpairs(_op(), jnp.ones(6), 2), ValueError,
     "hs.random_start_vector(key, op.like)"),
    ("lanczos, v0 of other shapes",
     lambda: hs.lanczos(_op(), {"w": jnp.ones((2, 3))}, 3), ValueError,
     "`v0` must be shaped like"),
]


@pytest.mark.parametrize("case, call, error, fragment", _CASES, ids=[c[0] for c in _CASES])
def test_bad_input_gets_a_clear_error(case, call, error, fragment):
    del case
    with pytest.raises(error, match=__import__("re").escape(fragment)):
        call()


def test_good_start_vectors_still_work():
    op = _op()
    v0 = hs.random_start_vector(jax.random.key(0), op.like)
    assert bool(np.all(hs.top_eigenpairs(op, v0, 2).converged))
    flat = hs.top_eigenpairs(lambda v: 2.0 * v, jnp.ones(6), 2)  # a flat operator: no `like`
    np.testing.assert_allclose(flat.eigenvalues, 2.0, rtol=1e-6)
