"""`OutputTransform`: eV and eV/A from a GNN trained on normalized, element-referenced targets.

fairchem trains with `normalize_labels` (legacy OC20 configs) or `dataset.transforms.normalizer` and
`element_references` (fairchem 1.x) and undoes both in `OCPTrainer._denorm_preds`: first its `Normalizer`,
then its `LinearReferences`. This module applies the same fairchem modules in the same order:

    energy (S,) eV          = rmsd_E * raw_energy + mean_E + sum over the system's atoms of ref[Z]
    forces (N,3) eV/A       = rmsd_F * raw_forces + mean_F       (mean_F is 0 in every fitted or OC20 setup)
    atom_energy_i (N,) eV   = rmsd_E * raw_atom_energy_i + mean_E / n_atoms(system of i) + ref[Z_i]

so per-atom energies of an extensive model still sum to the system energy. With no normalizers and no
references (the defaults) every output is unchanged (x * 1 + 0).

Checkpoints store them as fairchem 1.10 does: `checkpoint["normalizers"]` = {"energy": {"mean", "rmsd"},
"forces": {...}} (legacy: {"target": {"mean", "std"}, "grad_target": {...}}) and `checkpoint["elementrefs"]`
= {"energy": {"element_references": (119,) eV}}.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch_geometric.data import Batch

from kdaug.errors import KdaugError

# fairchem 1.10's `BaseTrainer.load_checkpoint` maps the legacy OC20 normalizer names the same way.
_LEGACY_KEYS = {"target": "energy", "grad_target": "forces"}


class OutputTransform(nn.Module):
    """fairchem `Normalizer`s for energy and forces and `LinearReferences` for the energy (module docstring)."""

    def __init__(self) -> None:
        from fairchem.core.modules.normalization.element_references import LinearReferences
        from fairchem.core.modules.normalization.normalizer import Normalizer

        super().__init__()
        self.energy = Normalizer()
        self.forces = Normalizer()
        self.references = LinearReferences()

    def set(self, *, energy: tuple[float, float] | None = None, forces: tuple[float, float] | None = None,
            references: torch.Tensor | None = None) -> None:
        """Replace the (mean, rmsd) of energy (eV) / forces (eV/A) and the (119,) eV element references given."""
        with torch.no_grad():
            for normalizer, values in ((self.energy, energy), (self.forces, forces)):
                if values is not None:
                    normalizer.mean.fill_(values[0])
                    normalizer.rmsd.fill_(values[1])
            if references is not None:
                self.references.element_references.copy_(references)

    @property
    def is_identity(self) -> bool:
        return (float(self.energy.mean) == 0 and float(self.energy.rmsd) == 1 and float(self.forces.mean) == 0
                and float(self.forces.rmsd) == 1 and not bool(self.references.element_references.any()))

    @property
    def keeps_forces_conservative(self) -> bool:
        """forces == -d energy / d pos still holds after the transform when raw forces are raw gradients."""
        return float(self.forces.mean) == 0 and float(self.forces.rmsd) == float(self.energy.rmsd)

    def energy_out(self, raw: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(S,) eV from the model's (S,) raw energies."""
        return self.references(self.energy(raw), batch, reshaped=False)

    def forces_out(self, raw: torch.Tensor) -> torch.Tensor:
        """(N, 3) eV/A from the model's (N, 3) raw forces."""
        return self.forces(raw)

    def atom_energy_out(self, raw: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(N,) eV per atom from the model's (N,) raw per-atom energies (they sum to `energy_out`)."""
        atoms_per_system = batch.natoms[batch.batch].to(raw.dtype)
        refs = self.references.element_references[batch.atomic_numbers.long()].to(raw.dtype)
        return raw * self.energy.rmsd + self.energy.mean / atoms_per_system + refs

    # -- fairchem checkpoint entries -------------------------------------------------------
    def checkpoint_entries(self) -> dict[str, dict[str, Any]]:
        """{"normalizers": ..., "elementrefs": ...} in fairchem 1.10's checkpoint layout (CPU tensors)."""

        def cpu(module: nn.Module) -> dict[str, torch.Tensor]:
            return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}

        return {"normalizers": {"energy": cpu(self.energy), "forces": cpu(self.forces)},
                "elementrefs": {"energy": cpu(self.references)}}

    def load_checkpoint_entries(self, checkpoint: dict[str, Any], source: str) -> None:
        """Take the energy/forces normalizers and energy references of a fairchem checkpoint (any not
        stored stay identity); `source` names the file in errors."""
        from fairchem.core.modules.normalization.element_references import create_element_references
        from fairchem.core.modules.normalization.normalizer import create_normalizer

        try:
            for key, state in (checkpoint.get("normalizers") or {}).items():
                target = _LEGACY_KEYS.get(key, key)
                if target in ("energy", "forces"):
                    setattr(self, target, create_normalizer(state_dict=state))
            references = (checkpoint.get("elementrefs") or {}).get("energy")
            if references is not None:
                self.references = create_element_references(state_dict=references)
        except (RuntimeError, KeyError, TypeError, ValueError) as err:
            msg = f"checkpoint {source}: its normalizers/elementrefs are not fairchem's ({err})"
            raise KdaugError(msg) from err
