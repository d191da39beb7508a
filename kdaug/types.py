"""The record every stage stores: one `Frame` (a structure with labels) and its `Provenance`.

Units: positions and cell in Angstrom, energy in eV, forces in eV/Angstrom.
Tags follow OC20: 0 fixed subsurface, 1 surface, 2 adsorbate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Origin = Literal["dft", "synthetic", "rattled", "adversarial"]
ORIGINS: tuple[str, ...] = ("dft", "synthetic", "rattled", "adversarial")


@dataclass(frozen=True)
class Provenance:
    """Where a frame came from.

    Attributes:
        origin: "dft", "synthetic" (teacher relaxation), "rattled" or "adversarial".
        teacher: teacher name that labelled the frame, None for DFT labels.
        teacher_sha256: sha256 of the teacher checkpoint, None when there is none.
        parent: (sid, fid) of the frame this one was derived from, None otherwise.
        details: JSON-serialisable recipe facts (bulk, miller, step, sigma, ...).
    """

    origin: str = "dft"
    teacher: str | None = None
    teacher_sha256: str | None = None
    parent: tuple[int, int] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.origin not in ORIGINS:
            msg = f"provenance origin {self.origin!r} is not one of {', '.join(ORIGINS)}"
            raise ValueError(msg)


@dataclass(frozen=True, eq=False)
class Frame:
    """One labelled structure.

    Attributes:
        positions: (N, 3) float64, Angstrom.
        atomic_numbers: (N,) int64.
        cell: (3, 3) float64, Angstrom, rows are lattice vectors.
        tags: (N,) int64, OC20 tags.
        fixed: (N,) bool, True where the atom is constrained (never moves).
        energy: total energy, eV.
        forces: (N, 3) float64, raw forces on all atoms (fixed ones too), eV/Angstrom.
        sid: system id.
        fid: frame id within the system (e.g. relaxation step).
        provenance: where the frame came from.
    """

    positions: np.ndarray
    atomic_numbers: np.ndarray
    cell: np.ndarray
    tags: np.ndarray
    fixed: np.ndarray
    energy: float
    forces: np.ndarray
    sid: int
    fid: int
    provenance: Provenance = field(default_factory=Provenance)

    def __post_init__(self) -> None:
        n_atoms = len(self.atomic_numbers)
        shapes = {
            "positions": (np.shape(self.positions), (n_atoms, 3)),
            "forces": (np.shape(self.forces), (n_atoms, 3)),
            "tags": (np.shape(self.tags), (n_atoms,)),
            "fixed": (np.shape(self.fixed), (n_atoms,)),
            "cell": (np.shape(self.cell), (3, 3)),
        }
        for name, (got, want) in shapes.items():
            if got != want:
                msg = f"frame sid={self.sid} fid={self.fid}: field {name} has shape {got}, expected {want}"
                raise ValueError(msg)

    @property
    def n_atoms(self) -> int:
        return len(self.atomic_numbers)

    def replace(self, **changes: Any) -> Frame:
        """A copy with some fields changed (frames are immutable)."""
        return dataclasses.replace(self, **changes)
