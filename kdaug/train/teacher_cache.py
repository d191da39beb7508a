"""Teacher targets computed once per dataset (`kdaug teacher-cache`) and read with each training sample.

Tree written by `run_teacher_cache(TeacherCacheConfig(...))` (or `build_teacher_cache`):

    out/
      cache.json               the run record: cache format, teacher name, checkpoint sha256 and identity, --kd and
                               the strategy's parameters, --dtype and the fields stored; a resume must match it
                               (`kdaug.data.run_record`)
      <fingerprint>.lmdb       one `kdaug.data.record_store` file per dataset, named by `FrameDataset.fingerprint()`:
                               record i = {"energy": eV float, "forces": (n,3), <strategy.cache_fields()>: (n,...)}
                               of dataset index i, arrays in the --dtype of the record

Frames are computed in index order and each batch is one transaction together with its resume point, so a
killed run resumes after the last whole batch. The batches are training batches of the --data paths as one
`TrainingSet` (dataset_idx in --data order), so a strategy seeded per sample draws as `kdaug train` does when
its --train/--synthetic paths come in that order. During training the `TrainingSet` is given the cache
(`TrainingSet.attach`): each sample carries `teacher_energy`, `teacher_forces` and `teacher_<field>`, read in
the DataLoader worker that loads it, and `TeacherCache.targets(batch)` reads them off the collated batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch_geometric.data import Batch
from tqdm import tqdm

from kdaug.config import check_values, option
from kdaug.data.record_store import RecordReader, RecordWriter
from kdaug.data.run_record import (
    check_input_paths,
    check_output_not_input,
    check_resume,
    read_json,
    to_json,
    write_json,
)
from kdaug.data.training_set import TrainingSet, collate
from kdaug.errors import KdaugError
from kdaug.models import load_teacher
from kdaug.models.protocol import AtomisticModel
from kdaug.train.kd import KDStrategy, TeacherTargets
from kdaug.train.strategies import KdName, check_pair, get_strategy

logger = logging.getLogger(__name__)

STAMP_FILE = "cache.json"
CACHE_FORMAT = 2  # 1: positional records {"n_atoms", "energy", "forces", "feature"} (before run records)
CACHE_DTYPES = ("float16", "float32")
PREFIX = "teacher_"  # of the sample attributes holding a cache's targets


@dataclass(frozen=True, kw_only=True)
class TeacherCacheConfig:
    """Options of `kdaug teacher-cache`."""

    teacher: str = option(help="teacher: a model config name (e.g. gemnet-oc), a YAML path, emt or chgnet")
    checkpoint: str | None = option(None, help="teacher checkpoint; its sha256 stamps the cache")
    data: tuple[str, ...] = option(
        help="frame LMDBs (files or directories of shards): every --train then --synthetic path, in kdaug train's "
             "order (--kd hessian seeds its vectors by it)")
    kd: KdName = option(help="the KD strategy training will use (not none)")
    out: str = option(help="cache directory (resumed if it holds a previous run)")
    dtype: Literal["float16", "float32"] = option(
        "float16", help="storage of forces and features (energies are always float64)")
    batch_size: int = option(8, help="frames per teacher forward")
    device: str = option("cpu", help="cpu or cuda")

    def __post_init__(self) -> None:
        check_values(self, [
            (bool(self.data), "data", "at least one LMDB path"),
            (self.batch_size >= 1, "batch_size", "a positive number of frames"),
        ])


def run_teacher_cache(config: TeacherCacheConfig, *, progress: bool = True) -> dict[str, Any]:
    """Check the paths, load the teacher and `build_teacher_cache`; returns its summary."""
    strategy = get_strategy(config.kd)
    inputs = [("--data", path) for path in config.data]
    if config.checkpoint is not None:
        inputs.append(("--checkpoint", config.checkpoint))
    check_input_paths(inputs)
    if not config.out.strip():
        raise KdaugError("--out '': empty path; expected the cache folder")
    for flag, path in inputs:
        check_output_not_input(path, config.out, input_flag=flag)
    if Path(config.out).is_file():
        raise KdaugError(f"--out {config.out}: is an existing file; expected a folder")
    _check_cacheable(strategy)
    teacher = load_teacher(config.teacher, config.checkpoint, device=config.device)
    return build_teacher_cache(teacher, config.data, strategy, config.out, dtype=config.dtype,
                               batch_size=config.batch_size, progress=progress)


def _check_cacheable(strategy: KDStrategy) -> None:
    if not strategy.uses_teacher:
        msg = f"--kd {strategy.name}: nothing to cache; choose the --kd strategy training will use"
        raise KdaugError(msg)


def stored_fields(strategy: KDStrategy) -> tuple[str, ...]:
    """The fields of each record: energy, forces and the strategy's `cache_fields()`."""
    return ("energy", "forces", *(f for f in strategy.cache_fields() if f not in ("energy", "forces")))


def cache_record(teacher: AtomisticModel, strategy: KDStrategy, dtype: str) -> dict[str, Any]:
    """What a cache is made with; a resume, and training, refuse a cache whose record differs."""
    return {"format": CACHE_FORMAT, "teacher": teacher.name, "teacher_sha256": teacher.checkpoint_sha256,
            "teacher_identity": teacher.identity, "kd": strategy.name, "kd_options": to_json(strategy.settings()),
            "dtype": dtype, "fields": list(stored_fields(strategy))}


def _read_record(directory: Path, flag: str) -> dict[str, Any] | None:
    """The record in `directory` (None if it has none); a damaged one or one of another format is one line."""
    path = directory / STAMP_FILE
    if not path.is_file():
        return None
    record = read_json(path, advice="remake the cache with kdaug teacher-cache")
    if not isinstance(record, dict) or record.get("format") != CACHE_FORMAT:
        found = record.get("format", 1) if isinstance(record, dict) else "unknown"
        msg = (f"{flag}: a teacher cache of format {found}, this kdaug reads format {CACHE_FORMAT}; remake it with "
               "kdaug teacher-cache")
        raise KdaugError(msg)
    return record


def _store_path(directory: Path, fingerprint: str) -> Path:
    return directory / f"{fingerprint}.lmdb"


def build_teacher_cache(
    teacher: AtomisticModel,
    data_paths: Sequence[str | os.PathLike],
    strategy: KDStrategy,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float16",
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Compute and store the teacher's energy, forces and `strategy.cache_fields()` for every frame of `data_paths`.

    Resumes an existing cache made with the same record (`cache_record`); refuses (naming --out) one made
    otherwise. Everything is checked before anything is written.

    Returns:
        {"out": dir, "stamp": record, "datasets": [{"path", "fingerprint", "frames", "computed"}]}.
    """
    _check_cacheable(strategy)
    check_pair(strategy, None, teacher)
    if dtype not in CACHE_DTYPES:
        msg = f"--dtype {dtype}: expected one of {', '.join(CACHE_DTYPES)}"
        raise KdaugError(msg)
    if batch_size < 1:
        msg = f"--batch-size {batch_size}: expected a positive number of frames"
        raise KdaugError(msg)
    out = Path(out_dir)
    for path in data_paths:
        check_output_not_input(str(path), str(out))
    data = TrainingSet(data_paths, flags=("--data", "--data"))
    try:
        record = cache_record(teacher, strategy, dtype)
        existing = _read_record(out, f"--out {out}") if out.is_dir() else None
        if existing is not None:
            check_resume(f"--out {out}", existing, record, kind="teacher-cache options",
                         advice="use another --out")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            msg = f"--out {out}: cannot write there ({err.strerror})"
            raise KdaugError(msg) from err
        if existing is None:
            write_json(out / STAMP_FILE, record)
        summary, seen, start = [], set(), 0
        for path, dataset, fingerprint in zip(data_paths, data.datasets, data.fingerprints()):
            samples = range(start, start + len(dataset))
            start += len(dataset)
            computed = 0
            if fingerprint not in seen:
                seen.add(fingerprint)
                computed = _fill_store(teacher, strategy, data, samples, _store_path(out, fingerprint),
                                       np.dtype(dtype), batch_size, progress)
            summary.append({"path": str(path), "fingerprint": fingerprint, "frames": len(dataset),
                            "computed": computed})
    finally:
        data.close()
    return {"out": str(out), "stamp": record, "datasets": summary}


def _fill_store(teacher: AtomisticModel, strategy: KDStrategy, data: TrainingSet, samples: range, path: Path,
                dtype: np.dtype, batch_size: int, progress: bool) -> int:
    """Compute the samples of `data` (one dataset's) not yet in the store at `path`; returns how many were computed."""
    fields = stored_fields(strategy)
    writer = RecordWriter(path, len(samples), fields)
    try:
        start = writer.done
        with tqdm(total=len(samples), initial=start, desc=f"teacher-cache {path.name[:12]}", unit=" frames",
                  disable=not progress) as bar:
            while writer.done < len(samples):
                indices = samples[writer.done:writer.done + batch_size]
                batch = collate([data[i] for i in indices]).to(teacher.device)
                targets = strategy.teacher_targets(teacher, batch)
                writer.append(_records(targets, fields, batch.natoms.tolist(), dtype))
                bar.update(len(indices))
        logger.info("%s: %d frames computed, %d already cached", path.name, writer.done - start, start)
        return writer.done - start
    finally:
        writer.close()


def _records(targets: TeacherTargets, fields: Sequence[str], n_atoms: list[int], dtype: np.dtype) -> list[dict]:
    """One record per frame: the energy (float64) and each per-atom field split by frame, in `dtype`."""
    def per_frame(values: torch.Tensor) -> list[np.ndarray]:
        with np.errstate(over="ignore"):  # checked just below
            stored = values.detach().cpu().numpy().astype(dtype)
        if not np.isfinite(stored).all():
            msg = f"--dtype {dtype}: teacher outputs beyond its range (or not finite); use --dtype float32"
            raise KdaugError(msg)
        return np.split(stored, np.cumsum(n_atoms)[:-1])

    energies = targets.energy.double().cpu().numpy()
    arrays = {name: per_frame(targets.field(name)) for name in fields if name != "energy"}
    return [{"energy": float(energy), **{name: values[k] for name, values in arrays.items()}}
            for k, energy in enumerate(energies)]


class TeacherCache:
    """A teacher cache for the datasets of one training run (use `TeacherCache.open`), in both roles:
    `TrainingSet.attach(cache)` adds each sample's targets to it, and `targets(batch)` (a `TargetSource`)
    reads them off the collated batch.

    Attributes:
        directory: the cache directory.
        stamp: its record (`cache_record`).
        stores: one `RecordReader` per dataset, in `dataset_idx` order.
    """

    def __init__(self, directory: Path, stamp: dict[str, Any], stores: list[RecordReader]) -> None:
        self.directory = directory
        self.stamp = stamp
        self.stores = stores
        self.fields = tuple(stamp["fields"])

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike,
        fingerprints: Sequence[str],
        teacher_sha256: str | None,
        strategy: KDStrategy,
        *,
        names: Sequence[str] | None = None,
        teacher_identity: str | None = None,
    ) -> TeacherCache:
        """The cache at `directory` for datasets with these fingerprints (in `dataset_idx` order).

        Refuses, naming --teacher-cache, a cache of another format, made with another teacher checkpoint,
        teacher identity (`AtomisticModel.identity`, checked when given), strategy or strategy settings
        (`KDStrategy.settings`), or lacking (complete)
        targets for one of the datasets (`names[k]`, e.g. "--train PATH", says which).
        """
        directory = Path(directory)
        flag = f"--teacher-cache {directory}"
        if not directory.is_dir():
            msg = f"{flag}: no such directory (make it with kdaug teacher-cache)"
            raise KdaugError(msg)
        stamp = _read_record(directory, flag)
        if stamp is None:
            msg = f"{flag}: not a teacher cache (no {STAMP_FILE}; make it with kdaug teacher-cache)"
            raise KdaugError(msg)
        if stamp["kd"] != strategy.name:
            msg = f"{flag}: made for --kd {stamp['kd']}, not --kd {strategy.name}"
            raise KdaugError(msg)
        if stamp["kd_options"] != to_json(strategy.settings()):
            msg = (f"{flag}: made with --kd {strategy.name} settings {stamp['kd_options']}, but this run's are "
                   f"{to_json(strategy.settings())}")
            raise KdaugError(msg)
        if stamp["teacher_sha256"] != teacher_sha256:
            msg = (f"{flag}: made with teacher checkpoint sha256 {stamp['teacher_sha256']}, but this teacher's is "
                   f"{teacher_sha256}")
            raise KdaugError(msg)
        if teacher_identity is not None and stamp["teacher_identity"] != teacher_identity:
            msg = f"{flag}: made with teacher {stamp['teacher_identity']}, but this teacher is {teacher_identity}"
            raise KdaugError(msg)
        stores = []
        for k, fingerprint in enumerate(fingerprints):
            path = _store_path(directory, fingerprint)
            store = RecordReader(path) if path.is_file() else None
            if store is None or store.length is None or store.done < store.length:
                name = names[k] if names is not None else f"dataset {k}"
                state = ("no" if store is None or store.length is None
                         else f"incomplete ({store.done} of {store.length} frames)")
                msg = (f"{flag}: has {state} targets for {name} (fingerprint {fingerprint[:16]}...); "
                       f"run kdaug teacher-cache with --out {directory} on it")
                raise KdaugError(msg)
            stores.append(store)
        return cls(directory, stamp, stores)

    def sample_attributes(self, dataset_idx: int, local_idx: int, n_atoms: int) -> dict[str, torch.Tensor]:
        """{"teacher_energy": (1,) float64 eV, "teacher_<field>": (n_atoms, ...) as stored} of one frame."""
        store = self.stores[dataset_idx]
        record = store[local_idx]
        if len(record["forces"]) != n_atoms:
            msg = (f"--teacher-cache {self.directory}: frame {local_idx} of {store.path.name} has "
                   f"{len(record['forces'])} atoms, the data {n_atoms}; the data changed since the cache was made")
            raise KdaugError(msg)
        attributes = {PREFIX + "energy": torch.tensor([record["energy"]], dtype=torch.float64)}
        attributes.update({PREFIX + name: torch.from_numpy(record[name]) for name in self.fields if name != "energy"})
        return attributes

    def targets(self, batch: Batch) -> TeacherTargets:
        """The targets the batch's samples carry (from `TrainingSet.attach(self)`), on the batch's device and in
        its positions' dtype."""
        fields = {name: batch[PREFIX + name] for name in self.fields if name != "energy"}
        return TeacherTargets.from_fields(batch[PREFIX + "energy"], fields).to(batch.pos.device, batch.pos.dtype)

    def close(self) -> None:
        for store in self.stores:
            store.close()
