"""The model contract: every adapter passes `validate_model`; each kind of broken model is caught."""

from __future__ import annotations

import pytest
import torch

from kdaug.errors import KdaugError
from kdaug.models import AtomisticModel, ModelOutput, load_model
from kdaug.models.contract import ContractError, probe_batch, validate_model
from kdaug.models.registry import available_configs

ADAPTERS = ["emt", "chgnet", "ase:ase.calculators.lj:LennardJones",
            *(name for name in available_configs() if name.endswith("-tiny"))]


@pytest.mark.parametrize("name", ADAPTERS)
def test_every_adapter_keeps_the_contract(name):
    torch.manual_seed(0)
    validate_model(load_model(name))


class Springs(AtomisticModel):
    """Toy float64 model: E_s = k sum_i |x_i - centroid_s|^2, forces by autograd; `flaw` breaks one promise."""

    name = "springs"
    implemented_taps = frozenset({"node", "atom_energy"})

    def __init__(self, flaw: str | None = None) -> None:
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
        self.flaw = flaw

    def compute(self, batch, taps):
        with torch.enable_grad():
            pos = batch.pos if batch.pos.requires_grad else batch.pos.detach().requires_grad_(True)
            n_systems = len(batch.natoms)
            centroid = torch.zeros(n_systems, 3, dtype=pos.dtype).index_add_(0, batch.batch, pos)
            centroid = centroid / batch.natoms[:, None]
            relative = pos if self.flaw == "translation" else pos - centroid[batch.batch]
            atom_energy = self.k * (relative**2).sum(1)
            energy = torch.zeros(n_systems, dtype=pos.dtype).index_add(0, batch.batch, atom_energy)
            (gradient,) = torch.autograd.grad(energy.sum(), pos, create_graph=True)
        forces = gradient if self.flaw == "forces" else -gradient
        if self.flaw == "dtype":
            forces = forces.float()
        if self.flaw == "shape":
            energy = energy[:, None]
        if self.flaw == "taps-change-energy" and taps:
            energy = energy + 1.0
        result = {"node": relative[:, 0] if self.flaw == "node" else relative,
                  "atom_energy": 2 * atom_energy if self.flaw == "atom_energy" else atom_energy}
        return ModelOutput(energy=energy, forces=forces, taps={t: result[t] for t in taps})


class FlippedEmt(AtomisticModel):
    """EMT with the force sign flipped (a label-only model that breaks forces == -dE/dpos)."""

    name = "flipped-emt"
    differentiable = False

    def __init__(self) -> None:
        super().__init__()
        self.emt = load_model("emt")
        self.supported_elements = self.emt.supported_elements

    def compute(self, batch, taps):
        out = self.emt(batch)
        return ModelOutput(energy=out.energy, forces=-out.forces)


def test_a_sound_toy_passes():
    validate_model(Springs())


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: Springs("shape"), "outputs check: energy has shape \\(2, 1\\), expected \\(2,\\)"),
        (lambda: Springs("dtype"), "outputs check: forces is torch.float32, the model declares dtype torch.float64"),
        (lambda: Springs("node"), "taps check: node tap has shape \\(23,\\), expected \\(N, D\\)"),
        (lambda: Springs("atom_energy"), "taps check: atom_energy sums differ from the energy"),
        (lambda: Springs("taps-change-energy"), "taps check: asking for taps changes the energy"),
        (lambda: Springs("forces"), "forces check: forces differ from -dE/dpos"),
        (lambda: Springs("translation"), "translation check: moving every atom by .* changes the energy"),
        (FlippedEmt, "forces check: force on atom 0 axis 0 is .* finite-difference -dE/dx is"),
    ],
    ids=["shape", "dtype", "node", "atom_energy", "taps-change-energy", "forces", "translation", "fd-forces"],
)
def test_broken_models_fail_naming_model_and_check(make, expected):
    model = make()
    with pytest.raises(ContractError, match=f"model {model.name} fails the {expected}") as err:
        validate_model(model)
    assert "\n" not in str(err.value)


def test_probe_needs_supported_elements_and_checkpoints_only_for_gnns(tmp_path):
    model = Springs()
    model.supported_elements = frozenset({26})
    with pytest.raises(KdaugError, match="springs: no probe system uses only its elements"):
        probe_batch(model)
    checkpoint = tmp_path / "painn.pt"
    load_model("painn-tiny").save(checkpoint)
    with pytest.raises(KdaugError, match="--checkpoint .*painn.pt: model emt takes no checkpoint"):
        load_model("emt", checkpoint)
    assert load_model(None, checkpoint).weights_from_checkpoint
