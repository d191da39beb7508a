"""Deterministic subsets of LMDB data for the study's data regimes: a share of the systems (by system id) or a
number of frames.

A system is (input path, sid): generated sets number their systems from 0, so two inputs never share one.
`held_out` names systems (same keys) that must not be kept, e.g. validation systems of a set that is also
a training input. Both draws use numpy's generator seeded with `seed`, so a subset is the same for a seed.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdaug.data.lmdb import FrameDataset, LmdbWriter


@dataclass(frozen=True, kw_only=True)
class SubsetConfig:
    """What to keep of `inputs` (LMDB files or directories) in `out` (replaced whole): `system_fraction` of their
    systems (in (0, 1], each with all its frames; never one of `held_out`), then at most `frames` frames (None:
    all), drawn with `seed`."""

    inputs: tuple[str, ...]
    out: str
    system_fraction: float = 1.0
    held_out: tuple[tuple[str, int], ...] = ()
    frames: int | None = None
    seed: int = 0


def keep_systems(systems: Sequence[tuple[str, int]], fraction: float, seed: int,
                 held_out: Sequence[tuple[str, int]] = ()) -> set[tuple[str, int]]:
    """round(fraction x the systems not held out) of them (at least one), drawn with `seed`."""
    candidates = sorted(set(systems) - set(held_out))
    count = min(len(candidates), max(1, round(fraction * len(candidates))))
    chosen = np.random.default_rng(seed).choice(len(candidates), size=count, replace=False)
    return {candidates[i] for i in chosen}


def keep_frames(n_frames: int, count: int | None, seed: int) -> list[int]:
    """Sorted indices of `count` of `n_frames` frames drawn with `seed` (all of them when count is None or
    larger)."""
    if count is None or count >= n_frames:
        return list(range(n_frames))
    return sorted(int(i) for i in np.random.default_rng([seed, 1]).choice(n_frames, size=count, replace=False))


def run_subset(config: SubsetConfig, *, progress: bool = False) -> dict[str, int]:
    """Write the subset to `config.out` in one transaction; returns {"systems", "frames", "system_frames" (the
    frames of the kept systems, before the frame cap)}."""
    del progress  # one pass over small sets
    frames = [((str(path), frame.sid), frame) for path in config.inputs for frame in FrameDataset(path).iter_frames()]
    systems = keep_systems([key for key, _ in frames], config.system_fraction, config.seed, config.held_out)
    frames = [(key, frame) for key, frame in frames if key in systems]
    kept = [frames[i] for i in keep_frames(len(frames), config.frames, config.seed)]
    out = Path(config.out)
    if out.exists():  # a subset killed before it was recorded: written anew, never appended to
        shutil.rmtree(out)
    with LmdbWriter(out) as writer:
        writer.write_batch([frame for _, frame in kept])
        writer.write_manifest()
    return {"systems": len({key for key, _ in kept}), "frames": len(kept), "system_frames": len(frames)}
