"""IDX reader on the real Fashion-MNIST files and on tiny files written here."""

import gzip
import struct

import numpy as np
import pytest

from hessian_subspace import data


def _write_idx(path, array, type_code=0x08, compress=True, cut=0):
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim)
    header += b"".join(struct.pack(">I", s) for s in array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if cut:
        payload = payload[:-cut]
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(payload)


def test_fashion_mnist_idx(fashion_mnist_dir):
    train = data.load_idx_dataset(fashion_mnist_dir, "train")
    test = data.load_idx_dataset(fashion_mnist_dir, "test")
    assert train["x"].shape == (60000, 28, 28, 1) and train["x"].dtype == np.float32
    assert test["x"].shape == (10000, 28, 28, 1)
    assert train["y"].dtype == np.int32 and set(np.unique(train["y"])) == set(range(10))
    assert 0.0 <= train["x"].min() and train["x"].max() <= 1.0
    assert np.bincount(train["y"]).tolist() == [6000] * 10


@pytest.mark.parametrize("compress", [True, False])
def test_tiny_idx_roundtrip(tmp_path, compress):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, 1], dtype=np.uint8)
    suffix = ".gz" if compress else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, compress=compress)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, compress=compress)
    ds = data.load_idx_dataset(tmp_path, "train")
    np.testing.assert_array_equal(ds["y"], [7, 1])
    np.testing.assert_allclose(ds["x"][..., 0], images / 255.0, rtol=1e-6)
    floats = np.linspace(-1, 1, 6).reshape(2, 3).astype(np.float32)
    _write_idx(tmp_path / "f.idx", floats, type_code=0x0D, compress=False)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "f.idx"), floats)


def test_truncated_and_malformed_idx_files_name_the_file(tmp_path):
    images = np.zeros((5, 4, 4), dtype=np.uint8)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    _write_idx(path, images, cut=7)
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte\.gz is truncated"):
        data.read_idx(path)
    # A gzip stream cut short.
    raw = gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 1000) + bytes(1000))
    (tmp_path / "cut.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.DataError, match="cut.gz"):
        data.read_idx(tmp_path / "cut.gz")
    (tmp_path / "junk").write_bytes(b"hello world")
    with pytest.raises(data.DataError, match="junk is not an IDX file"):
        data.read_idx(tmp_path / "junk")
    with pytest.raises(data.DataError, match="not found"):
        data.read_idx(tmp_path / "missing.gz")
    with pytest.raises(data.DataError, match="train-labels-idx1-ubyte"):
        data.load_idx_dataset(tmp_path, "train")  # labels missing


def test_gaussian_mixture_shapes_and_means():
    ds = data.gaussian_mixture(num_classes=3, dim=50, num_examples=30, sigma=0.0, seed=1,
                               orthogonal_means=True)
    assert ds["x"].shape == (30, 50) and np.bincount(ds["y"]).tolist() == [10, 10, 10]
    np.testing.assert_allclose(ds["means"] @ ds["means"].T, np.eye(3), atol=1e-6)
    np.testing.assert_allclose(ds["x"], ds["means"][ds["y"]], atol=1e-7)
