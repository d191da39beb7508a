"""Periodic radius graphs built per structure, and kept for a trainer that sees the same structures every epoch.

fairchem's `radius_graph_pbc` over a batch keeps at most max_neighbors neighbours per atom, and which of
several equidistant neighbours it keeps depends on the other structures in the batch: in the mini-emt
data a PaiNN's energy moved by up to 28 meV with its batch mates. `GraphCache` builds each structure's
graph alone, as fairchem does with `use_pbc_single`, so a prediction does not depend on its batch.

With `max_structures` > 0 it also keeps the graphs, under a key made of the structure itself (atomic
numbers, positions, cell, pbc): a moved atom is another key, so a graph is never stale. fairchem rebuilds
the graph in every forward, which on CPU is most of a small model's step. The least recently used graphs
are dropped beyond `max_structures`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch_geometric.data import Batch, Data


class GraphCache:
    """edge_index, cell_offsets and neighbors of fairchem's `radius_graph_pbc`, per structure."""

    def __init__(self, cutoff: float, max_neighbors: int, enforce_max_neighbors_strictly: bool,
                 max_structures: int = 0) -> None:
        self.cutoff, self.max_neighbors = cutoff, max_neighbors
        self.enforce_max_neighbors_strictly = enforce_max_neighbors_strictly
        self.max_structures = max_structures
        self._graphs: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def graph(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(edge_index (2, E) long, cell_offsets (E, 3) in pos's dtype, neighbors (S,) long) for `batch`,
        the inputs fairchem's `generate_graph` reads with otf_graph off."""
        starts = torch.cumsum(batch.natoms, 0) - batch.natoms
        pbc = batch.pbc.view(-1, 3) if "pbc" in batch else None
        # keys are hashed from one host copy of the batch (a single device sync, not one per structure)
        host = [t.detach().cpu() if t is not None else None
                for t in (batch.atomic_numbers, batch.pos, batch.cell, pbc)] if self.max_structures else None
        pieces = [self._structure(batch.pos, batch.cell, pbc, host, i, int(start), int(n))
                  for i, (start, n) in enumerate(zip(starts.tolist(), batch.natoms.tolist()))]
        edge_index = torch.cat([local.long() + start for (local, _), start in zip(pieces, starts.tolist())], 1)
        cell_offsets = torch.cat([offsets for _, offsets in pieces]).to(batch.pos.dtype)
        neighbors = torch.tensor([local.shape[1] for local, _ in pieces], dtype=torch.long)
        return edge_index.to(batch.pos.device), cell_offsets.to(batch.pos.device), neighbors.to(batch.pos.device)

    def _structure(self, pos: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor | None,
                   host: list[torch.Tensor | None] | None, index: int, start: int, n: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        atoms, one = slice(start, start + n), slice(index, index + 1)
        pos, cell, pbc = pos[atoms].detach(), cell[one].detach(), pbc[one] if pbc is not None else None
        if host is None:
            return self._build(pos, cell, pbc)
        numbers, host_pos, host_cell, host_pbc = host
        key = _key(numbers[atoms], host_pos[atoms], host_cell[one], host_pbc[one] if host_pbc is not None else None)
        found = self._graphs.get(key)
        if found is not None:
            self.hits += 1
            self._graphs.move_to_end(key)
            return found
        self.misses += 1
        found = self._build(pos, cell, pbc)
        self._graphs[key] = found
        if len(self._graphs) > self.max_structures:
            self._graphs.popitem(last=False)
        return found

    def _build(self, pos: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor | None):
        from fairchem.core.common.utils import radius_graph_pbc

        structure = Data(pos=pos, cell=cell, natoms=torch.tensor([pos.shape[0]], device=pos.device))
        if pbc is not None:
            structure.pbc = pbc
        edge_index, cell_offsets, _ = radius_graph_pbc(structure, self.cutoff, self.max_neighbors,
                                                       self.enforce_max_neighbors_strictly)
        # kept small on the CPU: int32 indices, int8 image offsets (whole lattice vectors)
        return edge_index.to("cpu", torch.int32), cell_offsets.to("cpu", torch.int8)


def _key(numbers: torch.Tensor, pos: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor | None) -> bytes:
    """A 16-byte digest of a structure's CPU tensors (dtype and bytes of each)."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in (numbers, pos, cell, pbc):
        if tensor is not None:
            digest.update(str(tensor.dtype).encode())
            digest.update(tensor.contiguous().numpy().tobytes())
    return digest.digest()
