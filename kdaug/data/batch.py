"""Batched model input: one PyG `Batch` of flat per-atom tensors plus a system index.

Fields: pos (N,3) Angstrom, atomic_numbers (N,) long, cell (S,3,3) Angstrom,
natoms (S,) long, batch (N,) system index, ptr (S+1,), tags (N,) long, fixed (N,) bool.
Built through `kdaug.state.BatchState.to_batch`; these are shortcuts for loose tensors and frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch_geometric.data import Batch

from kdaug.state import BatchState, Structure


def make_batch(
    pos: torch.Tensor,
    atomic_numbers: torch.Tensor,
    cell: torch.Tensor,
    natoms: torch.Tensor,
    tags: torch.Tensor | None = None,
    fixed: torch.Tensor | None = None,
) -> Batch:
    """Assemble a Batch from flat tensors (`pos` keeps its autograd graph); tags 0 and nothing fixed by default."""
    device = pos.device
    natoms = natoms.to(device=device, dtype=torch.long)
    n_atoms = pos.shape[0]
    state = BatchState(
        positions=pos,
        atomic_numbers=atomic_numbers.to(device=device, dtype=torch.long),
        tags=(tags if tags is not None else torch.zeros(n_atoms)).to(device=device, dtype=torch.long),
        fixed=(fixed if fixed is not None else torch.zeros(n_atoms)).to(device=device, dtype=torch.bool),
        system_idx=torch.repeat_interleave(torch.arange(len(natoms), device=device), natoms),
        cell=cell.to(device=device, dtype=pos.dtype),
        sid=torch.arange(len(natoms), device=device),
    )
    return state.to_batch()


def batch_from_frames(frames: Sequence[Structure], *, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> Batch:
    """Batch of the structures of `frames` (labels are not included)."""
    return BatchState.from_frames(frames, device=device, dtype=dtype).to_batch()
