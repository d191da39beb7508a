"""CHGNet (pretrained weights shipped in the `chgnet` package) as a batched, differentiable model.

CHGNet builds its graphs from pymatgen Structures on the CPU. We let its own
converter build each graph, then replace the graph's fractional coordinates by
`pos @ cell^-1` computed from our `pos` tensor, so energy and forces stay
differentiable w.r.t. `batch.pos` (forces are built with create_graph=True).
"""

from __future__ import annotations

import pickle

import numpy as np
import torch
from pymatgen.core import Lattice, Structure
from torch_geometric.data import Batch

from kdaug.models.protocol import AtomisticModel, ModelOutput
from kdaug.workers import worker_pool

CHGNET_VERSION = "0.3.0"


def _graph(converter, cell: np.ndarray, numbers: list[int], positions: np.ndarray, graph_id: str):
    """CHGNet's CrystalGraph of one system: cell (3,3) A, positions (n,3) Cartesian A."""
    return converter(Structure(Lattice(cell), numbers, positions, coords_are_cartesian=True), graph_id=graph_id)


_worker_converter = None


def _start_graph_worker(converter) -> None:
    global _worker_converter
    torch.set_num_threads(1)
    _worker_converter = converter


def _pickled_graph(system: tuple) -> bytes:
    # Pickled by value: handing tensors through the pool would share them via one file descriptor each.
    return pickle.dumps(_graph(_worker_converter, *system), protocol=pickle.HIGHEST_PROTOCOL)


class CHGNetModel(AtomisticModel):
    """Pretrained CHGNet (eV/atom internally; we return total energies in eV).

    Taps: node = atom features entering the readout MLP (N, 64);
    atom_energy = CHGNet site energies (N,), summing to the total energy.
    """

    name = "chgnet"
    implemented_taps = frozenset({"node", "atom_energy"})
    supported_elements = frozenset(range(1, 95))

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        super().__init__()
        from chgnet.model import CHGNet

        self.model = model if model is not None else CHGNet.load(model_name=CHGNET_VERSION, use_device="cpu",
                                                                 verbose=False)
        self.checkpoint_sha256 = None  # weights ship with the pinned chgnet package
        self._graph_pool = None
        self._graph_workers = 0

    def build_graphs_in(self, workers: int) -> None:
        """Build each forward's graphs in `workers` processes (0: in this thread). CHGNet's converter is Python
        bound by the GIL, so on a GPU the host's graph building, not the model, sets the pace unless it is spread."""
        self.close_graph_workers()
        if workers > 0:
            self._graph_pool = worker_pool(workers, _start_graph_worker, self.model.graph_converter)
            for _ in range(workers):  # start the processes now, not in the first forward that needs them
                self._graph_pool.submit(int)
            self._graph_workers = workers

    def close_graph_workers(self) -> None:
        pool, self._graph_pool, self._graph_workers = self._graph_pool, None, 0
        if pool is not None:
            pool.shutdown()

    def _graphs(self, batch: Batch) -> list:
        pos, cell = batch.pos, batch.cell
        numbers = batch.atomic_numbers.cpu().tolist()
        bounds = batch.ptr.cpu().tolist()
        dtype = self.dtype
        host_pos = pos.detach().to(dtype).cpu().double().numpy()
        host_cell = cell.detach().to(dtype).cpu().double().numpy()
        systems = [(host_cell[k], numbers[start:stop], host_pos[start:stop], str(k))
                   for k, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:]))]
        pool = self._graph_pool
        if pool is None or len(systems) == 1:
            graphs = [_graph(self.model.graph_converter, *system) for system in systems]
        else:
            chunk = -(-len(systems) // self._graph_workers)
            graphs = [pickle.loads(raw) for raw in pool.map(_pickled_graph, systems, chunksize=chunk)]
        for system, graph in enumerate(graphs):
            start, stop = bounds[system], bounds[system + 1]
            frac = pos[start:stop].to(dtype) @ torch.linalg.inv(cell[system].to(dtype))
            graph.atom_frac_coord = frac if frac.requires_grad else frac.detach().requires_grad_(True)
        return [graph.to(self.device) for graph in graphs]

    def compute(self, batch: Batch, taps: tuple[str, ...]) -> ModelOutput:
        recorded = {}
        handle = None
        if "node" in taps:
            handle = self.model.mlp.register_forward_pre_hook(lambda _m, args: recorded.__setitem__("node", args[0]))
        try:
            with torch.enable_grad():
                prediction = self.model(self._graphs(batch), task="ef",
                                        return_site_energies="atom_energy" in taps)
        finally:
            if handle is not None:
                handle.remove()
        natoms = batch.natoms.to(prediction["e"].device)
        result = {}
        if "node" in taps:
            result["node"] = recorded["node"]
        if "atom_energy" in taps:
            result["atom_energy"] = torch.cat(list(prediction["site_energies"]))
        return ModelOutput(
            energy=prediction["e"].view(-1) * natoms,
            forces=torch.cat(list(prediction["f"]), dim=0),
            taps=result,
        )
