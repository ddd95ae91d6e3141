"""Data sets as numpy arrays: MNIST-format IDX files and the paper's synthetic sets.

A data set is a dict of numpy arrays with a common leading example axis: ``{"x": ..., "y": ...}``
(``x`` float32 inputs, ``y`` int32 labels or float32 regression targets).
"""

from __future__ import annotations

import gzip
import os
from typing import Any

import numpy as np

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


def gaussian_mixture(*, num_classes: int, dim: int, num_examples: int, sigma: float,
                     seed: int = 0, orthogonal_means: bool = False) -> dict[str, Any]:
    """The paper's toy data (§3): k classes, x ~ N(μ_y, σ² I) with random unit means μ_y.

    Labels are balanced (example a has class a mod k, then shuffled).

    Args:
      num_classes: k.
      dim: input dimension d.
      num_examples: n.
      sigma: noise standard deviation σ (0 puts every example on its class mean).
      seed: seed of the means, labels and noise.
      orthogonal_means: make the means exactly orthonormal (needs k <= d), as in App. E.

    Returns:
      ``{"x": float32 (n, d), "y": int32 (n,), "means": float32 (k, d)}``.
    """
    if num_classes < 2:
        raise ValueError(f"`num_classes` must be >= 2, got {num_classes}.")
    if dim < 1 or num_examples < 1:
        raise ValueError("`dim` and `num_examples` must be >= 1.")
    if sigma < 0:
        raise ValueError(f"`sigma` must be >= 0, got {sigma}.")
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes, dim))
    if orthogonal_means:
        if num_classes > dim:
            raise ValueError("orthogonal means need num_classes <= dim.")
        means = np.linalg.qr(means.T)[0].T
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    y = rng.permutation(np.arange(num_examples) % num_classes).astype(np.int32)
    x = means[y] + sigma * rng.normal(size=(num_examples, dim))
    return {"x": x.astype(np.float32), "y": y, "means": means.astype(np.float32)}
