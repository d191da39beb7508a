"""Batched model input: one PyG `Batch` of flat per-atom tensors plus a system index.

Fields: pos (N,3) Angstrom, atomic_numbers (N,) long, cell (S,3,3) Angstrom,
natoms (S,) long, batch (N,) system index, ptr (S+1,), tags (N,) long, fixed (N,) bool.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch_geometric.data import Batch

from kdaug.types import Frame


def make_batch(
    pos: torch.Tensor,
    atomic_numbers: torch.Tensor,
    cell: torch.Tensor,
    natoms: torch.Tensor,
    tags: torch.Tensor | None = None,
    fixed: torch.Tensor | None = None,
) -> Batch:
    """Assemble a Batch from flat tensors (no copies; `pos` keeps its autograd graph)."""
    device = pos.device
    natoms = natoms.to(device=device, dtype=torch.long)
    system_idx = torch.repeat_interleave(torch.arange(len(natoms), device=device), natoms)
    ptr = torch.zeros(len(natoms) + 1, dtype=torch.long, device=device)
    ptr[1:] = torch.cumsum(natoms, 0)
    n_atoms = pos.shape[0]
    return Batch(
        pos=pos,
        atomic_numbers=atomic_numbers.to(device=device, dtype=torch.long),
        cell=cell.to(device=device, dtype=pos.dtype),
        natoms=natoms,
        batch=system_idx,
        ptr=ptr,
        tags=(tags if tags is not None else torch.zeros(n_atoms, dtype=torch.long)).to(device),
        fixed=(fixed if fixed is not None else torch.zeros(n_atoms, dtype=torch.bool)).to(device),
    )


def batch_from_frames(frames: Sequence[Frame], *, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> Batch:
    """Batch of the structures of `frames` (labels are not included)."""
    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(f, name) for f in frames])

    return make_batch(
        pos=torch.as_tensor(cat("positions"), dtype=dtype, device=device),
        atomic_numbers=torch.as_tensor(cat("atomic_numbers")),
        cell=torch.as_tensor(np.stack([f.cell for f in frames]), dtype=dtype),
        natoms=torch.tensor([f.n_atoms for f in frames]),
        tags=torch.as_tensor(cat("tags")),
        fixed=torch.as_tensor(cat("fixed")),
    )

