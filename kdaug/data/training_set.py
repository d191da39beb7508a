"""The training samples: DFT and synthetic frame LMDBs as one indexable dataset.

A sample's group comes from the flag its dataset was given under (`--train` -> DFT,
`--synthetic` -> synthetic), so LMDBs without provenance fields (OC20, fairchem tutorials)
work; the stored provenance origin is kept for per-origin metrics.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch_geometric.data import Batch, Data

from kdaug.data.convert import data_energy_forces
from kdaug.data.lmdb import FrameDataset
from kdaug.errors import KdaugError


def _open(path: str | os.PathLike, flag: str) -> FrameDataset:
    try:
        dataset = FrameDataset(path)
    except KdaugError as err:
        msg = f"{flag} {err}"
        raise KdaugError(msg) from err
    if len(dataset) == 0:
        msg = f"{flag} {path}: holds no frames (expected at least one)"
        raise KdaugError(msg)
    return dataset


class SampleRecords(Protocol):
    """Further attributes of each sample, read with it (in the DataLoader worker that loads it), e.g. a teacher
    cache's targets (`kdaug.train.teacher_cache.TeacherCache`)."""

    def sample_attributes(self, dataset_idx: int, local_idx: int, n_atoms: int) -> dict[str, torch.Tensor]:
        """{attribute name: value} of frame `local_idx` of dataset `dataset_idx` (which has `n_atoms` atoms)."""
        ...

    def close(self) -> None: ...


class TrainingSet(torch.utils.data.Dataset):
    """Frames of the DFT datasets, then of the synthetic ones, as training samples.

    Indices 0 .. n_dft-1 are DFT samples, n_dft .. n_dft+n_synthetic-1 synthetic ones
    (the index ranges `kdaug.train.mixing.MixedBatchSampler` draws from).

    Args:
        dft_paths: ground-truth LMDB files or directories of shards (`--train`).
        synthetic_paths: synthetic ones (`--synthetic`).
        flags: the flag names used in errors for the two groups (e.g. ("--val", "--val")).

    Raises:
        KdaugError: a path is missing, not a frame LMDB or holds no frames (names flag and path).
    """

    def __init__(
        self,
        dft_paths: Sequence[str | os.PathLike],
        synthetic_paths: Sequence[str | os.PathLike] = (),
        *,
        flags: tuple[str, str] = ("--train", "--synthetic"),
    ) -> None:
        opened: dict[Path, FrameDataset] = {}

        def open_once(path: str | os.PathLike, flag: str) -> FrameDataset:
            # py-lmdb allows one handle per file and process: a path given twice shares its reader
            key = Path(path).resolve()
            if key not in opened:
                opened[key] = _open(path, flag)
            return opened[key]

        self._names = [f"{flags[0]} {path}" for path in dft_paths] + [f"{flags[1]} {path}" for path in synthetic_paths]
        dft = [open_once(path, flags[0]) for path in dft_paths]
        synthetic = [open_once(path, flags[1]) for path in synthetic_paths]
        self.datasets: list[FrameDataset] = [*dft, *synthetic]
        self.n_dft = sum(len(d) for d in dft)
        self.n_synthetic = sum(len(d) for d in synthetic)
        self._n_dft_datasets = len(dft)
        self._offsets = np.cumsum([0, *(len(d) for d in self.datasets)])
        self._records: SampleRecords | None = None

    def attach(self, records: SampleRecords) -> None:
        """Add the attributes of `records` to every sample from now on; `close` closes `records` too."""
        self._records = records

    def __len__(self) -> int:
        return self.n_dft + self.n_synthetic

    def fingerprints(self) -> list[str]:
        """`FrameDataset.fingerprint()` of each dataset, in `dataset_idx` order."""
        return [dataset.fingerprint() for dataset in self.datasets]

    def names(self) -> list[str]:
        """Each dataset as the user named it ("--train PATH"), in `dataset_idx` order."""
        return list(self._names)

    def locate(self, index: int) -> tuple[int, int]:
        """(dataset_idx, local_idx) of sample `index`."""
        if not 0 <= index < len(self):
            msg = f"sample index {index} out of range for {len(self)} samples"
            raise IndexError(msg)
        dataset_idx = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return dataset_idx, int(index - self._offsets[dataset_idx])

    def __getitem__(self, index: int) -> Data:
        """One sample with exactly these fields (so samples of any LMDB collate together):

        pos (N,3) float32 Angstrom, atomic_numbers (N,) long, cell (1,3,3) float32 Angstrom,
        natoms int, tags (N,) long (0 when absent), fixed (N,) bool (False when absent),
        y float energy eV, force (N,3) float32 eV/Angstrom (raw, fixed atoms included),
        synthetic bool (given under the synthetic flag), origin str (stored provenance, "dft" when absent),
        dataset_idx and local_idx int (which dataset and which frame in it),
        and the attributes of the attached `SampleRecords`, if any.
        """
        dataset_idx, local_idx = self.locate(int(index))
        stored = self.datasets[dataset_idx][local_idx]
        energy, forces = data_energy_forces(stored)
        n_atoms = stored.pos.shape[0]
        tags = stored["tags"] if "tags" in stored else torch.zeros(n_atoms)
        fixed = stored["fixed"] if "fixed" in stored else torch.zeros(n_atoms)
        extra = {} if self._records is None else self._records.sample_attributes(dataset_idx, local_idx, n_atoms)
        return Data(
            pos=stored.pos.to(torch.float32),
            atomic_numbers=stored.atomic_numbers.long(),
            cell=stored.cell.to(torch.float32).view(1, 3, 3),
            natoms=n_atoms,
            tags=tags.long(),
            fixed=fixed.bool(),
            y=energy,
            force=forces.to(torch.float32),
            synthetic=dataset_idx >= self._n_dft_datasets,
            origin=stored["origin"] if "origin" in stored else "dft",
            dataset_idx=dataset_idx,
            local_idx=local_idx,
            **extra,
        )

    def close(self) -> None:
        for dataset in self.datasets:
            dataset.close()
        if self._records is not None:
            self._records.close()


def collate(data_list: Sequence[Data]) -> Batch:
    """DataLoader collate_fn: a PyG Batch with batch (N,) system index and ptr (S+1,); per system
    y (S,) eV, natoms (S,) long, synthetic (S,) bool, dataset_idx/local_idx (S,) long, origin list[str];
    attached per-atom attributes are concatenated over atoms, per-system ones of shape (1, ...) over systems."""
    return Batch.from_data_list(list(data_list))
