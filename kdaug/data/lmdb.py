"""Sharded frame LMDBs in the OC20 S2EF layout, readable by fairchem's `LmdbDataset`.

Tree written by `LmdbWriter(out_dir, stem="data")`:

    out_dir/
      data.0000.lmdb        b"0", b"1", ... -> pickled torch_geometric Data (one frame each)
                            b"length"      -> pickled int, number of frames in this file
                            b"kdaug:stats" -> pickled running statistics (for the manifest)
                            b"kdaug:done:<key>" -> markers of finished work units (resume)
                            b"kdaug:options" -> JSON of the options that shape the data (resume check)
      data.0001.lmdb        a new file every `frames_per_file` frames
      manifest.json         counts per origin, element histogram, creation args, data options, versions
      metadata.npz          natoms per entry of every *.lmdb here, in fairchem's order (kdaug.data.metadata)
      .data.natoms          natoms of this stem's frames, int32, appended with each batch
      .data.lock            flock held by the one writer of this stem (pid, host, command inside)

A writer with another stem (one per generation shard) writes `<stem>.NNNN.lmdb`
and `manifest.<stem>.json` into the same directory; fairchem reads every
`*.lmdb` there as one dataset. Each `write_batch` is one transaction, so a crash
loses at most the batch being written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch
from torch_geometric.data import Batch, Data

from kdaug.data.convert import data_energy_forces, data_to_frame, frame_to_data
from kdaug.data.entries import decode_entry, entry_error
from kdaug.data.lmdb_file import check_lmdb_file, damaged
from kdaug.data.metadata import read_natoms, remove_metadata, stored_length, write_metadata, write_natoms
from kdaug.data.output_lock import OutputLock
from kdaug.data.run_record import atomic_write, check_resume, to_json
from kdaug.errors import KdaugError, write_error
from kdaug.types import Frame

LENGTH_KEY = b"length"
STATS_KEY = b"kdaug:stats"
DONE_PREFIX = b"kdaug:done:"
OPTIONS_KEY = b"kdaug:options"
_VERSIONED_PACKAGES = ("kdaug", "torch", "fairchem-core", "fairchem-data-oc", "ase", "chgnet", "lmdb")


def _empty_stats() -> dict[str, Any]:
    return {"n_frames": 0, "origins": Counter(), "elements": Counter(), "counters": Counter()}


def _merge_stats(total: dict[str, Any], part: dict[str, Any]) -> None:
    total["n_frames"] += part["n_frames"]
    for key in ("origins", "elements", "counters"):
        total[key].update(part[key])


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def manifest_name(stem: str) -> str:
    return "manifest.json" if stem == "data" else f"manifest.{stem}.json"


class LmdbWriter:
    """Appends frames to `<out_dir>/<stem>.NNNN.lmdb`, resuming files that already exist.

    Holds an exclusive lock on (out_dir, stem) while open: a second writer on the same output stops with
    a `KdaugError` naming the holder. `data_options` are the options that shape the data (seed, teacher,
    ...): the first transaction of each file records them, and resuming with different ones (or into
    another stem of the directory made with different ones) is refused before anything is written.

    Args:
        out_dir: output directory (created if missing).
        stem: file name stem; one writer per stem at a time.
        frames_per_file: start a new file once the current one holds this many frames.
        map_size: initial LMDB map size in bytes; doubled whenever a batch does not fit.
        creation_args: recorded in the manifest (e.g. the CLI arguments).
        data_options: JSON-able options that shape the data; None: no check (and none recorded).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        stem: str = "data",
        frames_per_file: int = 250_000,
        map_size: int = 1 << 28,
        creation_args: dict[str, Any] | None = None,
        data_options: dict[str, Any] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.stem = stem
        self.frames_per_file = frames_per_file
        self.creation_args = creation_args or {}
        self.data_options = to_json(data_options) if data_options is not None else None
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            msg = f"--out {self.out_dir}: cannot write there ({err.strerror})"
            raise KdaugError(msg) from err
        self._lock = OutputLock(self.out_dir, stem)
        self._env: lmdb.Environment | None = None
        self._opened = False
        try:
            self._initial_map_size = map_size
            self._files = sorted(self.out_dir.glob(f"{re.escape(stem)}.[0-9][0-9][0-9][0-9].lmdb"))
            for file in self._files:
                if file.stat().st_size:
                    check_lmdb_file(file)
            self._file_index = len(self._files) - 1 if self._files else 0
            if self.data_options is not None:
                self._check_siblings()
            self._open(self._file_index)
            if self.data_options is not None:
                self._check_resume()
            self._lengths = [stored_length(self._path(i)) for i in range(self._file_index)]
            self._sync_natoms()
            remove_metadata(self.out_dir)
            self._opened = True
        except BaseException:
            self.close()
            raise

    # -- files -----------------------------------------------------------------
    def _path(self, index: int) -> Path:
        return self.out_dir / f"{self.stem}.{index:04d}.lmdb"

    def _open(self, index: int) -> None:
        if self._env is not None:
            self._env.close()
        path = self._path(index)
        map_size = max(self._initial_map_size, path.stat().st_size * 2 if path.exists() else 0)
        try:
            self._env = lmdb.open(str(path), subdir=False, map_size=map_size, meminit=False, map_async=False)
        except lmdb.Error as err:
            raise self._write_failed(path, err, 0) from err
        self._file_index = index
        with self._env.begin() as txn:
            self._length = _read_value(txn, LENGTH_KEY, path, 0)
            self._stats = _read_value(txn, STATS_KEY, path, None) or _empty_stats()
            raw_options = read_key(txn, OPTIONS_KEY, path)
            try:
                self._stored_options = json.loads(raw_options) if raw_options else None
                if not isinstance(self._stored_options, dict | None):
                    raise ValueError(f"key {OPTIONS_KEY.decode()} holds no mapping")
                cursor = txn.cursor()
                self._has_done = cursor.set_range(DONE_PREFIX) and cursor.key().startswith(DONE_PREFIX)
            except (ValueError, lmdb.Error) as err:
                raise damaged(path, str(err)) from err

    def _sync_natoms(self) -> None:
        """Bring `.<stem>.natoms` level with the frames (a run killed between a commit and its append, or an
        output written before the record existed): the missing natoms are read from the entries."""
        record = read_natoms(self.out_dir, self.stem)
        lengths = [*self._lengths, self._length]
        if len(record) > sum(lengths):
            write_natoms(self.out_dir, self.stem, record[: sum(lengths)], append=False)
        missing, start = [], 0
        for index, length in enumerate(lengths):
            first = max(len(record) - start, 0)
            if first < length:
                path = self._path(index)
                env = self._env if index == self._file_index else _open_readonly(path)
                with env.begin() as txn:
                    missing += [len(decode_entry(path, str(key), read_key(txn, str(key).encode(), path)).pos)
                                for key in range(first, length)]
                if env is not self._env:
                    env.close()
            start += length
        if missing or not record.size:
            write_natoms(self.out_dir, self.stem, np.array(missing, dtype=np.int32), append=True)

    def _check_siblings(self) -> None:
        """Refuse to join a directory whose other stems (shards) were made with other data options."""
        for manifest in sorted(self.out_dir.glob("manifest*.json")):
            if manifest.name != manifest_name(self.stem):
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    self._compare(manifest.name, json.loads(manifest.read_text()).get("data_options"))

    def _check_resume(self) -> None:
        """Refuse to resume this stem if it was made with other data options."""
        where = self._path(self._file_index)
        if self._stored_options is None and (self._length or self._has_done):
            msg = (f"--out {self.out_dir}: {where.name} holds {self._length} frames without a record of the "
                   "options that made them, so they cannot be resumed safely; write to a new --out")
            raise KdaugError(msg)
        self._compare(where.name, self._stored_options)

    def _compare(self, source: str, stored: dict[str, Any] | None) -> None:
        if stored is not None:
            check_resume(f"--out {self.out_dir}", stored, self.data_options, kind=f"data options ({source})")

    # -- writing -----------------------------------------------------------------
    def write_batch(
        self,
        frames: Sequence[Frame],
        *,
        done: Iterable[str] = (),
        counters: dict[str, int] | None = None,
    ) -> None:
        """Write frames, done-markers and counters in one transaction (all or nothing)."""
        if self._length >= self.frames_per_file and frames:
            self._lengths.append(self._length)
            self._open(self._file_index + 1)
        payload = [pickle.dumps(frame_to_data(f), protocol=pickle.HIGHEST_PROTOCOL) for f in frames]
        stats = pickle.loads(pickle.dumps(self._stats))
        stats["n_frames"] += len(frames)
        for frame in frames:
            stats["origins"][frame.provenance.origin] += 1
            stats["elements"].update(int(z) for z in frame.atomic_numbers)
        stats["counters"].update(counters or {})
        done = list(done)
        record_options = self.data_options is not None and self._stored_options is None
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for offset, value in enumerate(payload):
                        txn.put(str(self._length + offset).encode("ascii"), value)
                    for key in done:
                        txn.put(DONE_PREFIX + key.encode(), b"1")
                    txn.put(LENGTH_KEY, pickle.dumps(self._length + len(payload)))
                    txn.put(STATS_KEY, pickle.dumps(stats))
                    if record_options:
                        txn.put(OPTIONS_KEY, json.dumps(self.data_options, sort_keys=True).encode())
                break
            except lmdb.MapFullError:
                self._env.set_mapsize(self._env.info()["map_size"] * 2)
            except lmdb.Error as err:
                raise self._write_failed(self._path(self._file_index), err, sum(map(len, payload))) from err
        self._length += len(payload)
        self._stats = stats
        if record_options:
            self._stored_options = self.data_options
        write_natoms(self.out_dir, self.stem, np.array([f.n_atoms for f in frames], dtype=np.int32), append=True)
        self.write_manifest()

    def _write_failed(self, path: Path, err: lmdb.Error, n_bytes: int) -> KdaugError:
        # LMDB reports a short write as EIO; a full disk is the usual reason.
        if shutil.disk_usage(self.out_dir).free < n_bytes + (1 << 20):
            return write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return KdaugError(f"cannot write {path} ({err})")

    def done_keys(self) -> set[str]:
        """Keys of finished work units recorded by `write_batch(done=...)` in any file of this stem."""
        keys: set[str] = set()
        for index in range(self._file_index + 1):
            env = self._env if index == self._file_index else _open_readonly(self._path(index))
            with env.begin() as txn, _reading(self._path(index)):
                cursor = txn.cursor()
                if cursor.set_range(DONE_PREFIX):
                    for key, _ in cursor:
                        if not key.startswith(DONE_PREFIX):
                            break
                        keys.add(key[len(DONE_PREFIX) :].decode())
            if env is not self._env:
                env.close()
        return keys

    def stats(self) -> dict[str, Any]:
        """Statistics over every file of this stem."""
        total = _empty_stats()
        for index in range(self._file_index):
            path = self._path(index)
            env = _open_readonly(path)
            with env.begin() as txn:
                _merge_stats(total, _read_value(txn, STATS_KEY, path, None) or _empty_stats())
            env.close()
        _merge_stats(total, self._stats)
        return total

    def write_manifest(self) -> Path:
        stats = self.stats()
        manifest = {
            "n_frames": stats["n_frames"],
            "files": [self._path(i).name for i in range(self._file_index + 1)],
            "origins": dict(stats["origins"]),
            "elements": {str(z): n for z, n in sorted(stats["elements"].items())},
            "counters": dict(stats["counters"]),
            "creation_args": self.creation_args,
            "data_options": self._stored_options,
            "versions": package_versions(),
        }
        path = self.out_dir / manifest_name(self.stem)
        atomic_write(path, json.dumps(manifest, indent=2, sort_keys=True, default=str))
        return path

    def close(self) -> None:
        """Close the file and the lock; then write `metadata.npz` if this was the last writer of the directory."""
        if self._env is not None:
            self._env.close()
            self._env = None
        self._lock.release()
        if self._opened:
            self._opened = False
            write_metadata(self.out_dir, {self._path(i): n for i, n in enumerate([*self._lengths, self._length])},
                           self.stem)

    def __enter__(self) -> LmdbWriter:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        try:  # committed frames are whole, so metadata.npz is written after an error too; that error wins
            self.close()
        except (KdaugError, OSError):
            if exc_type is None:
                raise


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """LMDB's own corruption reports (MDB_CORRUPTED, MDB_PAGE_NOTFOUND) as one line naming the file."""
    try:
        yield
    except lmdb.Error as err:
        raise damaged(path, str(err)) from err


def read_key(txn: lmdb.Transaction, key: bytes, path: Path) -> bytes | None:
    """The raw value under `key` (None if absent); LMDB's corruption reports are one line naming `path`."""
    with _reading(path):
        return txn.get(key)


def _read_value(txn: lmdb.Transaction, key: bytes, path: Path, default: Any) -> Any:
    """The pickled value under a bookkeeping key (length: int, stats: dict), or `default` if absent."""
    raw = read_key(txn, key, path)
    if raw is None:
        return default
    kind = int if key == LENGTH_KEY else dict
    try:
        value = pickle.loads(raw)
    except Exception as err:  # any unpickling failure means damage
        msg = f"{path}: key {key.decode()} is damaged (cannot unpickle: {type(err).__name__})"
        raise KdaugError(msg) from err
    if not isinstance(value, kind) or (kind is int and value < 0):
        msg = f"{path}: key {key.decode()} is damaged (holds {type(value).__name__} {str(value)[:40]!r})"
        raise KdaugError(msg)
    return value


# -- reading ---------------------------------------------------------------------
def _open_readonly(path: Path) -> lmdb.Environment:
    # lock=False: reading never writes a lock file next to the input.
    return lmdb.open(str(path), subdir=False, readonly=True, lock=False, readahead=False, meminit=False)


# py-lmdb refuses to open one file twice in a process, so readers of the same file (a training set and
# a validation set naming one LMDB, two datasets over one path) share one environment, counted per user.
_SHARED: dict[tuple[int, Path], list] = {}


def _drop_inherited() -> None:
    """Close the environments a forked process (a DataLoader worker) inherited from its parent.

    py-lmdb refuses to open a file whose inherited environment is still open ("already open in this
    process"), and LMDB forbids using an environment across fork, so the child closes its copies and
    opens its own; the parent's environments are untouched.
    """
    pid = os.getpid()
    for key in [key for key in _SHARED if key[0] != pid]:
        _SHARED.pop(key)[0].close()


def acquire_env(file: Path) -> lmdb.Environment:
    """The process's read-only environment of `file` (opened on first use)."""
    _drop_inherited()
    key = (os.getpid(), file.resolve())
    if key not in _SHARED:
        _SHARED[key] = [_open_checked(file), 0]
    _SHARED[key][1] += 1
    return _SHARED[key][0]


def release_env(file: Path) -> None:
    """Give back one `acquire_env`; the environment closes with its last user."""
    key = (os.getpid(), file.resolve())
    entry = _SHARED.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        entry[0].close()
        del _SHARED[key]


def lmdb_files(path: str | os.PathLike) -> list[Path]:
    """The LMDB files behind `path` (a file, or a directory of *.lmdb), checked to be whole and to hold frames.

    Each file's pages are checked before it is mapped (`check_lmdb_file`), so damage is a `KdaugError`
    naming the file, never a SIGBUS; its length key and first entry are decoded.
    """
    path = Path(path)
    if not path.exists():
        msg = f"{path}: no such file or directory (expected an LMDB file or a directory of *.lmdb shards)"
        raise KdaugError(msg)
    files = [path] if path.is_file() else sorted(path.glob("*.lmdb"))
    if not files:
        msg = f"{path}: directory holds no *.lmdb shards"
        raise KdaugError(msg)
    for file in files:
        check_lmdb_file(file)
        env = acquire_env(file)
        try:
            with env.begin() as txn:
                if _stored_length(txn, env, file):
                    decode_entry(file, "0", read_key(txn, b"0", file))
        finally:
            release_env(file)
    return files


def _open_checked(file: Path) -> lmdb.Environment:
    try:
        return _open_readonly(file)
    except lmdb.Error as err:
        msg = f"{file}: not a readable LMDB file ({err})"
        raise KdaugError(msg) from err


def _stored_length(txn: lmdb.Transaction, env: lmdb.Environment, path: Path) -> int:
    length = _read_value(txn, LENGTH_KEY, path, None)
    if length is not None:
        return length
    return int(env.stat()["entries"])  # fairchem-tutorial files without a length key


class FrameDataset(torch.utils.data.Dataset):
    """Frames of one LMDB file or a directory of shards, as S2EF-named PyG Data.

    Every entry read is validated (`kdaug.data.entries.decode_entry`): a bad one raises a `KdaugError`
    naming file, key and field. Environments open lazily in each process, so it works under DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.files = lmdb_files(self.path)
        lengths = []
        for file in self.files:
            env = acquire_env(file)
            try:
                with env.begin() as txn:
                    lengths.append(_stored_length(txn, env, file))
            finally:
                release_env(file)
        self.lengths = lengths
        self._offsets = np.cumsum([0, *lengths])
        self._envs: list[lmdb.Environment] | None = None
        self._pid = -1

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _environments(self) -> list[lmdb.Environment]:
        if self._envs is None or self._pid != os.getpid():
            self._envs = [acquire_env(f) for f in self.files]
            self._pid = os.getpid()
        return self._envs

    def locate(self, index: int) -> tuple[int, str]:
        """(file index, key) of frame `index`."""
        if not -len(self) <= index < len(self):
            msg = f"index {index} out of range for {len(self)} frames in {self.path}"
            raise IndexError(msg)
        index %= len(self)
        file_index = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return file_index, str(index - self._offsets[file_index])

    def __getitem__(self, index: int) -> Data:
        file_index, key = self.locate(index)
        file = self.files[file_index]
        with self._environments()[file_index].begin() as txn:
            raw = read_key(txn, key.encode("ascii"), file)
        return decode_entry(file, key, raw)

    def fingerprint(self) -> str:
        """sha256 naming this data: per file, its name and length, and the structure and labels of every
        frame (positions, atomic numbers, cell, tags, fixed, energy, forces; pickled bytes are not stable
        between writes, so the decoded arrays are hashed).

        Every frame counts, so data whose middle frames changed (same name, length, first and last frame)
        gets another fingerprint; caches and derived datasets use it to refuse data they were not made from.
        """
        digest = hashlib.sha256()
        for file, length in zip(self.files, self.lengths):
            digest.update(f"{file.name}:{length}".encode())
        for index in range(len(self)):
            data = self[index]
            energy, forces = data_energy_forces(data)
            arrays = [data.pos, data.atomic_numbers, data.cell, forces, [float(energy)]]
            arrays += [data[key] for key in ("tags", "fixed") if key in data]
            for array in arrays:
                digest.update(np.ascontiguousarray(np.asarray(array), dtype=np.float64).tobytes())
        return digest.hexdigest()

    def frame(self, index: int) -> Frame:
        data = self[index]
        try:
            return data_to_frame(data)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError) as err:
            file_index, key = self.locate(index)
            raise entry_error(self.files[file_index], key, f"provenance: {err}") from err

    def iter_frames(self) -> Iterator[Frame]:
        for index in range(len(self)):
            yield self.frame(index)

    def check_entries(self, indices: Iterable[int] | None = None) -> frozenset[int]:
        """Decode and validate the frames at `indices` (all by default); returns the atomic numbers they hold.

        Commands that derive data call it before creating output, so a bad entry stops them with nothing written.
        """
        elements: set[int] = set()
        for index in range(len(self)) if indices is None else indices:
            elements.update(self.frame(index).atomic_numbers.tolist())
        return frozenset(elements)

    def close(self) -> None:
        """Give back the environments (closed when no other reader in this process uses them)."""
        if self._envs is not None and self._pid == os.getpid():
            for file in self.files:
                release_env(file)
        self._envs = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_envs"] = None
        return state


def collate_frames(data_list: list[Data]) -> Batch:
    """DataLoader collate function: one PyG Batch (strings become lists)."""
    return Batch.from_data_list(data_list)
