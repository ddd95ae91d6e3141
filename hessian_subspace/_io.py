"""Atomic files (private): the one place that writes a file so that a crash never leaves a
partial one. Used by the result store, the training log, figures and summaries.

A write goes to a temporary file in the target's directory, is flushed and fsynced, then
renamed over the target (``os.replace``, atomic on POSIX): readers see the old file or the new
one, never a mixture. The temporary file's name carries the writer's process id and host, so
that the temporaries of a killed writer can be told from a live one's
(:func:`temporary_in_use`). A failed write (a full disk) raises an ``OSError`` naming the file.
Nothing here reads or writes pickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
import time
from typing import Any, Callable, IO

import numpy as np

TMP_PREFIX = ".tmp-"
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TMP_NAME = re.compile(r"^\.tmp-(\d+)\.([0-9a-f]{8})\.")
# A temporary file of an older layout (no writer in its name) this old is a killed write's.
_ORPHAN_SECONDS = 3600.0


def temporary_in_use(name: str, directory: str | None = None) -> bool:
    """Whether the temporary file ``name`` may still be written: its writer runs on another
    host or is alive here (an unnamed writer's file: younger than an hour)."""
    m = _TMP_NAME.match(name)
    if m is None:
        path = os.path.join(directory, name) if directory else name
        try:
            return time.time() - os.path.getmtime(path) < _ORPHAN_SECONDS
        except OSError:
            return False
    if m.group(2) != _HOST:
        return True
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _failed(e: OSError, path: str) -> OSError:
    """``e`` as an ``OSError`` that names the file (a full disk: "No space left on device")."""
    return OSError(e.errno, f"{e.strerror or e}: cannot write {path}")


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Calls ``write(f)`` on a temporary binary file, then renames it to ``path``.

    Raises:
      OSError: naming ``path`` (the temporary file is removed; ``path`` is unchanged).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f"{TMP_PREFIX}{os.getpid()}.{_HOST}.",
                                   suffix="-" + os.path.basename(path))
    except OSError as e:
        raise _failed(e, path) from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            raise _failed(e, path) from e
        raise


def append_line(path: str | os.PathLike, line: str) -> None:
    """Appends ``line`` and a newline to a text file with one ``write`` (then fsync): a killed
    writer leaves at most a torn last line, which the reader's check finds."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise _failed(e, path) from e


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
