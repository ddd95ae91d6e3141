"""What a backend runs slowly, read from traced programs (no computation).

XLA:CPU runs a convolution inside a loop body (``fori_loop``/``while_loop``) many times
slower than the same convolution in straight-line code: measured on the Keras ConvNet of
Table 1 (889,834 parameters, 2 x 1,000 images, 2 CPU cores), the data-set gradient took 70 s
as a two-iteration ``fori_loop`` and 6.6 s written out, one Hessian-vector product 150 s and
10 s (``benchmarks/dataset_loop_cpu.py``). Loops elsewhere (MLPs, any accelerator) are fine.
The data-set means (:func:`hessian_subspace.curvature.dataset_mean`) therefore write their
batch loop out, and the eigensolvers drive their loop from Python, when this says so.
"""

from __future__ import annotations

import jax

CONVOLUTION = "conv_general_dilated"
# Batch loops longer than this stay loops (compile time grows with the batches written out).
MAX_UNROLLED_BATCHES = 32


def has_primitive(jaxpr, name: str) -> bool:
    """True when ``jaxpr`` (a ``jax.core.Jaxpr``) or any program nested in it (loop bodies,
    conditionals, inner jits, custom derivatives) applies the primitive ``name``."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            return True
        for value in eqn.params.values():
            for v in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(v, "jaxpr", v)
                if hasattr(inner, "eqns") and has_primitive(inner, name):
                    return True
    return False


def loops_are_slow(jaxpr) -> bool:
    """True when this program would run slowly as a loop body: a convolution on CPU."""
    return jax.default_backend() == "cpu" and has_primitive(jaxpr, CONVOLUTION)
