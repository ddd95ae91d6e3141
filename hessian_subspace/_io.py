"""Atomic files (private): the one place that writes a file so that a crash never leaves a
partial one. Used by the result store, the training log, figures and summaries.

A write goes to a temporary file in the target's directory, is flushed and fsynced, then
renamed over the target (``os.replace``, atomic on POSIX): readers see the old file or the new
one, never a mixture. Nothing here reads or writes pickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Callable, IO

import numpy as np


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Calls ``write(f)`` on a temporary binary file, then renames it to ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``to_jsonable(obj)`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(to_jsonable(obj), indent=1))


def write_npz(path: str | os.PathLike, arrays: dict[str, Any]) -> None:
    """Writes numpy arrays to an ``.npz`` file atomically (no pickled objects)."""
    atomic_write(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}))


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, read eagerly with ``allow_pickle=False``."""
    with np.load(os.fspath(path), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(os.fspath(path), "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def to_jsonable(x: Any) -> Any:
    """Plain JSON types from numpy/JAX scalars and arrays, tuples and mappings; non-finite
    floats become None (JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if hasattr(x, "__array__") and not isinstance(x, (str, bytes)):
        arr = np.asarray(x)
        return to_jsonable(arr.tolist()) if arr.ndim else to_jsonable(arr.item())
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if np.isfinite(x) else None
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    return x
