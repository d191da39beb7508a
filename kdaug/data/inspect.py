"""Summary statistics of a frame dataset (`kdaug inspect`)."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import numpy as np
from ase.data import chemical_symbols
from tqdm import tqdm

from kdaug.data.convert import data_energy_forces
from kdaug.data.lmdb import FrameDataset


def _summary(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"min": float("nan"), "mean": float("nan"), "max": float("nan"), "std": float("nan")}
    return {
        "min": float(values.min()),
        "mean": float(values.mean()),
        "max": float(values.max()),
        "std": float(values.std()),
    }


def inspect_dataset(path: str | os.PathLike, *, progress: bool = True) -> dict[str, Any]:
    """Counts and label statistics over every frame under `path`.

    Returns a JSON-ready dict: n_samples, n_shards, origins, elements (symbol -> atom
    count), atoms_per_sample, energy_ev and force_norm_ev_per_ang (min/mean/max/std;
    force norms over all atoms) and fixed_fraction (fixed atoms / all atoms).
    """
    dataset = FrameDataset(path)
    origins: Counter[str] = Counter()
    elements: Counter[int] = Counter()
    n_atoms, energies, force_norms = [], [], []
    n_fixed = 0
    for index in tqdm(range(len(dataset)), desc="inspect", unit=" frames", disable=not progress):
        data = dataset[index]
        energy, forces = data_energy_forces(data)
        origins[data["origin"] if "origin" in data else "dft"] += 1
        numbers = data.atomic_numbers.long().numpy()
        elements.update(numbers.tolist())
        n_atoms.append(len(numbers))
        energies.append(energy)
        force_norms.append(forces.double().norm(dim=1).numpy())
        if "fixed" in data:
            n_fixed += int(data.fixed.bool().sum())
    dataset.close()
    total_atoms = int(np.sum(n_atoms))
    return {
        "path": str(path),
        "n_samples": len(dataset),
        "n_shards": len(dataset.files),
        "origins": dict(sorted(origins.items())),
        "elements": {chemical_symbols[z]: n for z, n in sorted(elements.items())},
        "atoms_per_sample": _summary(np.asarray(n_atoms, dtype=float)),
        "energy_ev": _summary(np.asarray(energies)),
        "force_norm_ev_per_ang": _summary(np.concatenate(force_norms) if force_norms else np.zeros(0)),
        "fixed_fraction": n_fixed / total_atoms if total_atoms else float("nan"),
    }


def format_report(report: dict[str, Any]) -> str:
    """Human-readable lines for `inspect_dataset`'s result."""

    def stats(d: dict[str, float]) -> str:
        return f"min {d['min']:.4g}  mean {d['mean']:.4g}  max {d['max']:.4g}  std {d['std']:.4g}"

    lines = [
        f"path              {report['path']}",
        f"samples           {report['n_samples']} in {report['n_shards']} shard(s)",
        "origins           " + ", ".join(f"{k} {v}" for k, v in report["origins"].items()),
        "elements          " + ", ".join(f"{k} {v}" for k, v in report["elements"].items()),
        f"atoms/sample      {stats(report['atoms_per_sample'])}",
        f"energy (eV)       {stats(report['energy_ev'])}",
        f"|force| (eV/A)    {stats(report['force_norm_ev_per_ang'])}",
        f"fixed atoms       {report['fixed_fraction']:.3f} of all atoms",
    ]
    return "\n".join(lines)
