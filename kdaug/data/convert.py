"""Frame <-> torch_geometric Data (OC20 S2EF layout) <-> ase.Atoms.

The stored layout is that of fairchem's `AtomsToGraphs` output (pos, cell, atomic_numbers,
natoms, tags, fixed, sid) with the OC20 S2EF label names `y` (energy, eV) and
`force` (eV/Angstrom, raw: fixed atoms included), plus `fid` and our provenance
fields. Readers also accept AtomsToGraphs' own `energy`/`forces` names.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from torch_geometric.data import Data

from kdaug.types import Frame, Provenance

# Provenance fields are always present so that frames of different origins
# collate into one batch: '' stands for "none", parent (-1, -1) for "no parent".
_NO_PARENT = (-1, -1)


def frame_to_atoms(frame: Frame) -> Atoms:
    """ase.Atoms with tags, FixAtoms on fixed atoms and the labels as a SinglePointCalculator."""
    atoms = Atoms(
        numbers=frame.atomic_numbers,
        positions=frame.positions,
        cell=frame.cell,
        pbc=True,
        tags=frame.tags,
    )
    if frame.fixed.any():
        atoms.set_constraint(FixAtoms(mask=frame.fixed))
    atoms.calc = SinglePointCalculator(atoms, energy=frame.energy, forces=frame.forces)
    atoms.info.update(sid=frame.sid, fid=frame.fid, origin=frame.provenance.origin)
    return atoms


def fixed_mask(atoms: Atoms) -> np.ndarray:
    """(N,) bool: atoms held by a FixAtoms constraint."""
    mask = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            mask[constraint.index] = True
    return mask


def atoms_to_frame(
    atoms: Atoms,
    *,
    sid: int,
    fid: int,
    provenance: Provenance | None = None,
    energy: float | None = None,
    forces: np.ndarray | None = None,
) -> Frame:
    """Frame from ase.Atoms; labels from the arguments, else from the attached calculator."""
    if energy is None:
        energy = atoms.get_potential_energy(apply_constraint=False)
    if forces is None:
        forces = atoms.get_forces(apply_constraint=False)
    return Frame(
        positions=np.array(atoms.positions, dtype=np.float64),
        atomic_numbers=np.array(atoms.numbers, dtype=np.int64),
        cell=np.array(atoms.cell.complete(), dtype=np.float64),
        tags=np.array(atoms.get_tags(), dtype=np.int64),
        fixed=fixed_mask(atoms),
        energy=float(energy),
        forces=np.array(forces, dtype=np.float64),
        sid=int(sid),
        fid=int(fid),
        provenance=provenance or Provenance(),
    )


def frame_to_data(frame: Frame) -> Data:
    """PyG Data in the OC20 S2EF layout, with AtomsToGraphs' dtypes (float32 geometry).

    Positions are stored as given, not wrapped into the cell (AtomsToGraphs wraps),
    so a frame round-trips to within float32.
    """
    prov = frame.provenance
    return Data(
        cell=torch.tensor(frame.cell, dtype=torch.float32).view(1, 3, 3),
        pos=torch.tensor(frame.positions, dtype=torch.float32),
        atomic_numbers=torch.tensor(frame.atomic_numbers, dtype=torch.uint8),
        natoms=frame.n_atoms,
        tags=torch.tensor(frame.tags, dtype=torch.int),
        sid=frame.sid,
        fixed=torch.tensor(frame.fixed, dtype=torch.int),
        y=float(frame.energy),
        force=torch.tensor(frame.forces, dtype=torch.float32),
        fid=frame.fid,
        origin=prov.origin,
        teacher=prov.teacher or "",
        teacher_sha256=prov.teacher_sha256 or "",
        parent=torch.tensor([prov.parent or _NO_PARENT], dtype=torch.long),
        details=json.dumps(prov.details, sort_keys=True),
    )


def _scalar(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def data_energy_forces(data: Data) -> tuple[float, torch.Tensor]:
    """(energy eV, forces (N,3) eV/A) under either S2EF (`y`, `force`) or AtomsToGraphs names."""
    energy = data["y"] if "y" in data else data["energy"]
    forces = data["force"] if "force" in data else data["forces"]
    return float(_scalar(energy)), forces


def data_to_frame(data: Data) -> Frame:
    """Frame from a stored Data; frames without provenance fields count as DFT."""
    energy, forces = data_energy_forces(data)
    n_atoms = data.pos.shape[0]
    tags = data["tags"] if "tags" in data else torch.zeros(n_atoms)
    fixed = data["fixed"] if "fixed" in data else torch.zeros(n_atoms)
    parent = tuple(int(v) for v in data["parent"].view(-1)[:2]) if "parent" in data else _NO_PARENT
    details = json.loads(data["details"]) if "details" in data else {}
    provenance = Provenance(
        origin=data["origin"] if "origin" in data else "dft",
        teacher=(data["teacher"] if "teacher" in data else "") or None,
        teacher_sha256=(data["teacher_sha256"] if "teacher_sha256" in data else "") or None,
        parent=None if parent == _NO_PARENT else parent,
        details=details,
    )
    return Frame(
        positions=data.pos.double().numpy(),
        atomic_numbers=data.atomic_numbers.long().numpy(),
        cell=data.cell.view(3, 3).double().numpy(),
        tags=tags.long().numpy(),
        fixed=fixed.bool().numpy(),
        energy=energy,
        forces=forces.double().numpy(),
        sid=int(_scalar(data["sid"])) if "sid" in data else -1,
        fid=int(_scalar(data["fid"])) if "fid" in data else -1,
        provenance=provenance,
    )
