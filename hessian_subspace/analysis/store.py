"""The result store: one results directory, written so that it survives crashes and its own
corrupted files.

Layout (every file written atomically: temporary file, fsync, rename; nothing pickled)::

    pipeline.json                the analysis (transforms, their configuration, the analyzer's
                                 settings, the data's fingerprint); a run with others is refused
    records/step_00000123.json   one record per checkpoint: every recorded output, status "ok"
                                 or "failed" with the reason, ``fingerprints`` of what it was
                                 computed from (checkpoint content, loss, data, settings:
                                 :mod:`.fingerprints`), ``state_from`` (the step whose
                                 transform state it started from, and that state's content
                                 fingerprint), and ``files``: the path,
                                 size, SHA-256 and content fingerprint of each array file below
    spectra/step_00000123.npz    arrays a transform stored (``Stored`` outputs), one folder
                                 per output key
    state/step_00000123.json     the transforms' state after the checkpoint, by name
                                 (:mod:`.state`): each array's file, size and SHA-256
    state/arrays/<content>.npy   those arrays, one file per distinct content (a reference
                                 basis kept by every later state is stored once)
    results.jsonl                all records in step order (appended; rewritten on repair)
    quarantine/                  unreadable files, moved aside (never deleted)
    replaced/                    records set aside by ``overwrite=True`` (never deleted)

A record is written after its array files, so a record on disk vouches for them. When a store is
opened (:meth:`ResultStore.open`), every record is parsed and every file it lists is checked
against its size and checksum; a record or file that fails is reported by path, moved to
``quarantine/``, and its step is computed again; temporary files of killed writes are removed.
``results.jsonl`` is rebuilt whenever it disagrees with ``records/``. A record is reused only
when its fingerprints match the analysis asking for it (:meth:`ResultStore.stale_reasons`) and
the state it started from is still that of the analysed checkpoint before it
(:meth:`ResultStore.outdated_reasons`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import time
from typing import Any

import numpy as np
from absl import logging

from hessian_subspace import _io
from hessian_subspace.analysis import fingerprints as fp

RECORDS, QUARANTINE, STATE, REPLACED = "records", "quarantine", "state", "replaced"
ARRAYS = os.path.join(STATE, "arrays")  # the state's arrays, named by their content
JSONL, SETTINGS = "results.jsonl", "pipeline.json"
_STEP_FILE = re.compile(r"^step_(\d{8,})\.(json|npz)$")
# What a record's fingerprints name, in the words of the error messages.
_WHAT = dict(checkpoint="the checkpoint's content (parameters or model state) differs",
             loss="the loss differs (its jaxpr on the analysis batch, or a constant in it)",
             data="the analysis data differ", settings="the analysis settings differ",
             extras="the checkpoint's extras differ (the optimizer state or the next batch "
                    "the transforms read)")


class CorruptFile(RuntimeError):
    """A stored file could not be read (it has been moved to ``quarantine/``)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"unreadable stored file {path}: {reason}")
        self.path = path


class StaleResultsError(ValueError):
    """A results directory holds records of other inputs than the analysis asking for them
    (other checkpoint content, loss, data or settings): they are not reused, and not silently
    replaced. Use another results directory, or ``overwrite=True`` (``--overwrite``)."""


def settings_fingerprint(settings: dict) -> str:
    """The fingerprint of the analysis settings (``pipeline.json`` without the data)."""
    return fp.json_content({k: v for k, v in settings.items() if k != "data"})


def stale_message(what: str, directory: str | None) -> str:
    """The error for results computed from other inputs (``what`` says which and how), with
    the two ways out."""
    aside = (f"the old records are moved to {os.path.join(directory, REPLACED)}" if directory
             else "the old records are dropped")
    return (f"{what}. They are not reused. Use another results directory, or overwrite=True "
            f"(--overwrite) to compute them again ({aside}).")


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
        self._jsonl_stale = True  # until checked against the records
        self._jsonl_steps: set[int] = set()  # steps whose record results.jsonl holds
        self._verified: set[str] = set()  # state arrays checked against their SHA-256

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

    def stored(self, folder: str, step: int) -> dict[str, np.ndarray] | None:
        """The arrays stored in ``folder`` at ``step`` (None if there are none).

        Raises:
          CorruptFile: the file cannot be read; it is moved to ``quarantine/`` (and at the next
            :meth:`check` its step is recomputed).
        """
        _check_folder(folder)
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

    def state(self, step: int, prefix: str = "") -> dict[str, np.ndarray] | None:
        """The transforms' state after ``step`` as named arrays (:func:`.state.named`; rebuild
        the pytrees with :func:`.state.rebuild`), or None if its record lists none; with
        ``prefix``, only the arrays whose names start with it (the others are not read).
        E.g. ``store.state(t, "eigenpairs/")["eigenpairs/eigenvectors"]`` is the basis
        computed at step t.

        Raises:
          CorruptFile: the state's list or one of its arrays cannot be read; the file is moved
            to ``quarantine/`` (and at the next :meth:`check` its step is recomputed).
        """
        if (STATE, int(step)) in self._session:
            return _starting(self._session[(STATE, int(step))], prefix)
        record = self.index.get(int(step))
        if record is None or STATE not in record.get("files", {}):
            return None
        path = os.path.join(self.directory, record["files"][STATE]["path"])
        expected = record["files"][STATE]
        out = {}
        try:
            for name, entry in _starting(_read_manifest(path), prefix).items():
                path, expected = os.path.join(self.directory, entry["path"]), entry
                with open(path, "rb") as f:
                    out[name] = np.load(f, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - np.load raises many types for bad files
            reason = f"{type(e).__name__}: {e}"
            # Arrays are shared by the states of many steps: only a file that fails its size
            # or SHA-256 is moved aside (a read error of a good file is raised, nothing moved).
            if _bad_bytes(path, expected):
                self.quarantine(path, reason)
                self._verified.discard(path)
            else:
                reason += " (the file matches its SHA-256; left in place)"
            raise CorruptFile(path, reason) from e
        return out

    # ---- checking --------------------------------------------------------------------------

    def quarantine(self, path: str, reason: str,
                   then: str = "its step will be computed again") -> str | None:
        """Moves ``path`` to ``quarantine/`` (keeping its relative path, with a time stamp) and
        logs why and what happens ``then``; returns the new path (None if the file is gone)."""
        return self._move(path, QUARANTINE, reason, then, logging.warning)

    def _move(self, path: str, folder: str, reason: str, then: str, log) -> str | None:
        if not os.path.exists(path):
            return None
        if not self.writer:  # process 0 moves it; this one only stops trusting it
            log("%s: %s", path, reason)
            return None
        rel = os.path.relpath(path, self.directory)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest = os.path.join(self.directory, folder, f"{rel}.{stamp}")
        n = 1
        while os.path.exists(dest):
            dest = os.path.join(self.directory, folder, f"{rel}.{stamp}.{n}")
            n += 1
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.move(path, dest)
        log("%s: %s; moved to %s, %s", path, reason, dest, then)
        return dest

    def set_aside(self, step: int, reason: str) -> None:
        """Moves the record of ``step`` and its files to ``replaced/`` (``overwrite=True``)."""
        record = self.index.pop(int(step), None)
        for key in list(self._session):
            if key[1] == int(step):
                del self._session[key]
        if record is None:
            return
        for entry in record.get("files", {}).values():
            self._move(os.path.join(self.directory, entry["path"]), REPLACED, reason,
                       "replaced", logging.info)
        self._move(self.record_path(step), REPLACED, reason,
                   "its step will be computed again", logging.warning)
        self._jsonl_stale = True

    def check(self) -> list[str]:
        """Verifies the directory: every record readable and consistent, every file a record
        lists present with its size and SHA-256. Failures are moved to ``quarantine/`` (their
        steps then count as not done); ``results.jsonl`` is rebuilt if it disagrees.

        Returns:
          One line per problem found (also logged).
        """
        problems: list[str] = []
        self._index = {}
        self._verified = set()
        self._remove_dead_temporaries()
        for step, path in sorted(self._record_files().items()):
            try:
                record = self._read_record(path, step)
            except (OSError, ValueError) as e:
                problems.append(f"{path}: unreadable record ({type(e).__name__}: {e})")
                self.quarantine(path, problems[-1].split(": ", 1)[1])
                continue
            bad = self._bad_file(record) or self._bad_state(record)
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

    def _remove_dead_temporaries(self) -> None:
        """Deletes the temporary files of writes whose process is gone (killed mid-write);
        those of live writers (another analysis into this directory) stay."""
        if not self.writer or not os.path.isdir(self.directory):
            return
        for root, _, names in os.walk(self.directory):
            if os.path.relpath(root, self.directory).split(os.sep)[0] in (QUARANTINE,
                                                                          REPLACED):
                continue
            for name in names:
                if name.startswith(_io.TMP_PREFIX) and not _io.temporary_in_use(name, root):
                    path = os.path.join(root, name)
                    try:
                        os.remove(path)
                    except OSError:
                        continue
                    logging.info("removed %s, left by a killed write", path)

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

    def _bad_state(self, record: dict) -> str | None:
        """What is wrong with the arrays of a record's state (None: nothing). A bad array is
        moved to ``quarantine/`` here; good ones stay (other steps' states share them)."""
        entry = record.get("files", {}).get(STATE)
        if entry is None or "bytes" not in entry or not entry["path"].endswith(".json"):
            return None  # none, or a record of layout 3 (state/step_X.npz, checked as a file)
        manifest = os.path.join(self.directory, entry["path"])
        try:
            arrays = _read_manifest(manifest)
        except (OSError, ValueError) as e:
            return f"{manifest} is unreadable ({type(e).__name__}: {e})"
        for item in arrays.values():
            path = os.path.join(self.directory, item["path"])
            if path in self._verified:
                continue
            if _bad_bytes(path, item):
                self.quarantine(path, "does not match its size or SHA-256")  # if it exists
                return f"{path} (state) is missing or does not match its size or SHA-256"
            self._verified.add(path)
        return None

    def _jsonl_text(self) -> str:
        return "".join(json.dumps(r) + "\n" for r in self.records())

    def _sync_jsonl(self) -> None:
        """Rewrites ``results.jsonl`` (atomically) if it is not the records in step order."""
        self._jsonl_stale = False
        self._jsonl_steps = set(self.index)
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

    def _append_jsonl(self, step: int, record: dict) -> None:
        """Appends a new last step's record to ``results.jsonl``; anything else (a step
        replaced, one before the last) compacts the file instead."""
        if not self.writer:
            return
        path = os.path.join(self.directory, JSONL)
        if (self._jsonl_stale or step in self._jsonl_steps or not os.path.exists(path)
                or any(s > step for s in self.index)):
            self._sync_jsonl()
        else:
            _io.append_line(path, json.dumps(record))
            self._jsonl_steps.add(int(step))

    # ---- writing ---------------------------------------------------------------------------

    def write_step(self, step: int, record: dict, stored: dict[str, dict],
                   state: dict[str, Any] | None = None) -> dict:
        """Writes a checkpoint's array files and its transforms' ``state`` (named arrays,
        :func:`.state.named`), then its record (listing them), then ``results.jsonl``.
        Returns the record as written."""
        record = dict(record, step=int(step))
        files = {}
        if state:
            files[STATE] = self._write_state(step, state)
        for folder, arrays in stored.items():
            path = self.file_path(folder, step)
            content = fp.arrays_content(arrays)  # the same on every process
            if not self.writer:
                self._session[(folder, int(step))] = {k: np.asarray(v) for k, v in
                                                      arrays.items()}
                files[folder] = dict(path=os.path.relpath(path, self.directory),
                                     content=content)
                continue
            _io.write_npz(path, arrays)
            files[folder] = dict(path=os.path.relpath(path, self.directory),
                                 bytes=os.path.getsize(path), sha256=_io.sha256(path),
                                 content=content)
        if files:
            record["files"] = files
        record = _io.to_jsonable(record)
        if self.writer:
            _io.write_json(self.record_path(step), record)
        self.index[int(step)] = record
        self._append_jsonl(step, record)
        return record

    def _write_state(self, step: int, arrays: dict[str, Any]) -> dict:
        """Writes each array of a state once (by content) and the list naming them."""
        path = os.path.join(self.directory, STATE, step_name(step, "json"))
        content = fp.arrays_content(arrays)  # the same on every process
        if not self.writer:
            self._session[(STATE, int(step))] = {k: np.asarray(v) for k, v in arrays.items()}
            return dict(path=os.path.relpath(path, self.directory), content=content)
        manifest = {name: self._write_array(arrays[name]) for name in sorted(arrays)}
        _io.write_json(path, manifest)
        return dict(path=os.path.relpath(path, self.directory), bytes=os.path.getsize(path),
                    sha256=_io.sha256(path), content=content)

    def _write_array(self, value: Any) -> dict:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(value), allow_pickle=False)
        data = buffer.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        path = os.path.join(self.directory, ARRAYS, f"{digest}.npy")
        if path not in self._verified or not os.path.exists(path):
            if os.path.exists(path) and _io.sha256(path) != digest:
                self.quarantine(path, "does not match its name (its SHA-256)", "written anew")
            if not os.path.exists(path):
                _io.atomic_write(path, lambda f: f.write(data))
            self._verified.add(path)
        return dict(path=os.path.relpath(path, self.directory), bytes=len(data), sha256=digest)

    def read_settings(self) -> dict | None:
        """``pipeline.json`` (None if there is none, or if it is unreadable: then it is moved to
        ``quarantine/`` and :meth:`open` rebuilds it from the records)."""
        path = os.path.join(self.directory, SETTINGS)
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                settings = json.load(f)
            if not isinstance(settings, dict):
                raise ValueError("not a JSON object")
            return settings
        except (OSError, ValueError) as e:
            self.quarantine(path, f"unreadable ({type(e).__name__}: {e})",
                            "the settings will be rebuilt from the records that match them")
            return None

    def open(self, settings: dict, *, overwrite: bool = False) -> list[str]:
        """Opens the directory for an analysis with ``settings``: verifies every record and
        file (:meth:`check`), and refuses results of other settings.

        ``pipeline.json`` must equal ``settings``; if it is missing or unreadable while records
        exist, each record's settings fingerprint must match, and ``pipeline.json`` is written
        anew. With ``overwrite``, records of other settings are moved to ``replaced/``
        instead.

        Returns:
          One line per problem :meth:`check` found.

        Raises:
          StaleResultsError: the directory holds results of other settings (nothing is changed
            in it: checked before anything is moved).
        """
        old = self.read_settings()
        new = json.loads(json.dumps(settings))
        if old is not None:
            differ = _diff(old, new)
            if differ:
                fields = f"{', '.join(differ[:6])}{' ...' if len(differ) > 6 else ''}"
                if not overwrite:
                    raise StaleResultsError(stale_message(
                        f"{self.directory} holds results made with other settings (they differ "
                        f"in {fields}; see {os.path.join(self.directory, SETTINGS)})",
                        self.directory))
                self._set_aside_all(f"settings differ in {fields} (overwrite=True)")
        problems = self.check()
        if old is None and self.index:
            expected = settings_fingerprint(new)
            stale = [s for s, r in self.index.items()
                     if (r.get("fingerprints") or {}).get("settings") != expected]
            if stale and not overwrite:
                raise StaleResultsError(stale_message(
                    f"{self.directory} has no readable {SETTINGS}, and the records of steps "
                    f"{_steps_text(stale)} were made with other settings than these (or carry "
                    "no fingerprints)", self.directory))
            for step in stale:
                self.set_aside(step, "made with other settings (overwrite=True)")
            if self.writer and self.index:
                _io.write_json(os.path.join(self.directory, SETTINGS), settings)
                logging.warning("%s: rebuilt from the %d records made with these settings",
                                os.path.join(self.directory, SETTINGS), len(self.index))
            if stale:
                self._sync_jsonl()
        return problems

    def _set_aside_all(self, reason: str) -> None:
        self.check()
        for step in list(self.index):
            self.set_aside(step, reason)
        self._move(os.path.join(self.directory, SETTINGS), REPLACED, reason,
                   "written anew", logging.warning)
        for folder in (STATE,):
            path = os.path.join(self.directory, folder)
            if os.path.isdir(path):
                for name in os.listdir(path):
                    self._move(os.path.join(path, name), REPLACED, reason, "replaced",
                               logging.info)
        self._verified = set()  # the state's arrays are in replaced/ now
        self._sync_jsonl()

    def write_settings(self, settings: dict) -> None:
        if self.writer and not os.path.exists(os.path.join(self.directory, SETTINGS)):
            _io.write_json(os.path.join(self.directory, SETTINGS), settings)

    # ---- reuse -----------------------------------------------------------------------------

    def content(self, folder: str, step: int) -> str | None:
        """The content fingerprint of the arrays stored in ``folder`` at ``step``."""
        record = self.index.get(int(step)) or {}
        return (record.get("files", {}).get(folder) or {}).get("content")

    def stale_reasons(self, record: dict, fingerprints: dict) -> list[str]:
        """What differs between the inputs a record was computed from and ``fingerprints``
        (empty: it may be reused)."""
        have = record.get("fingerprints")
        if not isinstance(have, dict):
            return ["the record carries no fingerprints (written by an older version)"]
        return [_WHAT.get(key, key) for key in ("checkpoint", "loss", "data", "settings",
                                                "extras")
                if have.get(key) != fingerprints.get(key)]

    def outdated_reasons(self, record: dict) -> list[str]:
        """Why a record that matches its inputs must still be computed again: its outputs
        depend on the transforms' state (``state_from.values``), and the analysed checkpoint
        before it is now another one (a step analysed since, or one set aside), or that
        checkpoint's state changed (it was recomputed)."""
        source = record.get("state_from")
        if not source or not source.get("values"):
            return []
        before = [s for s in self.steps("ok") if s < record["step"]]
        last = before[-1] if before else None
        if last != source.get("step"):
            if last is None or (source.get("step") is not None and last < source["step"]):
                return [f"it started from step {source.get('step')}'s state, which is no "
                        "longer analysed"]
            return [f"step {last} was analysed since: its state comes before this step's"]
        if last is not None and self.content(STATE, last) != source.get("content"):
            return [f"step {last}'s state changed since (that step was computed again)"]
        return []


def _check_folder(folder: str) -> None:
    if folder in (RECORDS, STATE, QUARANTINE, REPLACED):
        raise ValueError(f"{folder!r} is not a folder of published arrays"
                         + ("; the transforms' state is ResultStore.state(step)"
                            if folder == STATE else ""))


def _bad_bytes(path: str, entry: dict) -> bool:
    """Whether ``path`` is missing or differs from its listed size or SHA-256."""
    try:
        return (os.path.getsize(path) != entry.get("bytes")
                or _io.sha256(path) != entry.get("sha256"))
    except OSError:
        return True


def _starting(named: dict, prefix: str) -> dict:
    return {k: v for k, v in named.items() if k.startswith(prefix)}


def _read_manifest(path: str) -> dict[str, dict]:
    """A state's list of arrays: name -> ``{"path", "bytes", "sha256"}`` (checked)."""
    with open(path) as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("path"), str)
            and os.path.dirname(e["path"]) == ARRAYS for e in manifest.values()):
        raise ValueError("not a list of state arrays")
    return manifest


def _steps_text(steps: list[int]) -> str:
    steps = sorted(steps)
    return str(steps) if len(steps) <= 8 else f"{steps[:4]} ... {steps[-2:]} ({len(steps)})"


class MemoryStore(_Records):
    """A :class:`ResultStore` kept in memory (``results_dir=None``): same interface, no files."""

    directory = None

    def __init__(self):
        self.index: dict[int, dict] = {}
        self._files: dict[tuple[str, int], dict] = {}

    content = ResultStore.content
    stale_reasons = ResultStore.stale_reasons
    outdated_reasons = ResultStore.outdated_reasons

    def set_aside(self, step: int, reason: str) -> None:
        self.index.pop(int(step), None)
        for key in [key for key in self._files if key[1] == int(step)]:
            del self._files[key]

    def stored(self, folder: str, step: int) -> dict | None:
        _check_folder(folder)
        return self._files.get((folder, int(step)))

    def state(self, step: int, prefix: str = "") -> dict | None:
        state = self._files.get((STATE, int(step)))
        return None if state is None else _starting(state, prefix)

    def check(self) -> list[str]:
        return []

    def write_step(self, step: int, record: dict, stored: dict[str, dict],
                   state: dict[str, Any] | None = None) -> dict:
        record = dict(record, step=int(step))
        files = {}
        for folder, arrays in dict(stored, **({STATE: state} if state else {})).items():
            self._files[(folder, int(step))] = {k: np.asarray(v) for k, v in arrays.items()}
            files[folder] = dict(content=fp.arrays_content(arrays))
        if files:
            record["files"] = files
        record = _io.to_jsonable(record)
        self.index[int(step)] = record
        return record

    def open(self, settings: dict, *, overwrite: bool = False) -> list[str]:
        return []

    def write_settings(self, settings: dict) -> None:
        pass


def read_results(directory: str | os.PathLike) -> list[dict]:
    """Every readable record of a results directory, in step order (for plots and notebooks;
    reads only: unreadable records are skipped with a warning)."""
    return ResultStore(directory).records()
