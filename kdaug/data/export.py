"""Export frames to formats ASE reads (`kdaug export`)."""

from __future__ import annotations

import os
from pathlib import Path

import ase.io
from tqdm import tqdm

from kdaug.data.convert import frame_to_atoms
from kdaug.data.lmdb import FrameDataset
from kdaug.errors import KdaugError, write_error

EXPORT_FORMATS = ("extxyz",)


def check_export_target(out: Path, source: Path) -> None:
    """OUT must be a file name in an existing directory, outside the input."""
    if out.is_dir():
        msg = f"OUT {out}: is a directory; expected a file name (e.g. {out / 'frames.extxyz'})"
        raise KdaugError(msg)
    if not out.parent.is_dir():
        msg = f"OUT {out}: directory {out.parent} does not exist"
        raise KdaugError(msg)
    if out.resolve() == source.resolve() or out.resolve().is_relative_to(source.resolve()):
        msg = f"OUT {out}: refusing to write into the input path {source}"
        raise KdaugError(msg)


def export_frames(path: str | os.PathLike, out: str | os.PathLike, *, fmt: str = "extxyz",
                  progress: bool = True) -> int:
    """Write every frame under `path` to `out` (energy, forces, tags, FixAtoms); returns the count.

    Every frame is read and validated before `out` is written (through `out.tmp`, renamed when complete),
    so a bad entry or a full disk leaves neither a partial `out` nor the temporary file.
    """
    if fmt not in EXPORT_FORMATS:
        msg = f"--format {fmt}: expected one of {', '.join(EXPORT_FORMATS)}"
        raise KdaugError(msg)
    out = Path(out)
    dataset = FrameDataset(path)
    check_export_target(out, Path(path))
    images = []
    for frame in tqdm(dataset.iter_frames(), total=len(dataset), desc="export", disable=not progress):
        atoms = frame_to_atoms(frame)
        prov = frame.provenance
        atoms.info.update(teacher=prov.teacher or "", parent=list(prov.parent or (-1, -1)))
        images.append(atoms)
    dataset.close()
    tmp = out.with_name(out.name + ".tmp")
    try:
        ase.io.write(tmp, images, format=fmt)
        tmp.replace(out)
    except OSError as err:
        raise write_error(out, err) from err
    finally:
        tmp.unlink(missing_ok=True)
    return len(images)
