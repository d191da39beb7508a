"""`run_rattle`: Gaussian noise on the free atoms of existing frames, labelled by the teacher.

Output: frames with origin "rattled", parent = (sid, fid) of the input frame,
the same sid, fid = parent fid * copies + copy; written like `kdaug generate`
(one transaction per chunk, resumable).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from tqdm import tqdm

from kdaug.config import check_values, option
from kdaug.data.lmdb import FrameDataset, LmdbWriter
from kdaug.models import load_teacher
from kdaug.perturb.common import (
    PerturbOptions,
    check_inputs,
    check_output_not_input,
    data_options,
    derived_frame,
    label,
    pending_chunks,
    select_indices,
    too_close,
)

logger = logging.getLogger(__name__)


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
    dataset = FrameDataset(config.input)
    check_output_not_input(config.input, config.out)
    teacher = load_teacher(config.teacher, config.checkpoint, device=config.device)
    indices = select_indices(len(dataset), config.fraction, config.seed)
    check_inputs(dataset, indices, [teacher])
    options = data_options(config, teacher, dataset)
    counts = {"inputs": 0, "written": 0, "rejected_min_distance": 0}
    with LmdbWriter(config.out, creation_args=dataclasses.asdict(config), data_options=options) as writer, \
            tqdm(total=len(indices), desc="rattle", unit=" frames", disable=not progress) as bar:
        for chunk in pending_chunks(dataset, indices, writer, config.batch_size):
            candidates = []
            rejected = 0
            for index, frame in chunk:
                teacher.check_elements(frame.atomic_numbers)
                for copy in range(config.copies):
                    rng = np.random.default_rng([config.seed, index, copy])
                    positions = rattle_positions(frame.positions, frame.fixed, config.sigma, rng)
                    if too_close(frame, positions, config.min_distance_factor):
                        rejected += 1
                        continue
                    candidates.append((frame, positions, copy))
            moved = [dataclasses.replace(f, positions=p) for f, p, _ in candidates]
            labels = label(moved, teacher, device=config.device) if moved else []
            frames = [derived_frame(parent, positions, energy, forces, copy=copy, copies=config.copies,
                                    origin="rattled", teacher=teacher,
                                    details={"sigma": config.sigma, "copy": copy, "seed": config.seed})
                      for (parent, positions, copy), (energy, forces) in zip(candidates, labels)]
            writer.write_batch(frames, done=[str(i) for i, _ in chunk],
                               counters={"rejected:min_distance": rejected} if rejected else None)
            counts["inputs"] += len(chunk)
            counts["written"] += len(frames)
            counts["rejected_min_distance"] += rejected
            bar.update(len(chunk))
    dataset.close()
    logger.info("rattle: %s -> %s", counts, config.out)
    return counts
