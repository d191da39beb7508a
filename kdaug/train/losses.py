"""L0, the supervised energy+force loss of OC20 S2EF training, with a weight per system.

L0 = alpha_E * L_E + alpha_F * L_F with
- L_E: absolute energy error per system (eV), as fairchem's "mae" energy loss;
- L_F: fairchem's per-atom L2 force loss ("l2mae"): the Euclidean norm of the force error of each
  free atom (eV/A), averaged over the free atoms of the batch.

Each system's terms are scaled by its weight (the r_s/dft weights of `kdaug.train.mixing`), and an
atom carries its system's weight; with all weights 1 the loss is fairchem's.

The loss compares eV outputs with eV targets, although the student's output transform (normalizers with
scales s_E, s_F and element references; `kdaug.models.output_transform`) makes it what fairchem trains
in normalized space: the references cancel in E - E_target, so the eV errors are s_E and s_F times the
normalized ones, and L0 in eV is s times fairchem's normalized L0 when s_E == s_F == s (always so for a
conservative student). AdamW's update does not change under a constant factor on the loss (up to its
eps), only the gradient-clipping threshold acts on s times larger gradients. Computing in eV keeps L0
comparable across runs and the KD losses, which compare with teacher outputs in eV, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossWeights:
    """alpha_E (energy) and alpha_F (forces): the OC20 configs' 1 and 100."""

    energy: float = 1.0
    forces: float = 100.0


def energy_force_loss(
    energy: torch.Tensor,
    forces: torch.Tensor,
    energy_target: torch.Tensor,
    forces_target: torch.Tensor,
    system_idx: torch.Tensor,
    free: torch.Tensor,
    system_weights: torch.Tensor | None = None,
    weights: LossWeights = LossWeights(),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted L0 and its parts.

    Args:
        energy, energy_target: (S,) eV.
        forces, forces_target: (N, 3) eV/A.
        system_idx: (N,) system of each atom.
        free: (N,) bool, atoms that are not fixed (only these enter L_F).
        system_weights: (S,) per-system weights (None: all 1).

    Returns:
        (alpha_E L_E + alpha_F L_F, {"energy": L_E, "forces": L_F}), both weighted means.
    """
    if system_weights is None:
        system_weights = torch.ones_like(energy)
    energy_error = (energy - energy_target).abs()
    energy_loss = (system_weights * energy_error).mean()
    atom_weights = system_weights[system_idx][free]
    force_error = (forces - forces_target)[free].norm(dim=1)
    force_loss = (atom_weights * force_error).sum() / free.sum().clamp_min(1)
    total = weights.energy * energy_loss + weights.forces * force_loss
    return total, {"energy": energy_loss, "forces": force_loss}
