"""Fit the student's output transform on the training set: per-element energy references and normalizers.

As fairchem's `fit_linear_references` and `fit_normalizers` (modules/normalization), in one pass over a
sample of at most `MAX_FIT_SAMPLES` training frames (drawn without replacement by the run's seed):

1. references: least squares of the system energies (eV) on the element counts, over the elements
   present (numpy `lstsq` in float64; its minimum-norm solution where compositions are linearly
   dependent, e.g. every slab has one adsorbate); absent elements get 0;
2. energy normalizer: mean and standard deviation (ddof 1, fairchem's choice for a non-zero mean) of the
   referenced energies per system;
3. force normalizer: mean 0 and the root mean square of the force vectors of free atoms (eV/A), the force
   loss's atoms (fairchem's fit uses every atom).

fairchem's functions are not called because they would read the sample twice through DataLoaders of full
batches, hold the energies in float32 (1e-7 relative) and count fixed atoms in the force rms.

A conservative student (forces = -dE/dpos) gets the force rms as its energy scale too, since one scale
must multiply both for its forces to stay the gradient of its energy (fairchem's OC20 configs likewise
share one std). A scale that is zero or undefined (one frame, no free atoms) is 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MAX_FIT_SAMPLES = 10_000
N_ELEMENTS = 119  # fairchem's LinearReferences: index = atomic number, 0 unused


@dataclass(frozen=True)
class FittedTransform:
    """What `OutputTransform.set` takes: (mean, rmsd) of energy (eV) and forces (eV/A), (119,) eV references."""

    energy: tuple[float, float]
    forces: tuple[float, float]
    references: torch.Tensor
    n_samples: int


def fit_references(counts: np.ndarray, energies: np.ndarray) -> np.ndarray:
    """(119,) eV per element minimising sum_s (E_s - counts_s . refs)^2 over the present elements.

    Args:
        counts: (S, 119) atoms of each element per system.
        energies: (S,) eV.
    """
    present = counts.sum(axis=0) > 0
    references = np.zeros(counts.shape[1])
    references[present] = np.linalg.lstsq(counts[:, present].astype(np.float64), energies.astype(np.float64),
                                          rcond=None)[0]
    return references


def _scale(value: float) -> float:
    return value if np.isfinite(value) and value > 0 else 1.0


def fit_output_transform(dataset: torch.utils.data.Dataset, *, energy_reference: str, normalize: bool,
                         conservative: bool, seed: int) -> FittedTransform:
    """Fit on `dataset` (samples with atomic_numbers, y eV, force (N,3) eV/A, fixed) as the module docstring
    says; `energy_reference` "linear" or "none", `normalize` False leaves both normalizers identity."""
    n_total = len(dataset)
    indices = np.arange(n_total)
    if n_total > MAX_FIT_SAMPLES:
        indices = np.sort(np.random.default_rng(seed).choice(n_total, MAX_FIT_SAMPLES, replace=False))
    counts = np.zeros((len(indices), N_ELEMENTS))
    energies = np.zeros(len(indices))
    force_squares, n_free = 0.0, 0
    for row, index in enumerate(indices):
        sample = dataset[int(index)]
        counts[row] = np.bincount(sample.atomic_numbers.numpy(), minlength=N_ELEMENTS)
        energies[row] = float(sample.y)
        free = ~sample.fixed.bool()
        force_squares += float(sample.force[free].double().square().sum())
        n_free += int(free.sum())
    references = fit_references(counts, energies) if energy_reference == "linear" else np.zeros(N_ELEMENTS)
    energy, forces = (0.0, 1.0), (0.0, 1.0)
    if normalize:
        referenced = energies - counts @ references
        mean = float(referenced.mean())
        std = float(referenced.std(ddof=1 if mean != 0 and len(referenced) > 1 else 0))
        force_rms = _scale(np.sqrt(force_squares / n_free) if n_free else np.nan)
        energy, forces = (mean, force_rms if conservative else _scale(std)), (0.0, force_rms)
    return FittedTransform(energy=energy, forces=forces, references=torch.tensor(references, dtype=torch.float32),
                           n_samples=len(indices))
