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
