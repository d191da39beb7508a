"""`metadata.npz` beside the LMDBs: natoms of every entry, the file fairchem's load balancing reads.

fairchem's `BaseDataset._metadata` loads `<src>/metadata.npz` (for a file `src`, the one in its directory)
and wants key `natoms`, an integer array with one value per entry in `LmdbDataset` order: the directory's
`*.lmdb` files sorted by name, each read in key order 0, 1, ...; without it `BalancedBatchSampler` warns
and falls back to plain batches (or raises, with `load_balancing_on_error: raise`).

Each writer appends the natoms of its committed frames to `.<stem>.natoms` (int32, append-only, one value
per frame of that stem's files in order), so a write costs O(frames written). `metadata.npz` covers the
whole directory, so it is written when a writer closes and no writer of another stem is still running
(under `.metadata.lock`, the last writer to close writes it), and removed when a writer opens, so a file
never disagrees with the LMDBs it describes. It is left alone in directories holding LMDBs without a
natoms record (not written by kdaug).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from kdaug.data.run_record import atomic_write
from kdaug.errors import write_error

METADATA_NAME = "metadata.npz"
_SHARD = re.compile(r"^(?P<stem>.+)\.[0-9]{4}\.lmdb$")


def natoms_path(out_dir: Path, stem: str) -> Path:
    return out_dir / f".{stem}.natoms"


def read_natoms(out_dir: Path, stem: str) -> np.ndarray:
    """The natoms record of `stem` (empty if none)."""
    path = natoms_path(out_dir, stem)
    if not path.exists():
        return np.zeros(0, dtype=np.int32)
    raw = path.read_bytes()
    return np.frombuffer(raw[: len(raw) - len(raw) % 4], dtype=np.int32)


def write_natoms(out_dir: Path, stem: str, natoms: np.ndarray, *, append: bool) -> None:
    """Append to (or replace) the natoms record of `stem`."""
    path = natoms_path(out_dir, stem)
    try:
        with open(path, "ab" if append else "wb") as handle:
            handle.write(np.asarray(natoms, dtype=np.int32).tobytes())
    except OSError as err:
        raise write_error(path, err) from err


@contextlib.contextmanager
def _directory_lock(out_dir: Path) -> Iterator[None]:
    fd = os.open(out_dir / ".metadata.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _being_written(out_dir: Path, stem: str) -> bool:
    """True while another process holds the writer lock of `stem` (kdaug.data.output_lock)."""
    try:
        fd = os.open(out_dir / f".{stem}.lock", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def remove_metadata(out_dir: Path) -> None:
    """Drop `metadata.npz` before the directory changes (kept if the directory holds foreign LMDBs)."""
    with _directory_lock(out_dir):
        if _stems(out_dir) is not None:
            (out_dir / METADATA_NAME).unlink(missing_ok=True)


def _stems(out_dir: Path) -> list[tuple[str, list[Path]]] | None:
    """The directory's `*.lmdb` files grouped by stem in sorted order; None if any lacks a natoms record or
    the stems' files interleave in that order (then no `metadata.npz` could be assembled per stem)."""
    groups: list[tuple[str, list[Path]]] = []
    for file in sorted(out_dir.glob("*.lmdb")):
        match = _SHARD.match(file.name)
        if match is None or not natoms_path(out_dir, match["stem"]).exists():
            return None
        if groups and groups[-1][0] == match["stem"]:
            groups[-1][1].append(file)
        elif any(stem == match["stem"] for stem, _ in groups):
            return None
        else:
            groups.append((match["stem"], [file]))
    return groups


def write_metadata(out_dir: Path, lengths: dict[Path, int], own_stem: str) -> Path | None:
    """Write `<out_dir>/metadata.npz` if no other stem's writer is running and every stem's natoms record
    matches its files' lengths (`lengths`: frames per file, read by the caller or here); else None."""
    with _directory_lock(out_dir):
        groups = _stems(out_dir)
        if not groups or any(stem != own_stem and _being_written(out_dir, stem) for stem, _ in groups):
            return None
        parts = []
        for stem, files in groups:
            natoms = read_natoms(out_dir, stem)
            if len(natoms) != sum(lengths[f] if f in lengths else stored_length(f) for f in files):
                return None
            parts.append(natoms)
        path = out_dir / METADATA_NAME
        content = io.BytesIO()  # zipped in memory: a full disk then fails one plain write
        np.savez(content, natoms=np.concatenate(parts))
        atomic_write(path, content.getvalue())
        return path


def stored_length(file: Path) -> int:
    """The `length` key of a kdaug LMDB file (0 for an empty file)."""
    import lmdb

    if not file.stat().st_size:
        return 0
    env = lmdb.open(str(file), subdir=False, readonly=True, lock=False, readahead=False, meminit=False)
    try:
        with env.begin() as txn:
            raw = txn.get(b"length")
        return pickle.loads(raw) if raw is not None else int(env.stat()["entries"])
    finally:
        env.close()

