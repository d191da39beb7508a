"""`run_relabel`: a copy of an LMDB with the teacher's labels (energy, forces) on the same structures; the study
evaluates students against it (how faithfully a student copies its teacher)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from kdaug.data.lmdb import FrameDataset, LmdbWriter
from kdaug.models import load_teacher
from kdaug.perturb.common import derived_frame, label


@dataclass(frozen=True, kw_only=True)
class RelabelConfig:
    """`input` LMDB, `out` directory (replaced whole), the teacher (name or YAML, checkpoint, and the checkpoint's
    sha256 to record which weights labelled the copy) and its device."""

    input: str
    out: str
    teacher: str
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    device: str = "cpu"


def run_relabel(config: RelabelConfig, *, progress: bool = False, chunk: int = 16) -> dict[str, int]:
    """Label every frame of `input` with the teacher and write them (one transaction); returns {"frames"}."""
    del progress  # small held-out sets
    teacher = load_teacher(config.teacher, config.checkpoint, device=config.device)
    parents = list(FrameDataset(config.input).iter_frames())
    frames = []
    for start in range(0, len(parents), chunk):
        part = parents[start:start + chunk]
        frames += [derived_frame(parent, parent.positions, energy, forces, copy=0, copies=1, origin="synthetic",
                                 teacher=teacher, details={"relabelled": True})
                   for parent, (energy, forces) in zip(part, label(part, teacher, device=config.device))]
    out = Path(config.out)
    if out.exists():  # killed before it was recorded: written anew
        shutil.rmtree(out)
    with LmdbWriter(out) as writer:
        writer.write_batch(frames)
        writer.write_manifest()
    return {"frames": len(frames)}
