"""The model interface every generator and the trainer use.

A model takes a PyG `Batch` (pos (N,3) Angstrom, atomic_numbers (N,), cell (S,3,3),
natoms (S,), batch (N,) system index; tags/fixed optional) and returns a
`ModelOutput`: energy (S,) eV, forces (N,3) eV/Angstrom and the KD taps asked for.

A caller that evaluates the same systems again and again (a relaxation) may name
them with `trajectory` (S,) long ids from `new_trajectories`, and ends them with
`AtomisticModel.end_trajectories`; a model may keep state per trajectory until then
(an ASE calculator's neighbour list). Results never depend on it beyond rounding
that is the same for every run of the same trajectory.
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from ase.data import chemical_symbols
from torch import nn
from torch_geometric.data import Batch

from kdaug.errors import PropertyNotAvailable, UnsupportedElement

TAPS: tuple[str, ...] = ("node", "edge", "vector", "atom_energy")
_TRAJECTORY_IDS = itertools.count()


def new_trajectories(n: int) -> torch.Tensor:
    """(n,) long ids, unique in this process, naming trajectories (see the module docstring)."""
    return torch.tensor([next(_TRAJECTORY_IDS) for _ in range(n)], dtype=torch.long)


@dataclass
class EdgeFeatures:
    """Edge tap: features (E, D) on directed edges, edge_index (2, E) as (source, target),
    vectors (E, 3) unit vectors along each edge (the model's own convention)."""

    features: torch.Tensor
    edge_index: torch.Tensor
    vectors: torch.Tensor


@dataclass
class ModelOutput:
    """energy (S,) eV; forces (N, 3) eV/Angstrom; taps by name:
    node (N, D), edge `EdgeFeatures`, vector (N, 3, D), atom_energy (N,) eV."""

    energy: torch.Tensor
    forces: torch.Tensor
    taps: dict[str, torch.Tensor | EdgeFeatures] = field(default_factory=dict)


class AtomisticModel(nn.Module, abc.ABC):
    """Base class of the adapters.

    Attributes:
        name: short name used in provenance (e.g. "chgnet", "painn-small").
        implemented_taps: the taps `forward` can return.
        supported_elements: atomic numbers the model may be asked about.
        differentiable: outputs are differentiable w.r.t. `batch.pos` (needed by
            the adversarial generator); False for label-only teachers.
        conservative: forces are -dE/dpos (False for direct-force heads).
        atom_energy_sums_to_energy: the atom_energy tap sums to the energy per system.
        weights_from_checkpoint: trained weights come from a checkpoint file (GNNs);
            False for models with built-in weights or none. A teacher of this kind
            needs a checkpoint, and only such a model takes one.
        checkpoint_sha256: sha256 of the loaded checkpoint file, None if none.

    `kdaug.models.contract.validate_model` checks these promises on a small batch.
    """

    name: str = "model"
    implemented_taps: frozenset[str] = frozenset()
    supported_elements: frozenset[int] = frozenset(range(1, 119))
    differentiable: bool = True
    conservative: bool = True
    atom_energy_sums_to_energy: bool = True
    weights_from_checkpoint: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.checkpoint_sha256: str | None = None

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        return torch.device("cpu")

    @property
    def identity(self) -> str:
        """What stamps this model's outputs (teacher caches): its name and checkpoint sha256."""
        return f"{self.name} sha256 {self.checkpoint_sha256}"

    @property
    def dtype(self) -> torch.dtype:
        """Precision of the positions the model expects: its parameters' (float32 GNNs),
        float64 for parameter-free calculators."""
        for tensor in self.parameters():
            return tensor.dtype
        return torch.float64

    def check_elements(self, atomic_numbers: Iterable[int]) -> None:
        """Raise `UnsupportedElement` naming the first element this model does not support."""
        unsupported = sorted(set(int(z) for z in atomic_numbers) - self.supported_elements)
        if unsupported:
            names = ", ".join(chemical_symbols[z] for z in unsupported)
            msg = f"model {self.name} does not support element(s) {names}"
            raise UnsupportedElement(msg)

    def check_taps(self, taps: Iterable[str]) -> tuple[str, ...]:
        taps = tuple(taps)
        for tap in taps:
            if tap not in self.implemented_taps:
                available = ", ".join(sorted(self.implemented_taps)) or "none"
                msg = f"model {self.name} has no {tap!r} tap (available: {available})"
                raise PropertyNotAvailable(msg)
        return taps

    def end_trajectories(self, ids: Iterable[int]) -> None:
        """Drop what this model keeps for these trajectories; a model that keeps nothing ignores it."""

    def cache_graphs(self) -> None:
        """Keep each structure's neighbour graph for later calls on the same structure (a trainer's epochs);
        outputs stay the same. A model that builds no graph of its own ignores it."""

    def forward(self, batch: Batch, taps: Iterable[str] = ()) -> ModelOutput:
        taps = self.check_taps(taps)
        self.check_elements(batch.atomic_numbers.unique().tolist())
        return self.compute(batch, taps)

    @abc.abstractmethod
    def compute(self, batch: Batch, taps: tuple[str, ...]) -> ModelOutput:
        """Energy, forces and the (already validated) taps for `batch`."""
