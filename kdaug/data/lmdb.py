"""Sharded frame LMDBs in the OC20 S2EF layout, readable by fairchem's `LmdbDataset`.

Tree written by `LmdbWriter(out_dir, stem="data")`:

    out_dir/
      data.0000.lmdb        b"0", b"1", ... -> pickled torch_geometric Data (one frame each)
                            b"length"      -> pickled int, number of frames in this file
                            b"kdaug:stats" -> pickled running statistics (for the manifest)
                            b"kdaug:done:<key>" -> markers of finished work units (resume)
      data.0001.lmdb        a new file every `frames_per_file` frames
      manifest.json         counts per origin, element histogram, creation args, versions

A writer with another stem (one per generation shard) writes `<stem>.NNNN.lmdb`
and `manifest.<stem>.json` into the same directory; fairchem reads every
`*.lmdb` there as one dataset. Each `write_batch` is one transaction, so a crash
loses at most the batch being written.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch
from torch_geometric.data import Batch, Data

from kdaug.data.convert import data_to_frame, frame_to_data
from kdaug.errors import KdaugError
from kdaug.types import Frame

LENGTH_KEY = b"length"
STATS_KEY = b"kdaug:stats"
DONE_PREFIX = b"kdaug:done:"
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

    Args:
        out_dir: output directory (created if missing).
        stem: file name stem; one writer per stem at a time.
        frames_per_file: start a new file once the current one holds this many frames.
        map_size: initial LMDB map size in bytes; doubled whenever a batch does not fit.
        creation_args: recorded in the manifest (e.g. the CLI arguments).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        stem: str = "data",
        frames_per_file: int = 250_000,
        map_size: int = 1 << 28,
        creation_args: dict[str, Any] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.stem = stem
        self.frames_per_file = frames_per_file
        self.creation_args = creation_args or {}
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            probe = self.out_dir / f".{stem}.write-test"
            probe.touch()
            probe.unlink()
        except OSError as err:
            msg = f"--out {self.out_dir}: cannot write there ({err.strerror})"
            raise KdaugError(msg) from err
        self._initial_map_size = map_size
        self._files = sorted(self.out_dir.glob(f"{re.escape(stem)}.[0-9][0-9][0-9][0-9].lmdb"))
        self._env: lmdb.Environment | None = None
        self._file_index = len(self._files) - 1 if self._files else 0
        self._open(self._file_index)

    # -- files -----------------------------------------------------------------
    def _path(self, index: int) -> Path:
        return self.out_dir / f"{self.stem}.{index:04d}.lmdb"

    def _open(self, index: int) -> None:
        if self._env is not None:
            self._env.close()
        path = self._path(index)
        map_size = max(self._initial_map_size, path.stat().st_size * 2 if path.exists() else 0)
        self._env = lmdb.open(str(path), subdir=False, map_size=map_size, meminit=False, map_async=False)
        self._file_index = index
        with self._env.begin() as txn:
            raw_length = txn.get(LENGTH_KEY)
            raw_stats = txn.get(STATS_KEY)
        self._length = pickle.loads(raw_length) if raw_length else 0
        self._stats = pickle.loads(raw_stats) if raw_stats else _empty_stats()

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
            self._open(self._file_index + 1)
        payload = [pickle.dumps(frame_to_data(f), protocol=pickle.HIGHEST_PROTOCOL) for f in frames]
        stats = pickle.loads(pickle.dumps(self._stats))
        stats["n_frames"] += len(frames)
        for frame in frames:
            stats["origins"][frame.provenance.origin] += 1
            stats["elements"].update(int(z) for z in frame.atomic_numbers)
        stats["counters"].update(counters or {})
        done = list(done)
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for offset, value in enumerate(payload):
                        txn.put(str(self._length + offset).encode("ascii"), value)
                    for key in done:
                        txn.put(DONE_PREFIX + key.encode(), b"1")
                    txn.put(LENGTH_KEY, pickle.dumps(self._length + len(payload)))
                    txn.put(STATS_KEY, pickle.dumps(stats))
                break
            except lmdb.MapFullError:
                self._env.set_mapsize(self._env.info()["map_size"] * 2)
        self._length += len(payload)
        self._stats = stats
        self.write_manifest()

    def done_keys(self) -> set[str]:
        """Keys of finished work units recorded by `write_batch(done=...)` in any file of this stem."""
        keys: set[str] = set()
        for index in range(self._file_index + 1):
            env = self._env if index == self._file_index else _open_readonly(self._path(index))
            with env.begin() as txn:
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
            env = _open_readonly(self._path(index))
            with env.begin() as txn:
                _merge_stats(total, pickle.loads(txn.get(STATS_KEY)))
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
            "versions": package_versions(),
        }
        path = self.out_dir / manifest_name(self.stem)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        tmp.replace(path)
        return path

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    def __enter__(self) -> LmdbWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- reading ---------------------------------------------------------------------
def _open_readonly(path: Path) -> lmdb.Environment:
    # lock=False: reading never writes a lock file next to the input.
    return lmdb.open(str(path), subdir=False, readonly=True, lock=False, readahead=False, meminit=False)


def _frame_error(path: Path, key: str, detail: str) -> KdaugError:
    return KdaugError(
        f"{path}: entry {key} is not a structure frame ({detail}); expected an S2EF-style LMDB whose "
        "values are torch_geometric Data with pos, atomic_numbers, y|energy and force|forces"
    )


def _check_frame(path: Path, key: str, raw: bytes | None) -> None:
    if raw is None:
        raise _frame_error(path, key, "key missing")
    try:
        value = pickle.loads(raw)
    except Exception as err:  # any unpickling failure means "not our kind of value"
        raise _frame_error(path, key, f"cannot unpickle: {type(err).__name__}") from err
    if not isinstance(value, Data):
        raise _frame_error(path, key, f"value is a {type(value).__name__}")
    keys = set(value.keys())
    missing = [
        name
        for name, options in (("pos", {"pos"}), ("atomic_numbers", {"atomic_numbers"}),
                              ("y|energy", {"y", "energy"}), ("force|forces", {"force", "forces"}))
        if not keys & options
    ]
    if missing:
        raise _frame_error(path, key, f"missing {', '.join(missing)}; has {', '.join(sorted(keys))}")


def lmdb_files(path: str | os.PathLike) -> list[Path]:
    """The LMDB files behind `path` (a file, or a directory of *.lmdb), checked to hold frames."""
    path = Path(path)
    if not path.exists():
        msg = f"{path}: no such file or directory (expected an LMDB file or a directory of *.lmdb shards)"
        raise KdaugError(msg)
    files = [path] if path.is_file() else sorted(path.glob("*.lmdb"))
    if not files:
        msg = f"{path}: directory holds no *.lmdb shards"
        raise KdaugError(msg)
    for file in files:
        try:
            env = _open_readonly(file)
        except lmdb.Error as err:
            msg = f"{file}: not an LMDB file (expected a frame LMDB written by kdaug or fairchem)"
            raise KdaugError(msg) from err
        with env.begin() as txn:
            length = _stored_length(txn, env)
            if length:
                _check_frame(file, "0", txn.get(b"0"))
        env.close()
    return files


def _stored_length(txn: lmdb.Transaction, env: lmdb.Environment) -> int:
    raw = txn.get(LENGTH_KEY)
    if raw is not None:
        return int(pickle.loads(raw))
    return int(env.stat()["entries"])  # fairchem-tutorial files without a length key


def _normalise(data: Data) -> Data:
    """Rename AtomsToGraphs' energy/forces to the S2EF y/force."""
    if "y" not in data and "energy" in data:
        data.y = data.energy
        del data.energy
    if "force" not in data and "forces" in data:
        data.force = data.forces
        del data.forces
    return data


class FrameDataset(torch.utils.data.Dataset):
    """Frames of one LMDB file or a directory of shards, as S2EF-named PyG Data.

    Environments open lazily in each process, so it works under DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.files = lmdb_files(self.path)
        lengths = []
        for file in self.files:
            env = _open_readonly(file)
            with env.begin() as txn:
                lengths.append(_stored_length(txn, env))
            env.close()
        self.lengths = lengths
        self._offsets = np.cumsum([0, *lengths])
        self._envs: list[lmdb.Environment] | None = None
        self._pid = -1

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _environments(self) -> list[lmdb.Environment]:
        if self._envs is None or self._pid != os.getpid():
            self._envs = [_open_readonly(f) for f in self.files]
            self._pid = os.getpid()
        return self._envs

    def __getitem__(self, index: int) -> Data:
        if not -len(self) <= index < len(self):
            msg = f"index {index} out of range for {len(self)} frames in {self.path}"
            raise IndexError(msg)
        index %= len(self)
        file_index = int(np.searchsorted(self._offsets, index, side="right") - 1)
        key = str(index - self._offsets[file_index])
        with self._environments()[file_index].begin() as txn:
            raw = txn.get(key.encode("ascii"))
        if raw is None:
            _check_frame(self.files[file_index], key, raw)
        return _normalise(pickle.loads(raw))

    def fingerprint(self) -> str:
        """sha256 naming this data: per file, its name and length, and the structure and labels of its first
        and last frame (pickled bytes are not stable, so the arrays are hashed).

        Cheap for millions of frames; caches and derived datasets use it to refuse data they were not made from.
        """
        digest = hashlib.sha256()
        for file, length, offset in zip(self.files, self.lengths, self._offsets):
            digest.update(f"{file.name}:{length}".encode())
            for index in sorted({offset, offset + length - 1}) if length else ():
                frame = self.frame(int(index))
                for array in (frame.positions, frame.atomic_numbers, frame.cell, frame.forces, [frame.energy]):
                    digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
        return digest.hexdigest()

    def frame(self, index: int) -> Frame:
        return data_to_frame(self[index])

    def iter_frames(self) -> Iterator[Frame]:
        for index in range(len(self)):
            yield self.frame(index)

    def close(self) -> None:
        """Close the environments (py-lmdb allows one open handle per file and process)."""
        for env in self._envs or []:
            env.close()
        self._envs = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_envs"] = None
        return state


def collate_frames(data_list: list[Data]) -> Batch:
    """DataLoader collate function: one PyG Batch (strings become lists)."""
    return Batch.from_data_list(data_list)
