"""L0: fairchem's energy MAE and per-atom L2 force loss on free atoms, with per-system weights."""

from __future__ import annotations

import torch

from kdaug.train.losses import LossWeights, energy_force_loss


def test_l0_matches_hand_computed_values_and_ignores_fixed_atoms():
    energy = torch.tensor([1.0, -2.0])
    energy_target = torch.tensor([1.5, -1.0])
    forces = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    forces_target = torch.zeros(3, 3)
    system_idx = torch.tensor([0, 0, 1])
    free = torch.tensor([True, False, True])
    forces[1] = 100.0  # a fixed atom: its error must not count
    total, parts = energy_force_loss(energy, forces, energy_target, forces_target, system_idx, free,
                                     weights=LossWeights(energy=2.0, forces=10.0))
    assert torch.isclose(parts["energy"], torch.tensor(0.75))  # (0.5 + 1) / 2
    assert torch.isclose(parts["forces"], torch.tensor(3.0))  # (5 + 1) / 2 free atoms
    assert torch.isclose(total, torch.tensor(2 * 0.75 + 10 * 3.0))


def test_system_weights_scale_each_systems_terms():
    energy = torch.tensor([1.0, 1.0])
    forces = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    system_idx = torch.tensor([0, 1])
    free = torch.ones(2, dtype=torch.bool)
    _, parts = energy_force_loss(energy, forces, torch.zeros(2), torch.zeros(2, 3), system_idx, free,
                                 system_weights=torch.tensor([0.5, 1.5]))
    assert torch.isclose(parts["energy"], torch.tensor((0.5 + 1.5) / 2))
    assert torch.isclose(parts["forces"], torch.tensor((0.5 * 1 + 1.5 * 2) / 2))
