"""Teacher targets computed once per dataset (`kdaug teacher-cache`) and read back during training.

Tree written by `build_teacher_cache(teacher, data_paths, mode, out_dir)`:

    out_dir/
      cache.json               stamp: teacher name, checkpoint sha256 and identity, --kd mode, dtype
      <fingerprint>.lmdb       one per dataset, named by `FrameDataset.fingerprint()`:
                                 b"0", b"1", ... -> pickled {"n_atoms": int, "energy": eV float,
                                                    "forces": (n,3), "feature": (n, ...) or None} of that
                                                    dataset index; forces and features in the stamp's dtype
                                 b"length"        -> frames in the dataset
                                 b"done"          -> frames 0..done-1 are written (resume point)

Frames are computed in index order and each batch is one transaction together with its `done`, so a
killed run resumes after the last whole batch. Readers open each LMDB lazily per process (DataLoader
workers) and read only the frames of a batch, so the cache scales with the disk, not the memory.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch
from torch_geometric.data import Batch
from tqdm import tqdm

from kdaug.data.batch import batch_from_frames
from kdaug.data.lmdb import FrameDataset
from kdaug.errors import KdaugError
from kdaug.models.protocol import AtomisticModel
from kdaug.perturb.common import check_output_not_input
from kdaug.train.kd import TeacherTargets, check_kd_pair, check_mode, live_teacher_targets

logger = logging.getLogger(__name__)

STAMP_FILE = "cache.json"
CACHE_DTYPES = ("float16", "float32")
_LENGTH_KEY = b"length"
_DONE_KEY = b"done"


@dataclass(frozen=True)
class CacheStamp:
    """What a cache was made with; training refuses a cache whose stamp does not match its run."""

    teacher: str
    teacher_sha256: str | None
    mode: str
    dtype: str
    teacher_identity: str | None = None  # `AtomisticModel.identity` (a label-only teacher's class and parameters)


def _read_stamp(directory: Path) -> CacheStamp | None:
    path = directory / STAMP_FILE
    if not path.is_file():
        return None
    try:
        return CacheStamp(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        msg = f"{path}: not a kdaug teacher-cache stamp ({err})"
        raise KdaugError(msg) from err


def _store_path(directory: Path, fingerprint: str) -> Path:
    return directory / f"{fingerprint}.lmdb"


def _reader(path: Path) -> lmdb.Environment:
    """A read-only handle to close after use. Handles are not kept: py-lmdb allows one per file and process,
    and a DataLoader worker forked from a process holding one could not open its own."""
    return lmdb.open(str(path), subdir=False, readonly=True, lock=False, readahead=False, meminit=False)


def _writer(path: Path) -> lmdb.Environment:
    return lmdb.open(str(path), subdir=False, map_size=1 << 30, meminit=False, map_async=False)


def _progress(env: lmdb.Environment) -> tuple[int | None, int]:
    """(dataset length or None if never started, frames done)."""
    with env.begin() as txn:
        length, done = txn.get(_LENGTH_KEY), txn.get(_DONE_KEY)
    return (None if length is None else int(length), 0 if done is None else int(done))


def _put(env: lmdb.Environment, items: list[tuple[bytes, bytes]]) -> None:
    """Write `items` in one transaction, growing the map as needed."""
    while True:
        try:
            with env.begin(write=True) as txn:
                for key, value in items:
                    txn.put(key, value)
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


def build_teacher_cache(
    teacher: AtomisticModel,
    data_paths: Sequence[str | os.PathLike],
    mode: str,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float16",
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Compute and store the teacher's energy, forces and `mode` feature target for every frame of `data_paths`.

    Resumes an existing cache made with the same teacher checkpoint, mode and dtype; refuses (naming --out)
    one made otherwise. Everything is checked before anything is written.

    Returns:
        {"out": dir, "stamp": {...}, "datasets": [{"path", "fingerprint", "frames", "computed"}]}.
    """
    check_mode(mode)
    if mode == "none":
        msg = "--kd none: nothing to cache; choose the --kd mode training will use"
        raise KdaugError(msg)
    check_kd_pair(mode, None, teacher)
    if dtype not in CACHE_DTYPES:
        msg = f"--dtype {dtype}: expected one of {', '.join(CACHE_DTYPES)}"
        raise KdaugError(msg)
    if batch_size < 1:
        msg = f"--batch-size {batch_size}: expected a positive number of frames"
        raise KdaugError(msg)
    datasets = []
    for path in data_paths:
        dataset = FrameDataset(path)
        if len(dataset) == 0:
            msg = f"--data {path}: holds no frames"
            raise KdaugError(msg)
        datasets.append(dataset)
    out = Path(out_dir)
    for path in data_paths:
        check_output_not_input(str(path), str(out))
    fingerprints = [dataset.fingerprint() for dataset in datasets]
    stamp = CacheStamp(teacher=teacher.name, teacher_sha256=teacher.checkpoint_sha256, mode=mode, dtype=dtype,
                       teacher_identity=teacher.identity)
    existing = _read_stamp(out) if out.is_dir() else None
    if existing is not None and existing != stamp:
        diffs = ", ".join(f"{k} {v!r} (now {asdict(stamp)[k]!r})" for k, v in asdict(existing).items()
                          if asdict(stamp)[k] != v)
        msg = f"--out {out}: holds a teacher cache made with {diffs}; use another --out"
        raise KdaugError(msg)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if existing is None:
            (out / STAMP_FILE).write_text(json.dumps(asdict(stamp), indent=2))
    except OSError as err:
        msg = f"--out {out}: cannot write there ({err.strerror})"
        raise KdaugError(msg) from err

    summary = []
    seen: set[str] = set()
    for dataset, fingerprint in zip(datasets, fingerprints):
        computed = 0
        if fingerprint not in seen:
            seen.add(fingerprint)
            computed = _fill_store(teacher, dataset, mode, _store_path(out, fingerprint), np.dtype(dtype), batch_size,
                                   progress)
        summary.append({"path": str(dataset.path), "fingerprint": fingerprint, "frames": len(dataset),
                        "computed": computed})
        dataset.close()
    return {"out": str(out), "stamp": asdict(stamp), "datasets": summary}


def _fill_store(teacher: AtomisticModel, dataset: FrameDataset, mode: str, path: Path, dtype: np.dtype,
                batch_size: int, progress: bool) -> int:
    """Compute the frames of `dataset` not yet in the store at `path`; returns how many were computed."""
    env = _writer(path)
    try:
        length, done = _progress(env)
        if length is None:
            _put(env, [(_LENGTH_KEY, str(len(dataset)).encode())])
        start = done
        with tqdm(total=len(dataset), initial=done, desc=f"teacher-cache {dataset.path.name}", unit=" frames",
                  disable=not progress) as bar:
            while done < len(dataset):
                frames = [dataset.frame(i) for i in range(done, min(done + batch_size, len(dataset)))]
                batch = batch_from_frames(frames, device=teacher.device, dtype=teacher.dtype)
                targets = live_teacher_targets(mode, teacher, batch)
                records = _frame_records(targets, [f.n_atoms for f in frames], dtype)
                items = [(str(done + k).encode(), record) for k, record in enumerate(records)]
                done += len(frames)
                _put(env, [*items, (_DONE_KEY, str(done).encode())])
                bar.update(len(frames))
        logger.info("%s: %d frames computed, %d already cached", path.name, done - start, start)
        return done - start
    finally:
        env.close()


def _frame_records(targets: TeacherTargets, n_atoms: list[int], dtype: np.dtype) -> list[bytes]:
    def per_frame(values: torch.Tensor) -> list[np.ndarray]:
        with np.errstate(over="ignore"):  # checked just below
            stored = values.cpu().numpy().astype(dtype)
        if not np.isfinite(stored).all():
            msg = f"--dtype {dtype}: teacher outputs beyond its range (or not finite); use --dtype float32"
            raise KdaugError(msg)
        return np.split(stored, np.cumsum(n_atoms)[:-1])

    energies = targets.energy.double().cpu().numpy()
    forces = per_frame(targets.forces)
    features = per_frame(targets.features) if targets.features is not None else [None] * len(n_atoms)
    return [pickle.dumps({"n_atoms": n, "energy": float(e), "forces": f, "feature": h},
                         protocol=pickle.HIGHEST_PROTOCOL)
            for n, e, f, h in zip(n_atoms, energies, forces, features)]


class TeacherCache:
    """Read access to a teacher cache for the datasets of one training run (use `TeacherCache.open`).

    Attributes:
        directory: the cache directory.
        stamp: its `CacheStamp`.
        paths: one store per dataset, in the order of `batch.dataset_idx`.
    """

    def __init__(self, directory: Path, stamp: CacheStamp, paths: list[Path]) -> None:
        self.directory = directory
        self.stamp = stamp
        self.paths = paths

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike,
        fingerprints: Sequence[str],
        teacher_sha256: str | None,
        mode: str,
        *,
        names: Sequence[str] | None = None,
        teacher_identity: str | None = None,
    ) -> TeacherCache:
        """The cache at `directory` for datasets with these fingerprints (in `dataset_idx` order).

        Refuses, naming --teacher-cache, a cache made with another teacher checkpoint, teacher identity
        (`AtomisticModel.identity`, checked when given) or mode, or lacking (complete) targets for one of the
        datasets (`names[k]`, e.g. its path, says which).
        """
        directory = Path(directory)
        flag = f"--teacher-cache {directory}"
        if not directory.is_dir():
            msg = f"{flag}: no such directory (make it with kdaug teacher-cache)"
            raise KdaugError(msg)
        stamp = _read_stamp(directory)
        if stamp is None:
            msg = f"{flag}: not a teacher cache (no {STAMP_FILE}; make it with kdaug teacher-cache)"
            raise KdaugError(msg)
        if stamp.mode != mode:
            msg = f"{flag}: made for --kd {stamp.mode}, not --kd {mode}"
            raise KdaugError(msg)
        if stamp.teacher_sha256 != teacher_sha256:
            msg = (f"{flag}: made with teacher checkpoint sha256 {stamp.teacher_sha256}, but this teacher's is "
                   f"{teacher_sha256}")
            raise KdaugError(msg)
        if teacher_identity is not None and stamp.teacher_identity != teacher_identity:
            msg = f"{flag}: made with teacher {stamp.teacher_identity}, but this teacher is {teacher_identity}"
            raise KdaugError(msg)
        paths = []
        for k, fingerprint in enumerate(fingerprints):
            path = _store_path(directory, fingerprint)
            length, done = (None, 0)
            if path.is_file():
                with _reader(path) as env:
                    length, done = _progress(env)
            if length is None or done < length:
                name = names[k] if names is not None else f"dataset {k}"
                state = "no" if length is None else f"incomplete ({done} of {length} frames)"
                msg = (f"{flag}: has {state} targets for {name} (fingerprint {fingerprint[:16]}...); "
                       f"run kdaug teacher-cache with --out {directory} on it")
                raise KdaugError(msg)
            paths.append(path)
        return cls(directory, stamp, paths)

    def targets(self, batch: Batch) -> TeacherTargets:
        """Targets of the batch's frames (batch.dataset_idx, batch.local_idx (S,) long), in the batch's order,
        on its device and in its positions' dtype."""
        dataset_idx = batch.dataset_idx.tolist()
        local_idx = batch.local_idx.tolist()
        raw: dict[tuple[int, int], bytes | None] = {}
        for d in sorted(set(dataset_idx)):
            with _reader(self.paths[d]) as env, env.begin() as txn:
                raw.update({(d, i): txn.get(str(i).encode()) for dd, i in zip(dataset_idx, local_idx) if dd == d})
        missing = next(((d, i) for (d, i), value in raw.items() if value is None), None)
        if missing is not None:
            msg = f"--teacher-cache {self.directory}: {self.paths[missing[0]].name} has no frame {missing[1]}"
            raise KdaugError(msg)
        records = [pickle.loads(raw[d, i]) for d, i in zip(dataset_idx, local_idx)]
        natoms = batch.natoms.tolist()
        for record, expected, d, i in zip(records, natoms, dataset_idx, local_idx):
            n = record["n_atoms"]
            if n != expected:
                msg = (f"--teacher-cache {self.directory}: frame {i} of {self.paths[d].name} has {n} atoms, "
                       f"the data {expected}; the data changed since the cache was made")
                raise KdaugError(msg)
        device, dtype = batch.pos.device, batch.pos.dtype
        energy = torch.tensor([r["energy"] for r in records], dtype=torch.float64)
        forces = torch.from_numpy(np.concatenate([r["forces"] for r in records]))
        features = None
        if records[0]["feature"] is not None:
            features = torch.from_numpy(np.concatenate([r["feature"] for r in records]))
        return TeacherTargets(energy, forces, features).to(device, dtype)
