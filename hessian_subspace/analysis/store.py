"""The result store: one results directory, written so that it survives crashes and its own
corrupted files.

Layout (every file written atomically: temporary file, fsync, rename; nothing pickled)::

    pipeline.json                the analysis (transforms, their configuration, the analyzer's
                                 settings, the data's fingerprint); a run with others is refused
    records/step_00000123.json   one record per checkpoint: every recorded output, status "ok"
                                 or "failed" with the reason, and ``files``: the path, size and
                                 SHA-256 of each array file below that belongs to it
    bases/step_00000123.npz      arrays a transform stored (``Stored`` outputs), one folder
    spectra/step_00000123.npz    per output key
    state/step_00000123.npz      the transforms' state after the checkpoint (for resuming)
    results.jsonl                all records, in step order
    quarantine/                  unreadable files, moved aside (never deleted)

A record is written after its array files, so a record on disk vouches for them. When a store is
opened (:meth:`ResultStore.check`), every record is parsed and every file it lists is checked
against its size and checksum; a record or file that fails is reported by path, moved to
``quarantine/``, and its step is computed again. ``results.jsonl`` is rebuilt whenever it
disagrees with ``records/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from hessian_subspace import _io, _tree

RECORDS, QUARANTINE, STATE = "records", "quarantine", "state"
JSONL, SETTINGS = "results.jsonl", "pipeline.json"
_STEP_FILE = re.compile(r"^step_(\d{8,})\.(json|npz)$")


class CorruptFile(RuntimeError):
    """A stored file could not be read (it has been moved to ``quarantine/``)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"unreadable stored file {path}: {reason}")
        self.path = path


def step_name(step: int, suffix: str) -> str:
    return f"step_{int(step):08d}.{suffix}"


def _diff(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{path}/{key}" if path else str(key))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        pairs = enumerate(zip(old, new, strict=True))
        return [d for i, (a, b) in pairs for d in _diff(a, b, f"{path}[{i}]")]
    return [] if old == new else [path or "(root)"]


class _Records:
    """What both stores answer from their index of records (``self.index``: step -> record)."""

    index: dict[int, dict]

    def steps(self, status: str | None = None) -> list[int]:
        """Steps with a record (with ``status`` "ok" or "failed" only, if given)."""
        return sorted(s for s, r in self.index.items()
                      if status is None or r.get("status") == status)

    def record(self, step: int) -> dict | None:
        return self.index.get(int(step))

    def records(self) -> list[dict]:
        """All records in step order."""
        return [self.index[s] for s in sorted(self.index)]


class ResultStore(_Records):
    """Reads and writes a results directory (see the module docstring).

    Args:
      directory: the results directory (created at the first write).
      writer: whether this process writes (in a multi-process analysis only process 0 does;
        the others read the same directory, which must be shared, and keep what this session
        computed in memory, so that every process takes the same decisions).
    """

    def __init__(self, directory: str | os.PathLike, *, writer: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        self.writer = bool(writer)
        self._index: dict[int, dict] | None = None
        self._session: dict[tuple[str, int], dict] = {}

    # ---- paths -----------------------------------------------------------------------------

    def record_path(self, step: int) -> str:
        return os.path.join(self.directory, RECORDS, step_name(step, "json"))

    def file_path(self, folder: str, step: int) -> str:
        return os.path.join(self.directory, folder, step_name(step, "npz"))

    # ---- reading ---------------------------------------------------------------------------

    def _record_files(self) -> dict[int, str]:
        folder = os.path.join(self.directory, RECORDS)
        if not os.path.isdir(folder):
            return {}
        out = {}
        for name in os.listdir(folder):
            m = _STEP_FILE.match(name)
            if m and m.group(2) == "json":
                out[int(m.group(1))] = os.path.join(folder, name)
        return out

    def _read_record(self, path: str, step: int) -> dict:
        with open(path) as f:
            record = json.load(f)
        if not isinstance(record, dict) or record.get("step") != step:
            raise ValueError(f"not the record of step {step}")
        return record

    @property
    def index(self) -> dict[int, dict]:
        """Step -> record of every readable record (loaded once; kept current by writes)."""
        if self._index is None:
            self._index = {}
            for step, path in sorted(self._record_files().items()):
                try:
                    self._index[step] = self._read_record(path, step)
                except (OSError, ValueError) as e:
                    logging.warning("unreadable record %s (%s); skipped", path, e)
        return self._index

    def stored_steps(self, folder: str) -> list[int]:
        """Steps whose successful record lists a file in ``folder``."""
        return sorted(s for s, r in self.index.items()
                      if r.get("status") == "ok" and folder in r.get("files", {}))

    def stored(self, folder: str, step: int) -> dict[str, np.ndarray] | None:
        """The arrays stored in ``folder`` at ``step`` (None if there are none).

        Raises:
          CorruptFile: the file cannot be read; it is moved to ``quarantine/`` (and at the next
            :meth:`check` its step is recomputed).
        """
        if (folder, int(step)) in self._session:
            return self._session[(folder, int(step))]
        record = self.index.get(int(step))
        if record is None or folder not in record.get("files", {}):
            return None
        path = os.path.join(self.directory, record["files"][folder]["path"])
        try:
            return _io.read_npz(path)
        except Exception as e:  # noqa: BLE001 - np.load raises many types for bad files
            self.quarantine(path, f"{type(e).__name__}: {e}")
            raise CorruptFile(path, f"{type(e).__name__}: {e}") from e

    # ---- checking --------------------------------------------------------------------------

    def quarantine(self, path: str, reason: str) -> str | None:
        """Moves ``path`` to ``quarantine/`` (keeping its relative path, with a time stamp) and
        logs why; returns the new path (None if the file is gone)."""
        if not os.path.exists(path):
            return None
        if not self.writer:  # process 0 moves it; this one only stops trusting it
            logging.warning("%s: %s", path, reason)
            return None
        rel = os.path.relpath(path, self.directory)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest = os.path.join(self.directory, QUARANTINE, f"{rel}.{stamp}")
        n = 1
        while os.path.exists(dest):
            dest = os.path.join(self.directory, QUARANTINE, f"{rel}.{stamp}.{n}")
            n += 1
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.move(path, dest)
        logging.warning("%s: %s; moved to %s, its step will be computed again", path, reason,
                        dest)
        return dest

    def check(self) -> list[str]:
        """Verifies the directory: every record readable and consistent, every file a record
        lists present with its size and SHA-256. Failures are moved to ``quarantine/`` (their
        steps then count as not done); ``results.jsonl`` is rebuilt if it disagrees.

        Returns:
          One line per problem found (also logged).
        """
        problems: list[str] = []
        self._index = {}
        for step, path in sorted(self._record_files().items()):
            try:
                record = self._read_record(path, step)
            except (OSError, ValueError) as e:
                problems.append(f"{path}: unreadable record ({type(e).__name__}: {e})")
                self.quarantine(path, problems[-1].split(": ", 1)[1])
                continue
            bad = self._bad_file(record)
            if bad:
                problems.append(bad)
                for entry in record.get("files", {}).values():
                    self.quarantine(os.path.join(self.directory, entry["path"]),
                                    "belongs to a record whose files are incomplete")
                self.quarantine(path, f"its file {bad}")
                continue
            self._index[step] = record
        if os.path.isdir(self.directory):
            self._sync_jsonl()
        return problems

    def _bad_file(self, record: dict) -> str | None:
        for entry in record.get("files", {}).values():
            path = os.path.join(self.directory, entry["path"])
            if not os.path.exists(path):
                return f"{path} is missing"
            size = os.path.getsize(path)
            if size != entry["bytes"]:
                return f"{path} has {size} bytes, its record says {entry['bytes']}"
            if _io.sha256(path) != entry["sha256"]:
                return f"{path} does not match its record's SHA-256"
        return None

    def _jsonl_text(self) -> str:
        return "".join(json.dumps(r) + "\n" for r in self.records())

    def _sync_jsonl(self) -> None:
        if not self.writer:
            return
        path = os.path.join(self.directory, JSONL)
        text = self._jsonl_text()
        try:
            with open(path) as f:
                if f.read() == text:
                    return
        except OSError:
            pass
        _io.write_text(path, text)

    # ---- writing ---------------------------------------------------------------------------

    def write_step(self, step: int, record: dict, stored: dict[str, dict]) -> dict:
        """Writes a checkpoint's array files, then its record (listing them), then
        ``results.jsonl``. Returns the record as written."""
        record = dict(record, step=int(step))
        files = {}
        for folder, arrays in stored.items():
            path = self.file_path(folder, step)
            if not self.writer:
                self._session[(folder, int(step))] = {k: np.asarray(v) for k, v in
                                                      arrays.items()}
                files[folder] = dict(path=os.path.relpath(path, self.directory))
                continue
            _io.write_npz(path, arrays)
            files[folder] = dict(path=os.path.relpath(path, self.directory),
                                 bytes=os.path.getsize(path), sha256=_io.sha256(path))
        if files:
            record["files"] = files
        record = _io.to_jsonable(record)
        if self.writer:
            _io.write_json(self.record_path(step), record)
        self.index[int(step)] = record
        self._sync_jsonl()
        return record

    def read_settings(self) -> dict | None:
        path = os.path.join(self.directory, SETTINGS)
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            self.quarantine(path, f"unreadable ({type(e).__name__}: {e})")
            return None

    def check_settings(self, settings: dict) -> None:
        """Raises `ValueError` if the directory holds results made with other settings."""
        old = self.read_settings()
        if old is None:
            return
        new = json.loads(json.dumps(settings))
        differ = _diff(old, new)
        if differ:
            raise ValueError(
                f"{self.directory} holds results made with other settings (they differ in "
                f"{', '.join(differ[:6])}{' ...' if len(differ) > 6 else ''}; see "
                f"{os.path.join(self.directory, SETTINGS)}); use another results directory")

    def write_settings(self, settings: dict) -> None:
        if self.writer and self.read_settings() is None:
            _io.write_json(os.path.join(self.directory, SETTINGS), settings)


class MemoryStore(_Records):
    """A :class:`ResultStore` kept in memory (``results_dir=None``): same interface, no files."""

    directory = None

    def __init__(self):
        self.index: dict[int, dict] = {}
        self._files: dict[tuple[str, int], dict] = {}

    def stored_steps(self, folder: str) -> list[int]:
        return sorted(s for (f, s) in self._files if f == folder
                      and self.index.get(s, {}).get("status") == "ok")

    def stored(self, folder: str, step: int) -> dict | None:
        return self._files.get((folder, int(step)))

    def check(self) -> list[str]:
        return []

    def write_step(self, step: int, record: dict, stored: dict[str, dict]) -> dict:
        record = _io.to_jsonable(dict(record, step=int(step)))
        for folder, arrays in stored.items():
            self._files[(folder, int(step))] = {k: np.asarray(v) for k, v in arrays.items()}
        self.index[int(step)] = record
        return record

    def check_settings(self, settings: dict) -> None:
        pass

    def write_settings(self, settings: dict) -> None:
        pass


def read_results(directory: str | os.PathLike) -> list[dict]:
    """Every readable record of a results directory, in step order (for plots and notebooks;
    reads only: unreadable records are skipped with a warning)."""
    return ResultStore(directory).records()


# Outputs of transforms as they go into records.

MAX_RECORDED = 100_000


def recordable(transform: str, key: str, value: Any) -> Any:
    """An output as it goes into the record (numbers, short arrays, dicts of them)."""
    size = sum(np.size(x) for x in jax.tree_util.tree_leaves(value)
               if hasattr(x, "shape") or isinstance(x, (list, tuple)))
    if size > MAX_RECORDED:
        raise ValueError(f"output {key!r} of transform {transform!r} holds {size} numbers; "
                         "return it as analysis.Stored(...) or list it in `context_only`")
    return host_values(value)


def host_values(value: Any) -> Any:
    """Device arrays in ``value`` as host arrays; dicts keep their key order (which
    ``tree_map`` would sort: the order of layers in a record is the parameters' order)."""
    if isinstance(value, jax.Array):
        return _tree.to_host(value)
    if isinstance(value, dict):
        return type(value)((k, host_values(v)) for k, v in value.items())
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(host_values(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(host_values(v) for v in value)
    return jax.tree_util.tree_map(
        lambda x: _tree.to_host(x) if isinstance(x, jax.Array) else x, value)
