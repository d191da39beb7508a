"""Export frames to formats ASE reads (`kdaug export`)."""

from __future__ import annotations

import os
from pathlib import Path

import ase.io
from tqdm import tqdm

from kdaug.data.convert import frame_to_atoms
from kdaug.data.lmdb import FrameDataset
from kdaug.errors import KdaugError

EXPORT_FORMATS = ("extxyz",)


def export_frames(path: str | os.PathLike, out: str | os.PathLike, *, fmt: str = "extxyz",
                  progress: bool = True) -> int:
    """Write every frame under `path` to `out` (energy, forces, tags, FixAtoms); returns the count."""
    if fmt not in EXPORT_FORMATS:
        msg = f"--format {fmt}: expected one of {', '.join(EXPORT_FORMATS)}"
        raise KdaugError(msg)
    out = Path(out)
    dataset = FrameDataset(path)
    if out.resolve() == Path(path).resolve() or out.resolve().is_relative_to(Path(path).resolve()):
        msg = f"OUT {out}: refusing to write into the input path {path}"
        raise KdaugError(msg)
    images = []
    for frame in tqdm(dataset.iter_frames(), total=len(dataset), desc="export", disable=not progress):
        atoms = frame_to_atoms(frame)
        prov = frame.provenance
        atoms.info.update(teacher=prov.teacher or "", parent=list(prov.parent or (-1, -1)))
        images.append(atoms)
    dataset.close()
    tmp = out.with_name(out.name + ".tmp")
    ase.io.write(tmp, images, format=fmt)
    tmp.replace(out)
    return len(images)
