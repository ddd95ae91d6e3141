import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_FASHION_MNIST = os.path.join(os.path.dirname(REPO), "shared", "data", "fashion-mnist")


@pytest.fixture
def fashion_mnist_dir():
    if not os.path.isdir(SHARED_FASHION_MNIST):
        pytest.fail(f"Fashion-MNIST IDX files expected at {SHARED_FASHION_MNIST} (../shared).")
    return SHARED_FASHION_MNIST

# tests/fixtures holds recorded data and the (provenance-only) scripts that made it.
collect_ignore_glob = ["fixtures/*"]


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test module. Every XLA:CPU executable keeps its
    JIT code in a few memory mappings, and the whole suite in one process compiles enough of
    them to pass Linux's vm.max_map_count (65,530), after which LLVM's next mmap fails and the
    process dies (SIGSEGV/SIGABRT inside a compile)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
