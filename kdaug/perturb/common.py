"""Pieces shared by the perturbation generators: input selection, geometry checks, labelling, output."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from ase import Atoms
from ase.data import covalent_radii
from ase.neighborlist import neighbor_list
from tqdm import tqdm

from kdaug.config import check_values, option
from kdaug.data.lmdb import FrameDataset, LmdbWriter
from kdaug.data.run_record import check_input_paths, check_output_not_input
from kdaug.errors import KdaugError, UnsupportedElement
from kdaug.models import AtomisticModel
from kdaug.state import BatchState, split_atoms
from kdaug.types import Frame, Provenance


# Perturbs a chunk of (input index, frame) pairs: the frames to write and the counts they add.
ChunkWork = Callable[[list[tuple[int, Frame]]], tuple[list[Frame], dict[str, int]]]


@dataclass(frozen=True, kw_only=True)
class PerturbOptions:
    """Options every perturbation generator shares: input, output, teacher and the sample selection."""

    # Options that shape the output: a resume must keep them (with the teacher hash and input fingerprint).
    DATA_KEYS: ClassVar[tuple[str, ...]] = ("teacher", "min_distance_factor", "fraction", "seed")

    input: str = option(help="frame LMDB (file or directory of shards): OC20 S2EF, d1M or kdaug output")
    out: str = option(help="output directory (resumed if it holds a previous run)")
    teacher: str = option("chgnet", help="chgnet, emt, ase:module:Class, or a model config with --checkpoint")
    checkpoint: str | None = option(None, help="teacher checkpoint")
    device: str = option("cpu", help="cpu or cuda")
    min_distance_factor: float = option(
        0.5, help="reject frames with two atoms closer than this x their covalent-radius sum")
    fraction: float = option(1.0, help="fraction of the input frames to use")
    seed: int = option(0, help="random seed")
    batch_size: int = option(8, help="frames per forward")

    def __post_init__(self) -> None:
        check_values(self, [
            (self.min_distance_factor >= 0, "min_distance_factor", "non-negative"),
            (0 < self.fraction <= 1, "fraction", "a value in (0, 1]"),
            (self.seed >= 0, "seed", "non-negative"),
            (self.batch_size >= 1, "batch_size", "at least 1"),
        ])


def check_paths(config: PerturbOptions, **checkpoints: str | None) -> None:
    """Before anything is read: no empty path, and --out never equal to or inside --input or a checkpoint
    (`checkpoints`: flag name -> path, e.g. student=...)."""
    named = [("--input", config.input), *((f"--{flag}", path) for flag, path in
                                          {"checkpoint": config.checkpoint, **checkpoints}.items() if path is not None)]
    check_input_paths(named)
    for flag, path in named:
        check_output_not_input(path, config.out, input_flag=flag)


def check_inputs(dataset: FrameDataset, indices: Sequence[int], models: Sequence[AtomisticModel]) -> None:
    """Validate every selected input frame, and that each model knows its elements, before any output exists."""
    elements = dataset.check_entries(indices)
    for model in models:
        try:
            model.check_elements(elements)
        except UnsupportedElement as err:
            raise KdaugError(f"--input {dataset.path}: {err}") from err


def data_options(config: PerturbOptions, teacher: AtomisticModel, dataset: FrameDataset, **extra: Any) -> dict:
    """What shapes a perturbation output: `config.DATA_KEYS`, the teacher checkpoint and the input fingerprint."""
    return {**{key: getattr(config, key) for key in config.DATA_KEYS}, "teacher_sha256": teacher.checkpoint_sha256,
            "input_fingerprint": dataset.fingerprint(), **extra}


def select_indices(n_frames: int, fraction: float, seed: int) -> list[int]:
    """The same `round(fraction * n)` input indices (sorted) for a given seed."""
    if not 0 < fraction <= 1:
        msg = f"--fraction {fraction}: expected a value in (0, 1]"
        raise KdaugError(msg)
    count = max(1, round(fraction * n_frames)) if n_frames else 0
    chosen = np.random.default_rng([seed, 0]).choice(n_frames, size=count, replace=False)
    return sorted(int(i) for i in chosen)


def too_close(frame: Frame, positions: np.ndarray, min_distance_factor: float) -> bool:
    """True if two atoms are closer than `min_distance_factor` x the sum of their covalent radii (PBC aware)."""
    atoms = Atoms(numbers=frame.atomic_numbers, positions=positions, cell=frame.cell, pbc=True)
    first, _ = neighbor_list("ij", atoms, cutoff=min_distance_factor * covalent_radii[frame.atomic_numbers])
    return len(first) > 0


def label(frames: Sequence[Frame], teacher: AtomisticModel, *, device: str) -> list[tuple[float, np.ndarray]]:
    """Teacher (energy eV, forces (n,3) eV/A) for each frame's positions, one batched forward."""
    if not frames:
        return []
    with torch.no_grad():
        out = teacher(BatchState.from_frames(frames, device=device, dtype=teacher.dtype).to_batch())
    energies = out.energy.detach().double().cpu().numpy()
    forces = split_atoms(out.forces.detach().double().cpu().numpy(), [f.n_atoms for f in frames])
    return [(float(energy), f) for energy, f in zip(energies, forces)]


def derived_frame(parent: Frame, positions: np.ndarray, energy: float, forces: np.ndarray, *, copy: int,
                  copies: int, origin: str, teacher: AtomisticModel, details: dict) -> Frame:
    """A child frame: same system (sid) as its parent, fid = parent fid * copies + copy, provenance set."""
    return dataclasses.replace(
        parent, positions=positions, energy=energy, forces=forces, fid=parent.fid * copies + copy,
        provenance=Provenance(origin=origin, teacher=teacher.name, teacher_sha256=teacher.checkpoint_sha256,
                              parent=(parent.sid, parent.fid), details=details),
    )


def pending_chunks(dataset: FrameDataset, indices: Sequence[int], writer: LmdbWriter, chunk: int,
                   ) -> Iterator[list[tuple[int, Frame]]]:
    """Chunks of (input index, frame) not yet marked done in the output (resume)."""
    done = writer.done_keys()
    todo = [i for i in indices if str(i) not in done]
    for start in range(0, len(todo), chunk):
        yield [(i, dataset.frame(i)) for i in todo[start:start + chunk]]


def perturb_dataset(dataset: FrameDataset, config: PerturbOptions, work: ChunkWork, *, desc: str,
                    models: Sequence[AtomisticModel], options: dict, progress: bool = True) -> Counter:
    """Run `work` on each chunk of the selected input frames not yet done and write what it returns (one
    transaction per chunk, resumable); its counts go to the manifest's counters, and their sum over this
    run is returned.

    Before any output exists, every selected frame is validated and checked against the elements of
    `models`; the output records `options` (see `data_options`) and refuses a resume made with others.
    """
    indices = select_indices(len(dataset), config.fraction, config.seed)
    check_inputs(dataset, indices, models)
    counts: Counter = Counter()
    with LmdbWriter(config.out, creation_args=dataclasses.asdict(config), data_options=options) as writer, \
            tqdm(total=len(indices), desc=desc, unit=" frames", disable=not progress) as bar:
        for chunk in pending_chunks(dataset, indices, writer, config.batch_size):
            frames, tally = work(chunk)
            writer.write_batch(frames, done=[str(i) for i, _ in chunk], counters={k: v for k, v in tally.items() if v})
            counts.update(tally)
            bar.update(len(chunk))
    dataset.close()
    return counts
