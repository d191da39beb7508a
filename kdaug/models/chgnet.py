"""CHGNet (pretrained weights shipped in the `chgnet` package) as a batched, differentiable model.

CHGNet builds its graphs from pymatgen Structures on the CPU. We let its own
converter build each graph, then replace the graph's fractional coordinates by
`pos @ cell^-1` computed from our `pos` tensor, so energy and forces stay
differentiable w.r.t. `batch.pos` (forces are built with create_graph=True).
"""

from __future__ import annotations

import torch
from pymatgen.core import Lattice, Structure
from torch_geometric.data import Batch

from kdaug.models.protocol import AtomisticModel, ModelOutput

CHGNET_VERSION = "0.3.0"


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

    def _graphs(self, batch: Batch) -> list:
        pos, cell = batch.pos, batch.cell
        numbers = batch.atomic_numbers.cpu().tolist()
        bounds = batch.ptr.cpu().tolist()
        dtype = self.dtype
        graphs = []
        for system, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            cell_s = cell[system].to(dtype)
            pos_s = pos[start:stop].to(dtype)
            structure = Structure(Lattice(cell_s.detach().cpu().double().numpy()), numbers[start:stop],
                                  pos_s.detach().cpu().double().numpy(), coords_are_cartesian=True)
            graph = self.model.graph_converter(structure, graph_id=str(system)).to(self.device)
            frac = pos_s @ torch.linalg.inv(cell_s)
            graph.atom_frac_coord = frac if frac.requires_grad else frac.detach().requires_grad_(True)
            graphs.append(graph)
        return graphs

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
