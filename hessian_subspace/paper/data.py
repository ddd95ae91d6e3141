"""Data sets as numpy arrays, their label transforms, and a resumable mini-batch order.

A data set is a dict of numpy arrays with a common leading example axis: ``{"x": ..., "y": ...}``
(``x`` float32 inputs, ``y`` int32 labels of shape ``(n,)`` or float32 regression targets of
shape ``(n, 1)``). Extra per-example keys are allowed; the keys in :data:`PER_CLASS_KEYS` (the
Gaussian mixture's ``"means"``) have a leading *class* axis instead and are carried along, not
indexed by example.

Sources (:func:`load_dataset`): tensorflow-datasets random-access data sources (MNIST,
Fashion-MNIST, CIFAR-10/100), MNIST-format IDX directories (``"idx:DIR"``), and the paper's
synthetic sets (:func:`gaussian_mixture`, §3; :func:`sine_regression`, Table 1).

Transforms (pure numpy, they return new dicts): :func:`shuffle_labels` (random labels),
:func:`even_odd`, :func:`class_subset`, :func:`subset`, combined by :func:`apply_transforms`.

:func:`analysis_set` is the fixed set on which the Hessian and the gradient are measured (the paper
uses the whole training set, §2.1). The SGD batch order is
:func:`hessian_subspace.training.batches.batch_indices`.

References:
  Gur-Ari, Roberts & Dyer, "Gradient Descent Happens in a Tiny Subspace", arXiv:1812.04754 (2018).
  Zhang et al., "Understanding deep learning requires rethinking generalization", ICLR 2017.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hessian_subspace.paper.synthetic import (TEXT_SOURCES, gaussian_mixture, sine_regression,
                                              text_sequences)

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

TFDS_NAMES = ("mnist", "fashion_mnist", "cifar10", "cifar100")
SYNTHETIC_NAMES = ("gaussian_mixture", "sine")
LABEL_TRANSFORMS = (None, "shuffle", "even_odd")
# Keys whose leading axis is the class, not the example (e.g. gaussian_mixture's "means").
PER_CLASS_KEYS = ("means",)

# Where tfds downloads from (the MNIST files and tfds' GCS mirror). Probed before a download so
# that an offline machine fails in seconds instead of retrying (measured: 205 s for "mnist").
_NETWORK_PROBE = ("storage.googleapis.com", 443)
_NETWORK_TIMEOUT_S = 3.0
_TFDS_CHUNK = 4096  # examples per batched read (bounds the per-example dicts held at once)
_OFFLINE_OPTIONS = (
    "Offline options: data_dir=DIR holding tfds ArrayRecord data prepared elsewhere; "
    "'idx:/path/to/idx-dir' for MNIST-format IDX files (e.g. 'idx:../shared/data/fashion-mnist' "
    "or Debian's 'idx:/usr/share/datasets/fashion-mnist'); 'gaussian_mixture' or 'sine' "
    "(synthetic)."
)


class DataError(ValueError):
    """A data file is missing, truncated or malformed (the message names the file)."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (optionally gzip-compressed) into a numpy array.

    Args:
      path: path of an IDX file such as ``train-images-idx3-ubyte.gz``.

    Returns:
      The array, with the shape and dtype the header declares (big-endian types converted to
      native byte order).

    Raises:
      DataError: the file is missing, is not IDX, or is shorter or longer than its header says.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"IDX file not found: {path}")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip raises these on truncated/corrupt streams.
        raise DataError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4]!r}).")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: header needs {header} bytes, file has {len(raw)}.")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(
            f"{path} is {state}: header declares shape {shape} ({expected} bytes), "
            f"file has {len(raw)} bytes."
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _find(directory: str, stem: str) -> str:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise DataError(f"IDX file {stem}(.gz) not found in {directory}")


def load_idx_dataset(directory: str | os.PathLike, split: str = "train") -> dict[str, np.ndarray]:
    """Loads an MNIST-format split (images and labels) from a directory of IDX files.

    Works for MNIST, Fashion-MNIST and any data set shipped in that layout
    (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-...``).

    Args:
      directory: folder holding the IDX files, e.g. ``../shared/data/fashion-mnist``.
      split: "train" or "test".

    Returns:
      ``{"x": float32 (n, rows, cols, 1) in [0, 1], "y": int32 (n,)}``.
    """
    if split not in IDX_FILES:
        raise ValueError(f"`split` must be one of {sorted(IDX_FILES)}, got {split!r}.")
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise DataError(f"IDX directory not found: {directory}")
    img_path = _find(directory, IDX_FILES[split][0])
    lbl_path = _find(directory, IDX_FILES[split][1])
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3:
        raise DataError(
            f"{img_path}: expected images of rank 3 (n, rows, cols), got {images.shape}.")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{lbl_path}: {labels.shape} labels do not match {images.shape[0]} images "
            f"in {img_path}."
        )
    x = (images.astype(np.float32) / 255.0)[..., None]
    return {"x": x, "y": labels.astype(np.int32)}


def load_dataset(name: str, split: str = "train", *, data_dir: str | None = None,
                 **kwargs: Any) -> dict[str, np.ndarray]:
    """Loads a named data set into numpy arrays.

    Names:
      * ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``, ``"cifar100"``: tensorflow-datasets through
        ``tfds.data_source`` (random-access ArrayRecord files, no TensorFlow needed to read them).
        ``split`` is any tfds split string ("train", "test", "train[:10%]"). If the data is not
        prepared in ``data_dir`` (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``), tfds
        downloads and prepares it, which needs the network *and* TensorFlow; without them this
        raises a one-line :class:`DataError` within a few seconds that lists the offline options.
        CIFAR-100 uses the fine ``"label"``.
      * ``"idx:PATH"``: :func:`load_idx_dataset` on the IDX directory ``PATH`` ("train"/"test").
      * ``"gaussian_mixture"``: :func:`gaussian_mixture` with ``kwargs``; "test" shares the means.
      * ``"sine"``: :func:`sine_regression` with ``kwargs``; "test" uses another seed stream.
      * ``"text:pydoc"``: byte-level language modelling on the help text that ships with Python
        (:func:`hessian_subspace.paper.synthetic.text_sequences`, ``kwargs``: ``context``):
        ``x`` and ``y`` int32 ``(n, context)``, the next byte at every position.

    >>> ds = load_dataset("sine", "test", num_examples=3)
    >>> sorted(ds), ds["x"].shape
    (['x', 'y'], (3, 1))

    Args:
      name: one of the names above.
      split: the split to load.
      data_dir: tfds data directory (tfds names only; ignored otherwise).
      **kwargs: arguments of the synthetic generators (none for the other names).

    Returns:
      ``{"x": float32, "y": ...}``; images are float32 in [0, 1], NHWC, with int32 labels (n,).

    Raises:
      DataError: unknown name, or data that cannot be found, read or downloaded.
    """
    if name.startswith("idx:"):
        _no_kwargs(name, kwargs)
        if not name[4:]:
            raise DataError("'idx:' needs a directory, e.g. 'idx:../shared/data/fashion-mnist'.")
        return load_idx_dataset(name[4:], split)
    if name == "gaussian_mixture":
        return gaussian_mixture(split=split, **kwargs)
    if name == "sine":
        return sine_regression(split=split, **kwargs)
    if name.startswith("text:"):
        if name[5:] not in TEXT_SOURCES:
            raise DataError(f"unknown text source {name!r}; known: "
                            f"{['text:' + s for s in TEXT_SOURCES]}.")
        return text_sequences(name[5:], split=split, **kwargs)
    if name in TFDS_NAMES:
        _no_kwargs(name, kwargs)
        return _load_tfds(name, split, data_dir)
    valid = ", ".join(repr(n) for n in TFDS_NAMES + SYNTHETIC_NAMES
                      + tuple("text:" + s for s in TEXT_SOURCES))
    raise DataError(f"unknown data set {name!r}; valid names: {valid}, 'idx:/path/to/idx-dir'.")


def _check_split(split: str, name: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"{name}: `split` must be 'train' or 'test', got {split!r}.")


def _no_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    if kwargs:
        raise TypeError(f"data set {name!r} takes no keyword arguments, got {sorted(kwargs)}.")


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def _load_tfds(name: str, split: str, data_dir: str | None) -> dict[str, np.ndarray]:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            f"data set {name!r} needs tensorflow-datasets ({_one_line(e)}). {_OFFLINE_OPTIONS}"
        ) from None
    # Without an explicit file format, `tfds.data_source(data_dir=...)` would prepare TFRecord
    # files, which have no random access.
    kwargs = dict(split=split, data_dir=data_dir, builder_kwargs={"file_format": "array_record"})
    try:
        source = tfds.data_source(name, download=False, **kwargs)
    except Exception as first_error:  # tfds raises KeyError, NotImplementedError... when absent.
        source = _prepare_tfds(tfds, name, split, data_dir, kwargs, first_error)
    return _tfds_arrays(source, name, split)


def _prepare_tfds(tfds: Any, name: str, split: str, data_dir: str | None,
                  kwargs: dict[str, Any], first_error: Exception) -> Any:
    """Downloads and prepares a tfds data set, failing fast (one line) when it cannot."""
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        where, prepared = builder.data_dir, builder.is_prepared()
    except Exception as e:
        raise DataError(f"cannot open tfds data set {name!r} in data_dir={data_dir!r}: "
                        f"{_one_line(e)}") from e
    if prepared:  # There is data, but not what was asked for (bad split, TFRecord files...).
        raise DataError(f"cannot read split {split!r} of tfds data set {name!r} from {where}: "
                        f"{_one_line(first_error)}") from first_error
    address = _proxy_address() or _NETWORK_PROBE
    if not _can_connect(address, _NETWORK_TIMEOUT_S):
        raise DataError(
            f"tfds data set {name!r} is not prepared in {where} and cannot be downloaded: no "
            f"network (no connection to {address[0]}:{address[1]} within "
            f"{_NETWORK_TIMEOUT_S:g} s). {_OFFLINE_OPTIONS}"
        ) from None
    if importlib.util.find_spec("tensorflow") is None:
        # tfds 4.9.10 encodes images with TensorFlow while preparing; reading needs only numpy.
        raise DataError(
            f"tfds data set {name!r} is not prepared in {where}; preparing it needs TensorFlow "
            f"(pip install tensorflow), reading prepared data does not. {_OFFLINE_OPTIONS}"
        ) from None
    try:
        return tfds.data_source(name, download=True, **kwargs)
    except ModuleNotFoundError as e:  # e.g. importlib_resources: tensorflow/datasets#11212.
        raise DataError(
            f"preparing tfds data set {name!r} in {where} needs the missing module {e.name!r} "
            f"(pip install {str(e.name).replace('_', '-')}). {_OFFLINE_OPTIONS}"
        ) from e
    except Exception as e:
        raise DataError(f"could not download and prepare tfds data set {name!r} in {where}: "
                        f"{_one_line(e)}") from e


def _proxy_address() -> tuple[str, int] | None:
    """The HTTPS proxy that downloads would go through (from the environment), if any."""
    proxy = urllib.request.getproxies().get("https")
    if not proxy or urllib.request.proxy_bypass(_NETWORK_PROBE[0]):
        return None
    parts = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
    if not parts.hostname:
        return None
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def _can_connect(address: tuple[str, int], timeout: float) -> bool:
    """Whether a TCP connection to ``address`` opens within ``timeout`` seconds.

    Runs in a daemon thread because name resolution ignores socket timeouts and may hang.
    """
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="hessian_subspace-network-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _tfds_arrays(source: Sequence[Mapping[str, Any]], name: str,
                 split: str) -> dict[str, np.ndarray]:
    """Reads a tfds data source into ``{"x": float32 NHWC in [0, 1], "y": int32}``.

    Uses the batched ``__getitems__`` when the source has one: on 60k Fashion-MNIST examples
    (2-core CPU, PIL decoding) that takes 9.3 s against 18.6 s for one ``source[i]`` per example.
    """
    what = f"tfds data set {name!r} split {split!r}"
    n = len(source)
    if n == 0:
        raise DataError(f"{what} has no examples.")
    try:
        first = source[0]
        if "image" not in first or "label" not in first:
            raise DataError(f"{what}: expected 'image' and 'label' features, got {sorted(first)}.")
        image = np.asarray(first["image"])
        if image.dtype != np.uint8 or image.ndim != 3:
            raise DataError(f"{what}: expected uint8 (h, w, c) images, got {image.dtype} "
                            f"{image.shape}.")
        images = np.empty((n, *image.shape), np.uint8)
        labels = np.empty((n,), np.int32)
        getitems = getattr(source, "__getitems__", None)
        for start in range(0, n, _TFDS_CHUNK):
            keys = list(range(start, min(n, start + _TFDS_CHUNK)))
            examples = None
            if getitems is not None:
                try:
                    examples = getitems(keys)
                except TypeError:  # tfds.testing.mock_data (4.9.10) binds no `self` there.
                    getitems = None
            if examples is None:
                examples = [source[i] for i in keys]
            for offset, example in enumerate(examples):
                images[start + offset] = example["image"]
                labels[start + offset] = example["label"]
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read {what}: {_one_line(e)}") from e
    return {"x": images.astype(np.float32) / 255.0, "y": labels}


# --------------------------------------------------------------------------------------------
# Transforms: pure numpy, each returns a new dict and leaves its input alone. Arrays that a
# transform does not change are shared with the input, not copied.


def _num_examples(ds: Mapping[str, Any], what: str = "data set") -> int:
    if "y" not in ds:
        raise DataError(f"{what} has no 'y' array (keys: {sorted(ds)}).")
    n = len(ds["y"])
    for key, value in ds.items():
        if key not in PER_CLASS_KEYS and np.shape(value)[:1] != (n,):
            raise DataError(f"{what}: array {key!r} of shape {np.shape(value)} does not have "
                            f"the {n} examples of 'y'.")
    return n


def _take(ds: Mapping[str, Any], indices: np.ndarray) -> dict[str, Any]:
    return {k: v if k in PER_CLASS_KEYS else np.asarray(v)[indices] for k, v in ds.items()}


def _class_labels(ds: Mapping[str, Any], what: str) -> np.ndarray:
    y = np.asarray(ds["y"])
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what} needs integer class labels of shape (n,), got {y.dtype} "
                         f"{y.shape}.")
    return y


def shuffle_labels(ds: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """Random labels (Zhang et al. 2017): ``y`` permuted across examples, ``x`` left in place.

    The label histogram is kept and the input-label pairing destroyed; the paper's "random labels"
    rows (Table 1, Fig. 12, App. B). Works for regression targets too.

    >>> ds = {"x": np.arange(6.0)[:, None], "y": np.array([0, 0, 0, 1, 1, 2])}
    >>> np.bincount(shuffle_labels(ds, seed=0)["y"]).tolist()
    [3, 2, 1]

    Args:
      ds: data set with ``y`` of shape (n, ...).
      seed: seed of the permutation.

    Returns:
      A new data set with ``y[perm]``.
    """
    n = _num_examples(ds)
    perm = np.random.default_rng(seed).permutation(n)
    return {**ds, "y": np.asarray(ds["y"])[perm]}


def even_odd(ds: Mapping[str, Any]) -> dict[str, Any]:
    """Relabels classes by parity, ``y -> y % 2`` (MNIST as 2 classes, paper App. B).

    >>> even_odd({"x": np.zeros((4, 1)), "y": np.array([0, 1, 2, 7])})["y"]
    array([0, 1, 0, 1], dtype=int32)
    """
    _num_examples(ds)
    y = _class_labels(ds, "even_odd")
    return {**ds, "y": (y % 2).astype(np.int32)}


def class_subset(ds: Mapping[str, Any], classes: Sequence[int]) -> dict[str, Any]:
    """Keeps the examples of ``classes``, relabelled ``0..len(classes)-1`` in the given order.

    Per-class arrays (:data:`PER_CLASS_KEYS`, e.g. ``"means"``) are re-indexed the same way.

    >>> ds = {"x": np.arange(5.0)[:, None], "y": np.array([0, 1, 2, 1, 2])}
    >>> out = class_subset(ds, [2, 1])
    >>> out["y"].tolist(), out["x"][:, 0].tolist()
    ([1, 0, 1, 0], [1.0, 2.0, 3.0, 4.0])

    Raises:
      ValueError: empty or repeated ``classes``, or a class without examples.
    """
    _num_examples(ds)
    y = _class_labels(ds, "class_subset")
    order = np.asarray(classes)
    if order.ndim != 1 or order.size == 0 or not np.issubdtype(order.dtype, np.integer):
        raise ValueError(f"`classes` must be a non-empty list of ints, got {classes!r}.")
    if len(np.unique(order)) != len(order):
        raise ValueError(f"`classes` has repeated entries: {order.tolist()}.")
    missing = order[~np.isin(order, y)]
    if missing.size:
        raise ValueError(f"classes {missing.tolist()} have no examples (labels present: "
                         f"{np.unique(y).tolist()}).")
    keep = np.flatnonzero(np.isin(y, order))
    sorter = np.argsort(order)
    new_y = sorter[np.searchsorted(order, y[keep], sorter=sorter)].astype(np.int32)
    out = _take(ds, keep)
    out["y"] = new_y
    for key in PER_CLASS_KEYS:
        if key in out:
            per_class = np.asarray(out[key])
            if order.max() >= len(per_class) or order.min() < 0:
                raise ValueError(f"classes {order.tolist()} do not index {key!r} of shape "
                                 f"{per_class.shape}.")
            out[key] = per_class[order]
    return out


def subset(ds: Mapping[str, Any], num_examples: int, seed: int = 0) -> dict[str, Any]:
    """A fixed random subset of ``num_examples`` examples, kept in their original order.

    >>> ds = {"x": np.arange(10.0)[:, None], "y": np.arange(10)}
    >>> small = subset(ds, 4, seed=0)
    >>> len(small["y"]), bool(np.all(np.diff(small["y"]) > 0))
    (4, True)

    Raises:
      ValueError: ``num_examples`` is not in ``1..n``.
    """
    n = _num_examples(ds)
    if not 1 <= num_examples <= n:
        raise ValueError(f"`num_examples` must be in 1..{n} (the data set size), got "
                         f"{num_examples}.")
    indices = np.sort(np.random.default_rng(seed).choice(n, size=num_examples, replace=False))
    return _take(ds, indices)


def apply_transforms(ds: Mapping[str, Any], *, label_transform: str | None = None,
                     classes: Sequence[int] | None = None, num_examples: int | None = None,
                     seed: int = 0) -> dict[str, Any]:
    """Applies, in this order: :func:`class_subset`, :func:`subset`, then the label transform.

    The label transform comes last so that shuffled labels keep the histogram of the final set.

    Args:
      ds: data set.
      label_transform: None, "shuffle" (:func:`shuffle_labels`) or "even_odd" (:func:`even_odd`).
      classes: keep only these classes (relabelled in the given order); None keeps all.
      num_examples: fixed random subset size; None keeps all.
      seed: seed of the subset and of the label permutation.

    Returns:
      A new data set.

    Raises:
      ValueError: an unknown ``label_transform`` or an invalid ``classes``/``num_examples``.
    """
    if label_transform not in LABEL_TRANSFORMS:
        raise ValueError(f"`label_transform` must be one of {list(LABEL_TRANSFORMS)}, got "
                         f"{label_transform!r}.")
    out = dict(ds)
    if classes is not None:
        out = class_subset(out, classes)
    if num_examples is not None:
        out = subset(out, num_examples, seed=seed)
    if label_transform == "shuffle":
        out = shuffle_labels(out, seed=seed)
    elif label_transform == "even_odd":
        out = even_odd(out)
    return out


# --------------------------------------------------------------------------------------------
# Batches.


def get_batch(ds: Mapping[str, Any], indices: np.ndarray) -> dict[str, np.ndarray]:
    """The examples at ``indices``: every per-example array indexed, per-class keys dropped.

    >>> get_batch({"x": np.arange(4.0), "y": np.arange(4), "means": np.eye(2)}, [3, 0])
    {'x': array([3., 0.]), 'y': array([3, 0])}
    """
    return {k: np.asarray(v)[indices] for k, v in ds.items() if k not in PER_CLASS_KEYS}


def analysis_set(ds: Mapping[str, Any], num_examples: int | None = None,
                 seed: int = 0) -> dict[str, Any]:
    """The fixed set on which the Hessian and the gradient are measured.

    The paper uses the entire training set (§2.1): ``num_examples=None``. A fixed random subset
    (:func:`subset` with ``seed``) trades accuracy for speed; it is the same at every step.
    """
    if num_examples is None:
        _num_examples(ds)
        return dict(ds)
    return subset(ds, num_examples, seed=seed)
