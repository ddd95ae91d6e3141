"""Data loading (IDX files, tfds through its mocks, synthetic sets), transforms and batches."""

import gzip
import socket
import struct
import threading
import time

import numpy as np
import pytest

from hessian_subspace.paper import data
from hessian_subspace.training import batches


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


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets, through `tfds.data_source` and the real conversion code.


@pytest.fixture
def tfds_mock():
    tfds = pytest.importorskip("tensorflow_datasets")
    # USE_CODE: feature specs from the builder classes, no metadata files, no network (tfds 4.9.10).
    with tfds.testing.mock_data(num_examples=7, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


@pytest.mark.parametrize("name, shape, num_classes", [
    ("mnist", (28, 28, 1), 10),
    ("fashion_mnist", (28, 28, 1), 10),
    ("cifar10", (32, 32, 3), 10),
    ("cifar100", (32, 32, 3), 100),
])
def test_tfds_data_source(tfds_mock, tmp_path, name, shape, num_classes):
    ds = data.load_dataset(name, "train", data_dir=str(tmp_path))
    assert sorted(ds) == ["x", "y"]
    assert ds["x"].shape == (7, *shape) and ds["x"].dtype == np.float32
    assert ds["y"].shape == (7,) and ds["y"].dtype == np.int32
    assert 0.0 <= ds["x"].min() and ds["x"].max() <= 1.0 and ds["x"].max() > 0.5
    np.testing.assert_allclose(ds["x"] * 255, np.round(ds["x"] * 255), atol=1e-4)  # from uint8
    assert 0 <= ds["y"].min() and ds["y"].max() < num_classes
    with pytest.raises(TypeError, match="no keyword arguments"):
        data.load_dataset(name, "train", num_examples=3)


class _BatchedSource:
    """A random-access source like tfds' ArrayRecordDataSource, counting its reads."""

    def __init__(self, images, labels):
        self.images, self.labels, self.batched_reads, self.single_reads = images, labels, [], 0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        self.single_reads += 1
        return {"image": self.images[i], "label": np.int64(self.labels[i]), "id": "x"}

    def __getitems__(self, keys):
        self.batched_reads.append(list(keys))
        return [{"image": self.images[i], "label": np.int64(self.labels[i])} for i in keys]


def test_tfds_conversion_reads_in_batches(monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 4, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7)
    source = _BatchedSource(images, labels)
    monkeypatch.setattr(data, "_TFDS_CHUNK", 3)
    ds = data._tfds_arrays(source, "fake", "train")
    assert source.batched_reads == [[0, 1, 2], [3, 4, 5], [6]] and source.single_reads == 1
    np.testing.assert_array_equal(ds["x"], images / np.float32(255))
    np.testing.assert_array_equal(ds["y"], labels)
    with pytest.raises(data.DataError, match="'fake' split 'train'.*uint8"):
        data._tfds_arrays(_BatchedSource(images.astype(np.float32), labels), "fake", "train")


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call_with_deadline(fn, seconds):
    """Runs ``fn`` in a thread; returns (exception or result, elapsed); fails if it hangs."""
    box = []
    start = time.monotonic()
    thread = threading.Thread(target=lambda: box.append(_capture(fn)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return box[0], time.monotonic() - start


def _capture(fn):
    try:
        return fn()
    except Exception as e:  # handed back to the test
        return e


@pytest.fixture
def offline(monkeypatch):
    """No network, whatever the machine: the probe dials a closed local port, no proxy."""
    for var in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(data, "_NETWORK_PROBE", ("127.0.0.1", _closed_port()))


def test_tfds_offline_fails_fast_with_one_line(offline, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    error, elapsed = _call_with_deadline(
        lambda: data.load_dataset("mnist", data_dir=str(tmp_path)), seconds=60)
    assert isinstance(error, data.DataError), error
    message = str(error)
    assert elapsed < 10 and "\n" not in message
    for needle in ("'mnist'", str(tmp_path), "no network", "data_dir=", "idx:", "gaussian_mixture",
                   "sine"):
        assert needle in message


def test_network_probe_does_not_hang(monkeypatch, tmp_path, offline):
    pytest.importorskip("tensorflow_datasets")
    release = threading.Event()

    def hanging_connect(*args, **kwargs):  # like a name lookup that never answers
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr(data.socket, "create_connection", hanging_connect)
    monkeypatch.setattr(data, "_NETWORK_TIMEOUT_S", 0.3)
    try:
        start = time.monotonic()
        assert not data._can_connect(("example.invalid", 443), 0.3)
        assert time.monotonic() - start < 2
        error, elapsed = _call_with_deadline(
            lambda: data.load_dataset("cifar10", data_dir=str(tmp_path)), seconds=30)
        assert isinstance(error, data.DataError) and "within 0.3 s" in str(error), error
        assert elapsed < 5
    finally:
        release.set()


def test_unknown_names_and_idx_prefix(tmp_path):
    with pytest.raises(data.DataError, match="unknown data set 'imagenet'") as info:
        data.load_dataset("imagenet")
    for name in data.TFDS_NAMES + data.SYNTHETIC_NAMES + ("idx:",):
        assert name in str(info.value)
    with pytest.raises(data.DataError, match="needs a directory"):
        data.load_dataset("idx:")
    with pytest.raises(data.DataError, match="not found"):
        data.load_dataset(f"idx:{tmp_path / 'nowhere'}")
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([3, 4], dtype=np.uint8))
    ds = data.load_dataset(f"idx:{tmp_path}", "test")
    expected = data.load_idx_dataset(tmp_path, "test")
    np.testing.assert_array_equal(ds["x"], expected["x"])
    np.testing.assert_array_equal(ds["y"], [3, 4])


# ---------------------------------------------------------------------------------------------
# Synthetic sets.


def test_sine_regression():
    ds = data.load_dataset("sine", "train", num_examples=20000, noise=0.1, seed=3)
    assert ds["x"].shape == ds["y"].shape == (20000, 1)
    assert ds["x"].dtype == ds["y"].dtype == np.float32
    assert -1.0 <= ds["x"].min() < -0.999 and 0.999 < ds["x"].max() < 1.0
    residual = ds["y"] - np.sin(np.pi * (ds["x"].astype(np.float64) + 1.0))
    assert abs(residual.std() - 0.1) < 0.005 and abs(residual.mean()) < 0.005
    again = data.sine_regression(20000, noise=0.1, seed=3)
    np.testing.assert_array_equal(again["x"], ds["x"])
    test = data.load_dataset("sine", "test", num_examples=20000, noise=0.1, seed=3)
    assert not np.array_equal(test["x"], ds["x"])
    clean = data.sine_regression(50, noise=0.0)
    np.testing.assert_allclose(clean["y"], np.sin(np.pi * (clean["x"] + 1.0)), atol=1e-6)
    with pytest.raises(ValueError, match="split"):
        data.sine_regression(5, split="validation")


def test_gaussian_mixture_test_split_shares_means():
    kwargs = dict(num_classes=4, dim=30, num_examples=200, sigma=0.1, seed=5)
    train = data.load_dataset("gaussian_mixture", "train", **kwargs)
    test = data.load_dataset("gaussian_mixture", "test", **kwargs)
    direct = data.gaussian_mixture(**kwargs)  # the default split is the historical stream
    for key in ("x", "y", "means"):
        np.testing.assert_array_equal(train[key], direct[key])
    np.testing.assert_array_equal(test["means"], train["means"])
    assert not np.array_equal(test["x"], train["x"])
    assert np.bincount(test["y"]).tolist() == [50] * 4
    np.testing.assert_allclose(test["x"].mean(0), test["means"][test["y"]].mean(0), atol=0.05)


# ---------------------------------------------------------------------------------------------
# Transforms.


def _classification_set(n=300, k=10, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % k).astype(np.int32)
    return {"x": rng.normal(size=(n, 3)).astype(np.float32), "y": y,
            "means": np.arange(k * 2, dtype=np.float32).reshape(k, 2)}


def _snapshot(ds):
    return {k: np.array(v, copy=True) for k, v in ds.items()}


def _assert_unchanged(ds, before):
    assert sorted(ds) == sorted(before)
    for key in ds:
        np.testing.assert_array_equal(ds[key], before[key])


def test_shuffle_labels():
    ds = _classification_set()
    before = _snapshot(ds)
    out = data.shuffle_labels(ds, seed=1)
    _assert_unchanged(ds, before)
    np.testing.assert_array_equal(out["x"], ds["x"])
    np.testing.assert_array_equal(np.bincount(out["y"]), np.bincount(ds["y"]))
    assert np.mean(out["y"] == ds["y"]) < 0.3  # ~1/k of the pairs survive by chance
    np.testing.assert_array_equal(data.shuffle_labels(ds, seed=1)["y"], out["y"])
    assert not np.array_equal(data.shuffle_labels(ds, seed=2)["y"], out["y"])
    sine = data.sine_regression(10)
    assert sorted(data.shuffle_labels(sine, seed=0)["y"].ravel()) == sorted(sine["y"].ravel())


def test_even_odd_and_class_subset():
    ds = _classification_set()
    before = _snapshot(ds)
    np.testing.assert_array_equal(data.even_odd(ds)["y"], ds["y"] % 2)
    assert data.even_odd(ds)["y"].dtype == np.int32
    out = data.class_subset(ds, [7, 3])
    _assert_unchanged(ds, before)
    keep = np.isin(ds["y"], [7, 3])
    np.testing.assert_array_equal(out["x"], ds["x"][keep])
    np.testing.assert_array_equal(out["y"], np.where(ds["y"][keep] == 7, 0, 1))
    np.testing.assert_array_equal(out["means"], ds["means"][[7, 3]])
    with pytest.raises(ValueError, match="repeated"):
        data.class_subset(ds, [1, 1])
    with pytest.raises(ValueError, match=r"classes \[12\] have no examples"):
        data.class_subset(ds, [1, 12])
    with pytest.raises(ValueError, match="non-empty"):
        data.class_subset(ds, [])
    with pytest.raises(ValueError, match="integer class labels"):
        data.even_odd(data.sine_regression(4))


def test_subset_and_analysis_set():
    ds = _classification_set(n=100)
    out = data.subset(ds, 30, seed=4)
    assert len(out["y"]) == 30 and out["x"].shape == (30, 3)
    rows = [int(np.flatnonzero((ds["x"] == row).all(1))[0]) for row in out["x"]]
    assert rows == sorted(rows) and len(set(rows)) == 30
    np.testing.assert_array_equal(out["y"], ds["y"][rows])
    np.testing.assert_array_equal(out["means"], ds["means"])
    np.testing.assert_array_equal(data.subset(ds, 30, seed=4)["x"], out["x"])
    with pytest.raises(ValueError, match="1..100"):
        data.subset(ds, 101)
    whole = data.analysis_set(ds)
    assert whole is not ds and all(whole[k] is ds[k] for k in ds)
    np.testing.assert_array_equal(data.analysis_set(ds, 30, seed=4)["x"], out["x"])
    with pytest.raises(data.DataError, match="'x' of shape \\(99, 3\\)"):
        data.subset({"x": ds["x"][:99], "y": ds["y"]}, 5)


def test_apply_transforms():
    ds = _classification_set()
    before = _snapshot(ds)
    out = data.apply_transforms(ds, label_transform="shuffle", classes=[0, 1, 2], num_examples=50,
                                seed=3)
    _assert_unchanged(ds, before)
    assert len(out["y"]) == 50 and set(out["y"].tolist()) <= {0, 1, 2}
    assert out["means"].shape == (3, 2)
    plain = data.apply_transforms(ds, classes=[0, 1, 2], num_examples=50, seed=3)
    np.testing.assert_array_equal(np.bincount(out["y"]), np.bincount(plain["y"]))
    np.testing.assert_array_equal(out["x"], plain["x"])
    eo = data.apply_transforms(ds, label_transform="even_odd")
    np.testing.assert_array_equal(eo["y"], ds["y"] % 2)
    same = data.apply_transforms(ds)
    assert same is not ds and all(same[k] is ds[k] for k in ds)
    with pytest.raises(ValueError, match="'permute'"):
        data.apply_transforms(ds, label_transform="permute")
    with pytest.raises(ValueError, match="num_examples"):
        data.apply_transforms(ds, num_examples=10**6)


# ---------------------------------------------------------------------------------------------
# Mini-batch order.


def test_batch_indices_follow_the_stated_formula():
    n, b, seed = 23, 5, 7
    for step in (0, 3, 4, 9, 30):
        epoch, i = divmod(step, n // b)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        np.testing.assert_array_equal(batches.batch_indices(n, b, step, seed),
                                      perm[i * b:(i + 1) * b])


def test_batch_indices_epochs_and_restarts():
    n, b, seed = 50, 8, 11
    steps_per_epoch = n // b  # 6; 2 examples dropped per epoch
    run = [batches.batch_indices(n, b, step, seed) for step in range(4 * steps_per_epoch)]
    for epoch in range(4):
        seen = np.concatenate(run[epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch])
        assert len(seen) == len(set(seen.tolist())) == steps_per_epoch * b
        assert seen.min() >= 0 and seen.max() < n
    assert not np.array_equal(run[0], run[steps_per_epoch])  # a new order every epoch
    batches._epoch_permutation.cache_clear()  # a fresh process resuming at step 13
    resumed = [batches.batch_indices(n, b, step, seed) for step in range(13, len(run))]
    for a, c in zip(run[13:], resumed, strict=True):
        np.testing.assert_array_equal(a, c)
    assert not np.array_equal(batches.batch_indices(n, b, 0, seed=12), run[0])
    run[0][:] = -1  # callers own their copy
    assert batches.batch_indices(n, b, 0, seed).min() >= 0
    for bad in (0, n + 1):
        with pytest.raises(ValueError, match="batch_size"):
            batches.batch_indices(n, bad, 0, seed)
    with pytest.raises(ValueError, match="step"):
        batches.batch_indices(n, b, -1, seed)


def test_get_batch():
    ds = _classification_set(n=20)
    idx = batches.batch_indices(20, 4, step=2, seed=0)
    batch = data.get_batch(ds, idx)
    assert sorted(batch) == ["x", "y"]  # per-class "means" is not part of a batch
    np.testing.assert_array_equal(batch["x"], ds["x"][idx])
    np.testing.assert_array_equal(batch["y"], ds["y"][idx])
