"""`BatchState`: many systems as flat tensors plus a system index (after torch-sim's `SimState`).

Every field has exactly one scope: per atom (N rows, in system order) or per
system (S rows). `select`, `concat`, `split` and `to` work from the scopes, so
subclasses (the optimizers' states) only declare their extra fields with
`per_atom()` / `per_system()`. Segment reductions over `system_idx` live here
too. Units: positions and cell in Angstrom.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, Self

import numpy as np
import torch

ATOM, SYSTEM = "atom", "system"


def per_atom() -> Any:
    """Declare a dataclass field with one row per atom (N, ...)."""
    return dataclasses.field(metadata={"scope": ATOM})


def per_system() -> Any:
    """Declare a dataclass field with one row per system (S, ...)."""
    return dataclasses.field(metadata={"scope": SYSTEM})


def segment_sum(values: torch.Tensor, system_idx: torch.Tensor, n_systems: int) -> torch.Tensor:
    """(N, ...) -> (S, ...) sums per system (0 for a system with no atoms)."""
    out = torch.zeros((n_systems, *values.shape[1:]), dtype=values.dtype, device=values.device)
    return out.index_add_(0, system_idx, values)


def segment_max(values: torch.Tensor, system_idx: torch.Tensor, n_systems: int) -> torch.Tensor:
    """(N,) -> (S,) maxima per system (0 for a system with no atoms)."""
    out = torch.zeros(n_systems, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, system_idx, values, reduce="amax", include_self=False)


def split_atoms(values: np.ndarray, n_atoms: Sequence[int]) -> list[np.ndarray]:
    """Per-atom rows (N, ...) of consecutive systems -> one array per system ((n_atoms[k], ...) views)."""
    return np.split(values, np.cumsum(n_atoms)[:-1])


class Structure(Protocol):
    """What a batch is built from: a `kdaug.types.Frame` or a label-less one (a `RelaxTask`)."""

    sid: int
    positions: np.ndarray
    atomic_numbers: np.ndarray
    cell: np.ndarray
    tags: np.ndarray
    fixed: np.ndarray


@dataclasses.dataclass(eq=False)
class BatchState:
    """S systems, N atoms in all.

    Attributes:
        positions: (N, 3) float, Angstrom.
        atomic_numbers: (N,) long.
        tags: (N,) long, OC20 tags (0 subsurface, 1 surface, 2 adsorbate).
        fixed: (N,) bool, True where an atom is constrained (never moves).
        system_idx: (N,) long, the system of each atom; atoms come in system order.
        cell: (S, 3, 3) float, Angstrom, rows are lattice vectors.
        sid: (S,) long, system ids.
    """

    positions: torch.Tensor = per_atom()
    atomic_numbers: torch.Tensor = per_atom()
    tags: torch.Tensor = per_atom()
    fixed: torch.Tensor = per_atom()
    system_idx: torch.Tensor = per_atom()
    cell: torch.Tensor = per_system()
    sid: torch.Tensor = per_system()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in cls.__dict__.get("__annotations__", {}):
            declared = cls.__dict__.get(name)
            if not (isinstance(declared, dataclasses.Field) and declared.metadata.get("scope") in (ATOM, SYSTEM)):
                msg = f"{cls.__name__}.{name}: declare the field with per_atom() or per_system()"
                raise TypeError(msg)

    def __post_init__(self) -> None:
        rows = {ATOM: len(self.system_idx), SYSTEM: len(self.cell)}
        for name, scope in self.scopes().items():
            if len(getattr(self, name)) != rows[scope]:
                msg = f"{type(self).__name__}.{name}: {len(getattr(self, name))} rows, expected {rows[scope]} ({scope})"
                raise ValueError(msg)

    @classmethod
    def scopes(cls) -> dict[str, str]:
        """Field name -> ATOM or SYSTEM."""
        return {f.name: f.metadata["scope"] for f in dataclasses.fields(cls)}

    @property
    def n_systems(self) -> int:
        return len(self.cell)

    @property
    def n_atoms(self) -> torch.Tensor:
        """(S,) long, atoms per system (computed on the device, no host read)."""
        return torch.bincount(self.system_idx, minlength=self.n_systems)

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def replace(self, **changes: torch.Tensor) -> Self:
        """A copy with some fields changed (tensors not named are shared)."""
        return dataclasses.replace(self, **changes)

    def structure(self) -> BatchState:
        """The `BatchState` fields alone (shared, no copy), without a subclass's extra fields."""
        return BatchState(**{name: getattr(self, name) for name in BatchState.scopes()})

    def select(self, system_mask: torch.Tensor) -> Self:
        """The systems where `system_mask` (S,) bool is True, in order; their atoms follow."""
        atom_mask = system_mask[self.system_idx]
        values = {name: getattr(self, name)[atom_mask if scope == ATOM else system_mask]
                  for name, scope in self.scopes().items()}
        values["system_idx"] = (torch.cumsum(system_mask, 0) - 1)[values["system_idx"]]
        return type(self)(**values)

    @classmethod
    def concat(cls, states: Sequence[BatchState]) -> Self:
        """One state with the systems of `states` in order (all of type `cls`)."""
        offsets = np.cumsum([0, *(s.n_systems for s in states[:-1])])
        values = {name: torch.cat([getattr(s, name) for s in states]) for name in cls.scopes()}
        values["system_idx"] = torch.cat([s.system_idx + int(offset) for s, offset in zip(states, offsets)])
        return cls(**values)

    def split(self) -> list[Self]:
        """One single-system state per system (one host read of the atom counts)."""
        counts = self.n_atoms.tolist()
        parts = {name: torch.split(getattr(self, name), counts if scope == ATOM else 1)
                 for name, scope in self.scopes().items()}
        states = [type(self)(**{name: part[k] for name, part in parts.items()}) for k in range(self.n_systems)]
        return [s.replace(system_idx=torch.zeros_like(s.system_idx)) for s in states]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Self:
        """Every field on `device`; floating-point fields in `dtype` (None: unchanged)."""
        def move(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(device=device, dtype=dtype if dtype is not None and tensor.is_floating_point() else None)

        return type(self)(**{name: move(getattr(self, name)) for name in self.scopes()})

    @classmethod
    def from_frames(cls, frames: Sequence[Structure], *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float64) -> BatchState:
        """The structures of `frames` (labels, if any, are left out); positions and cell in `dtype`."""
        def cat(name: str, kind: torch.dtype) -> torch.Tensor:
            return torch.as_tensor(np.concatenate([getattr(f, name) for f in frames]), dtype=kind, device=device)

        counts = torch.tensor([len(f.atomic_numbers) for f in frames], device=device)
        return BatchState(
            positions=cat("positions", dtype), atomic_numbers=cat("atomic_numbers", torch.long),
            tags=cat("tags", torch.long), fixed=cat("fixed", torch.bool),
            system_idx=torch.repeat_interleave(torch.arange(len(frames), device=device), counts),
            cell=torch.as_tensor(np.stack([f.cell for f in frames]), dtype=dtype, device=device),
            sid=torch.tensor([int(f.sid) for f in frames], dtype=torch.long, device=device),
        )

    @classmethod
    def from_batch(cls, batch: Any) -> BatchState:
        """The structures of a model input `Batch` (see `to_batch`); tensors shared, no copy."""
        n_systems = len(batch.natoms)
        n_atoms = len(batch.pos)
        tags = batch.tags if "tags" in batch else torch.zeros(n_atoms, dtype=torch.long, device=batch.pos.device)
        fixed = batch.fixed if "fixed" in batch else torch.zeros(n_atoms, dtype=torch.bool, device=batch.pos.device)
        sid = batch.sid if torch.is_tensor(batch.get("sid")) else torch.arange(n_systems, device=batch.pos.device)
        return BatchState(positions=batch.pos, atomic_numbers=batch.atomic_numbers.long(), tags=tags.long(),
                          fixed=fixed.bool(), system_idx=batch.batch, cell=batch.cell.view(n_systems, 3, 3),
                          sid=sid.long())

    def to_batch(self, dtype: torch.dtype | None = None) -> Any:
        """The torch_geometric `Batch` models take (pos, atomic_numbers, cell, natoms, batch, ptr, tags,
        fixed, sid); positions and cell in `dtype` (None: as stored). `pos` keeps its autograd graph."""
        from torch_geometric.data import Batch

        pos = self.positions if dtype is None else self.positions.to(dtype)
        natoms = self.n_atoms
        ptr = torch.zeros(self.n_systems + 1, dtype=torch.long, device=self.device)
        ptr[1:] = torch.cumsum(natoms, 0)
        return Batch(pos=pos, atomic_numbers=self.atomic_numbers, cell=self.cell.to(pos.dtype), natoms=natoms,
                     batch=self.system_idx, ptr=ptr, tags=self.tags, fixed=self.fixed, sid=self.sid)
