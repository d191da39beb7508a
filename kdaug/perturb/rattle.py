"""`run_rattle`: Gaussian noise on the free atoms of existing frames, labelled by the teacher.

Output: frames with origin "rattled", parent = (sid, fid) of the input frame,
the same sid, fid = parent fid * copies + copy; written like `kdaug generate`
(one transaction per chunk, resumable).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kdaug.config import check_values, option
from kdaug.data.lmdb import FrameDataset
from kdaug.models import AtomisticModel, load_teacher
from kdaug.perturb.common import (
    PerturbOptions,
    check_paths,
    data_options,
    derived_frame,
    label,
    perturb_dataset,
    too_close,
)
from kdaug.types import Frame

logger = logging.getLogger(__name__)
COUNTS = ("inputs", "written", "rejected_min_distance")  # the run's tally: manifest counters and summary


@dataclass(frozen=True, kw_only=True)
class RattleConfig(PerturbOptions):
    """Options of `kdaug rattle`."""

    DATA_KEYS: ClassVar[tuple[str, ...]] = (*PerturbOptions.DATA_KEYS, "sigma", "copies")  # shape the output

    sigma: float = option(0.05, help="standard deviation of the noise on each coordinate of free atoms",
                          unit="Angstrom")
    copies: int = option(1, help="perturbed copies per input frame")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_values(self, [(self.sigma > 0, "sigma", "a positive standard deviation in Angstrom"),
                            (self.copies >= 1, "copies", "at least 1")])


def rattle_positions(positions: np.ndarray, fixed: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """positions (n,3) plus N(0, sigma^2) noise on every coordinate of the free atoms."""
    noise = rng.normal(0.0, sigma, size=positions.shape)
    noise[fixed] = 0.0
    return positions + noise


def run_rattle(config: RattleConfig, *, progress: bool = True) -> dict:
    """Rattle, filter (min distance), label with the teacher and write; returns the counts of this run
    (as added to the manifest's counters)."""
    check_paths(config)
    dataset = FrameDataset(config.input)
    teacher = load_teacher(config.teacher, config.checkpoint, device=config.device)
    counts = perturb_dataset(dataset, config, lambda chunk: rattle_chunk(chunk, teacher, config), desc="rattle",
                             models=[teacher], options=data_options(config, teacher, dataset), progress=progress)
    summary = {key: counts[key] for key in COUNTS}
    logger.info("rattle: %s -> %s", summary, config.out)
    return summary


def rattle_chunk(chunk: Sequence[tuple[int, Frame]], teacher: AtomisticModel, config: RattleConfig,
                 ) -> tuple[list[Frame], dict[str, int]]:
    """`copies` rattled copies of each (input index, frame) pair that pass the filter, labelled; the counts
    they add."""
    candidates = []
    tally = dict.fromkeys(COUNTS, 0) | {"inputs": len(chunk)}
    for index, frame in chunk:
        teacher.check_elements(frame.atomic_numbers)
        for copy in range(config.copies):
            rng = np.random.default_rng([config.seed, index, copy])
            positions = rattle_positions(frame.positions, frame.fixed, config.sigma, rng)
            if too_close(frame, positions, config.min_distance_factor):
                tally["rejected_min_distance"] += 1
                continue
            candidates.append((frame, positions, copy))
    labels = label([dataclasses.replace(f, positions=p) for f, p, _ in candidates], teacher, device=config.device)
    frames = [derived_frame(parent, positions, energy, forces, copy=copy, copies=config.copies, origin="rattled",
                            teacher=teacher, details={"sigma": config.sigma, "copy": copy, "seed": config.seed})
              for (parent, positions, copy), (energy, forces) in zip(candidates, labels)]
    tally["written"] = len(frames)
    return frames, tally
