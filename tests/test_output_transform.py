"""Normalizers and element references of fairchem checkpoints: undone inside the adapter (eV out), as fairchem's
OCPCalculator does, in the legacy OC20 layout and in fairchem 1.10's; the contract still holds."""

from __future__ import annotations

import pytest
import torch

from kdaug.data.batch import batch_from_frames
from kdaug.data.convert import frame_to_atoms
from kdaug.models import load_model, load_teacher
from kdaug.models.contract import validate_model
from kdaug.models.fairchem_v1 import FairchemModel
from kdaug.train.checkpoint import fairchem_config
from tests.conftest import emt_frames

# PaiNN OC20's legacy normalizers (target_mean, target_std, grad_target_std)
LEGACY = {"target": {"mean": torch.tensor(-0.7554), "std": torch.tensor(2.887)},
          "grad_target": {"mean": torch.tensor(0.0), "std": torch.tensor(2.887)}}
NEW = {"energy": {"mean": torch.tensor(1.25), "rmsd": torch.tensor(0.8)},
       "forces": {"mean": torch.tensor(0.0), "rmsd": torch.tensor(1.7)}}
REFERENCES = torch.zeros(119)
REFERENCES[[1, 6, 8, 29, 78, 79]] = torch.tensor([-3.4, -7.1, -4.9, -3.7, -6.0, -3.2])


@pytest.fixture(scope="module")
def frames():
    return emt_frames(3)


def raw_and_output(model: FairchemModel, frames, taps=()):
    """The fairchem module's own (energy, forces) and the adapter's output for the same forward."""
    recorded = {}
    handle = model.module.register_forward_hook(lambda _m, _a, out: recorded.update(out))
    try:
        output = model(batch_from_frames(frames), taps=taps)
    finally:
        handle.remove()
    return recorded["energy"].view(-1).detach(), recorded["forces"].detach(), output


def write_checkpoint(model: FairchemModel, path, normalizers: dict, elementrefs: dict | None = None) -> str:
    checkpoint = {"state_dict": {f"module.{k}": v for k, v in model.module.state_dict().items()},
                  "config": fairchem_config(model, batch_size=1, seed=0), "normalizers": normalizers, "amp": None}
    if elementrefs is not None:
        checkpoint["elementrefs"] = elementrefs
    torch.save(checkpoint, path)
    return str(path)


def reference_sum(frames) -> torch.Tensor:
    return torch.stack([REFERENCES[torch.as_tensor(f.atomic_numbers).long()].sum() for f in frames])


def test_without_normalizers_the_outputs_are_the_module_outputs_bit_for_bit(frames):
    torch.manual_seed(0)
    model = load_model("painn-tiny")
    raw_energy, raw_forces, out = raw_and_output(model, frames)
    assert model.output_transform.is_identity
    assert torch.equal(out.energy, raw_energy) and torch.equal(out.forces, raw_forces)


@pytest.mark.parametrize(("config", "normalizers", "elementrefs"), [
    ("painn-tiny", LEGACY, None),
    ("painn-tiny", NEW, {"energy": {"element_references": REFERENCES}}),
    ("schnet-tiny", LEGACY, {"energy": {"element_references": REFERENCES}}),
], ids=["painn-legacy", "painn-new-refs", "schnet-legacy-refs"])
def test_checkpoint_normalizers_give_ev_like_ocpcalculator(frames, tmp_path, config, normalizers, elementrefs):
    from fairchem.core.common.relaxation.ase_utils import OCPCalculator

    torch.manual_seed(0)
    plain = load_model(config)
    path = write_checkpoint(plain, tmp_path / "ckpt.pt", normalizers, elementrefs)
    model = load_model(None, path)
    energy_norm, forces_norm = (normalizers.get("energy") or normalizers["target"],
                                normalizers.get("forces") or normalizers["grad_target"])
    e_std = energy_norm.get("rmsd", energy_norm.get("std"))
    f_std = forces_norm.get("rmsd", forces_norm.get("std"))
    raw_energy, raw_forces, out = raw_and_output(model, frames)
    references = reference_sum(frames) if elementrefs else torch.zeros(len(frames))
    torch.testing.assert_close(out.energy, e_std * raw_energy + energy_norm["mean"] + references)
    torch.testing.assert_close(out.forces, f_std * raw_forces)
    teacher_energy = load_teacher(config, path)(batch_from_frames(frames)).energy
    assert torch.equal(teacher_energy, out.energy)
    plain_energy, plain_forces, _ = raw_and_output(plain, frames)
    torch.testing.assert_close(raw_energy, plain_energy)  # the same weights underneath
    torch.testing.assert_close(raw_forces, plain_forces)

    atoms = frame_to_atoms(frames[0])
    atoms.calc = OCPCalculator(checkpoint_path=path, cpu=True)
    assert atoms.get_potential_energy() == pytest.approx(float(out.energy[0]), abs=1e-4)
    n_first = len(frames[0].atomic_numbers)
    forces = torch.tensor(atoms.get_forces(apply_constraint=False), dtype=torch.float32)
    torch.testing.assert_close(forces, out.forces[:n_first], atol=1e-4, rtol=1e-5)


def test_atom_energies_sum_to_the_transformed_energy_and_the_contract_holds(frames):
    torch.manual_seed(0)
    for config in ("painn-tiny", "schnet-tiny"):
        model = load_model(config)
        model.output_transform.set(energy=(-0.75, 2.5), forces=(0.0, 2.5), references=REFERENCES)
        assert not model.output_transform.is_identity
        _, _, out = raw_and_output(model, frames, taps=("atom_energy",))
        batch = batch_from_frames(frames)
        summed = torch.zeros(len(frames)).index_add_(0, batch.batch, out.taps["atom_energy"])
        torch.testing.assert_close(summed, out.energy, atol=1e-4, rtol=1e-6)
        assert model.conservative == (config == "schnet-tiny")
        validate_model(model)


def test_unequal_scales_make_a_gradient_model_non_conservative_and_the_contract_says_so():
    torch.manual_seed(0)
    model = load_model("schnet-tiny")
    validate_model(model)
    model.output_transform.set(energy=(0.0, 2.0), forces=(0.0, 1.0))
    assert not model.conservative  # fairchem applies such normalizers too: forces != -dE/dpos then
    validate_model(model)


def test_save_keeps_the_transform(frames, tmp_path):
    torch.manual_seed(0)
    model = load_model("painn-tiny")
    model.output_transform.set(energy=(0.3, 1.5), forces=(0.0, 0.7), references=REFERENCES)
    model.save(tmp_path / "m.pt")
    loaded = load_model(None, tmp_path / "m.pt")
    _, _, a = raw_and_output(model, frames)
    _, _, b = raw_and_output(loaded, frames)
    assert torch.equal(a.energy, b.energy) and torch.equal(a.forces, b.forces)
