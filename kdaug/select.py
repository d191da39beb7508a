"""`run_select`: keep the frames of a teacher-labelled LMDB where a student disagrees most with the labels,
or a random subset of the same count.

Score of a frame (`--by disagreement`), with the student's energy E_s (eV) and forces F_s (eV/A) against the
frame's labels E_t, F_t and L0's weights (`kdaug.train.losses.LossWeights`: alpha_E 1, alpha_F 100):

    alpha_E * |E_s - E_t| / n_atoms  +  alpha_F * mean over free atoms of |F_s - F_t|_2

(the Euclidean norm of each free atom's force error, as L0's force term; 0 for a frame without free atoms).
`--by random` scores each frame by a uniform draw seeded by (seed, input index), so its top-k is a uniform
random subset, the same for a given seed. The top-k scores are kept (ties: the lower input index; a
non-finite score is never preferred).

Output tree::

    out/
      data.0000.lmdb      the kept frames, unchanged, in input order
      metadata.npz        natoms per frame (fairchem's load balancing)
      manifest.json       counters, options (input fingerprint, student sha256 or seed, keep, weights), versions
      selection.npz       scores (n_input,) of every input frame; kept (k,) the input index of each output frame
      .scores.f64         the scores computed so far (float64, append-only)

Resume: scoring appends each chunk's scores to .scores.f64, writing marks each chunk of kept frames done;
rerunning the same command continues where it stopped, and other options are refused.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from tqdm import tqdm

from kdaug.config import check_values, option
from kdaug.data.lmdb import FrameDataset, LmdbWriter
from kdaug.data.run_record import atomic_write, check_input_paths, check_output_not_input
from kdaug.errors import KdaugError
from kdaug.models import AtomisticModel, load_named_model
from kdaug.perturb.common import check_inputs, label
from kdaug.train.losses import LossWeights
from kdaug.types import Frame

logger = logging.getLogger(__name__)
SELECTIONS = ("disagreement", "random")
SCORES_NAME, PARTIAL_SCORES_NAME = "selection.npz", ".scores.f64"


@dataclass(frozen=True)
class SelectConfig:
    """Options of `kdaug select`."""

    input: str = option(help="teacher-labelled frame LMDB (file or directory of shards), e.g. kdaug generate output")
    out: str = option(help="output directory (resumed if it holds a previous run)")
    keep: int | float = option(help="frames to keep: a count N (an integer) or a fraction F of the input "
                                    "(a decimal in (0, 1])")
    by: str = option("disagreement", help=f"score: {', '.join(SELECTIONS)} (random: the baseline at the same count)")
    student: str | None = option(None, help="student checkpoint (e.g. student.pt of kdaug train); "
                                            "needed by --by disagreement")
    seed: int = option(0, help="seed of --by random")
    batch_size: int = option(16, help="frames per student forward")
    device: str = option("cpu", help="cpu or cuda")

    def __post_init__(self) -> None:
        check_values(self, [
            (self.keep >= 1 if isinstance(self.keep, int) else 0 < self.keep <= 1, "keep",
             "a count of at least 1 (an integer) or a fraction in (0, 1] (a decimal)"),
            (self.by in SELECTIONS, "by", f"one of {', '.join(SELECTIONS)}"),
            (self.by != "disagreement" or self.student is not None, "student",
             "a student checkpoint (required by --by disagreement)"),
            (self.seed >= 0, "seed", "non-negative"),
            (self.batch_size >= 1, "batch_size", "at least 1"),
        ])

    def count(self, n_frames: int) -> int:
        """The number of frames to keep out of `n_frames`; a count above it is one line."""
        if isinstance(self.keep, int):
            if self.keep > n_frames:
                msg = f"--keep {self.keep}: expected at most the {n_frames} frames of --input {self.input}"
                raise KdaugError(msg)
            return self.keep
        return max(1, round(self.keep * n_frames))


def disagreement(frame: Frame, energy: float, forces: np.ndarray, weights: LossWeights = LossWeights()) -> float:
    """The score of the module docstring: a prediction (energy eV, forces (n,3) eV/A) against `frame`'s labels."""
    free = ~frame.fixed
    errors = np.linalg.norm(forces[free] - frame.forces[free], axis=1)
    force_term = float(errors.mean()) if errors.size else 0.0
    return weights.energy * abs(energy - frame.energy) / frame.n_atoms + weights.forces * force_term


class Disagreement:
    """Scores frames by `disagreement` of the student's predictions with their labels."""

    def __init__(self, student: AtomisticModel, *, device: str, weights: LossWeights = LossWeights()) -> None:
        self.student, self.device, self.weights = student, device, weights

    @property
    def models(self) -> tuple[AtomisticModel, ...]:
        return (self.student,)

    def options(self) -> dict[str, Any]:
        return {"student_name": self.student.name, "student_sha256": self.student.checkpoint_sha256,
                "energy_weight": self.weights.energy, "force_weight": self.weights.forces}

    def scores(self, dataset: FrameDataset, indices: Sequence[int]) -> np.ndarray:
        frames = [dataset.frame(i) for i in indices]
        predictions = label(frames, self.student, device=self.device)
        return np.array([disagreement(frame, energy, forces, self.weights)
                         for frame, (energy, forces) in zip(frames, predictions)], dtype=np.float64)


class RandomDraw:
    """Scores frame i by a uniform draw seeded by (seed, i): the top-k is a uniform random subset."""

    models: ClassVar[tuple[AtomisticModel, ...]] = ()

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def options(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def scores(self, dataset: FrameDataset, indices: Sequence[int]) -> np.ndarray:
        return np.array([np.random.default_rng([self.seed, i]).random() for i in indices], dtype=np.float64)


def top_k(scores: np.ndarray, count: int) -> np.ndarray:
    """Input indices (ascending) of the `count` highest scores; ties to the lower index, non-finite last."""
    ranked = np.where(np.isfinite(scores), scores, -np.inf)
    return np.sort(np.argsort(-ranked, kind="stable")[:count])


class PartialScores:
    """`.scores.f64` in the output: the scores of input frames 0..len-1, appended chunk by chunk (each on disk
    before the next is computed; a torn last value from a killed run is dropped)."""

    def __init__(self, out_dir: Path, n_frames: int) -> None:
        self.path = out_dir / PARTIAL_SCORES_NAME
        raw = self.path.read_bytes() if self.path.exists() else b""
        whole = len(raw) // 8 * 8
        self.values = np.frombuffer(raw[:whole], dtype=np.float64).copy()
        if len(self.values) > n_frames:
            msg = f"--out {out_dir}: {self.path.name} holds {len(self.values)} scores for {n_frames} input frames"
            raise KdaugError(msg)
        if whole != len(raw):
            with open(self.path, "r+b") as handle:
                handle.truncate(whole)

    def append(self, scores: np.ndarray) -> None:
        with open(self.path, "ab") as handle:
            handle.write(scores.astype(np.float64).tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        self.values = np.concatenate([self.values, scores])


def selection_of(config: SelectConfig) -> Disagreement | RandomDraw:
    if config.by == "random":
        return RandomDraw(config.seed)
    return Disagreement(load_named_model("--student", config.student, device=config.device), device=config.device)


def run_select(config: SelectConfig, *, progress: bool = True) -> dict:
    """Score every input frame, keep the top-k and write them (resumable); returns the run's summary: input
    and kept counts, frames scored and written by this run, and the lowest and highest kept score."""
    named = [("--input", config.input), *([("--student", config.student)] if config.student else [])]
    check_input_paths(named)
    for flag, path in named:
        check_output_not_input(path, config.out, input_flag=flag)
    dataset = FrameDataset(config.input)
    n_frames = len(dataset)
    if not n_frames:
        raise KdaugError(f"--input {config.input}: holds no frames")
    count = config.count(n_frames)
    selection = selection_of(config)
    check_inputs(dataset, range(n_frames), selection.models)
    options = {"by": config.by, "keep": config.keep, "input_fingerprint": dataset.fingerprint(),
               **selection.options()}
    with LmdbWriter(config.out, creation_args=dataclasses.asdict(config), data_options=options) as writer:
        writer.write_batch([])  # records the options before any score is kept, so a resume is checked
        partial = PartialScores(writer.out_dir, n_frames)
        scored = n_frames - len(partial.values)
        with tqdm(total=n_frames, initial=len(partial.values), desc=f"select: score by {config.by}",
                  unit=" frames", disable=not progress) as bar:
            for start in range(len(partial.values), n_frames, config.batch_size):
                indices = range(start, min(start + config.batch_size, n_frames))
                partial.append(selection.scores(dataset, indices))
                bar.update(len(indices))
        scores = partial.values
        kept = top_k(scores, count)
        atomic_write(writer.out_dir / SCORES_NAME, lambda handle: np.savez(handle, scores=scores, kept=kept))
        done = writer.done_keys()
        pending = [int(i) for i in kept if str(i) not in done]
        with tqdm(total=count, initial=count - len(pending), desc="select: write", unit=" frames",
                  disable=not progress) as bar:
            for start in range(0, len(pending), config.batch_size):
                chunk = pending[start:start + config.batch_size]
                writer.write_batch([dataset.frame(i) for i in chunk], done=[str(i) for i in chunk],
                                   counters={"kept": len(chunk)})
                bar.update(len(chunk))
    dataset.close()
    summary = {"inputs": n_frames, "kept": count, "scored": scored, "written": len(pending), "by": config.by,
               "kept_score_min": float(scores[kept].min()), "kept_score_max": float(scores[kept].max())}
    logger.info("select: %s -> %s", summary, config.out)
    return summary
