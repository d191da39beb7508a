"""Model zoo contract, parametrised over every adapter with tiny configs on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from kdaug.data.batch import batch_from_frames
from kdaug.errors import KdaugError, PropertyNotAvailable, UnsupportedElement
from kdaug.models import EdgeFeatures, load_model, load_teacher
from kdaug.models.fairchem_v1 import FairchemModel
from tests.conftest import emt_frames

GNN_CONFIGS = ["painn-tiny", "schnet-tiny", "gemnet-oc-tiny"]
DIFFERENTIABLE = [*GNN_CONFIGS, "chgnet"]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: load_model(name) for name in DIFFERENTIABLE}


@pytest.fixture(scope="module")
def two_frames():
    return emt_frames(2)


def rotated(frames, seed=0):
    rotation = Rotation.random(random_state=seed).as_matrix()
    shift = np.random.default_rng(seed).normal(size=3)
    moved = [f.replace(positions=f.positions @ rotation.T + shift, cell=f.cell @ rotation.T) for f in frames]
    return moved, torch.tensor(rotation, dtype=torch.float32)


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_invariance_and_equivariance(models, two_frames, name):
    model = models[name]
    taps = sorted(model.implemented_taps - {"edge"})
    base = model(batch_from_frames(two_frames), taps=taps)
    moved_frames, rotation = rotated(two_frames)
    moved = model(batch_from_frames(moved_frames), taps=taps)
    torch.testing.assert_close(moved.energy, base.energy, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(moved.forces, base.forces @ rotation.T, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(moved.taps["node"], base.taps["node"], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(moved.taps["atom_energy"], base.taps["atom_energy"], atol=1e-3, rtol=1e-3)
    if "vector" in taps:
        torch.testing.assert_close(moved.taps["vector"], torch.einsum("ij,njh->nih", rotation, base.taps["vector"]),
                                   atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_atom_energy_sums_to_energy_and_taps_change_nothing(models, two_frames, name):
    model = models[name]
    batch = batch_from_frames(two_frames)
    plain = model(batch)
    tapped = model(batch_from_frames(two_frames), taps=sorted(model.implemented_taps))
    assert plain.taps == {}
    torch.testing.assert_close(tapped.energy, plain.energy)
    torch.testing.assert_close(tapped.forces, plain.forces)
    per_system = torch.zeros(2).index_add_(0, batch.batch, tapped.taps["atom_energy"].detach())
    torch.testing.assert_close(per_system, plain.energy.detach(), atol=1e-4, rtol=1e-5)
    assert tapped.taps["node"].shape[0] == batch.pos.shape[0]


def test_gemnet_edge_tap_belongs_to_its_graph(models, two_frames):
    out = models["gemnet-oc-tiny"](batch_from_frames(two_frames), taps=["edge"])
    edge = out.taps["edge"]
    assert isinstance(edge, EdgeFeatures)
    n_edges = edge.features.shape[0]
    assert edge.edge_index.shape == (2, n_edges) and edge.vectors.shape == (n_edges, 3)
    torch.testing.assert_close(edge.vectors.norm(dim=1), torch.ones(n_edges))


def test_missing_tap_and_element_are_clear_errors(models, two_frames):
    with pytest.raises(PropertyNotAvailable, match="schnet-tiny has no 'vector' tap"):
        models["schnet-tiny"](batch_from_frames(two_frames), taps=["vector"])
    emt = load_model("emt")
    gold_on_iron = two_frames[0].replace(atomic_numbers=np.full(13, 26))
    with pytest.raises(UnsupportedElement, match="emt does not support element.* Fe"):
        emt(batch_from_frames([gold_on_iron]))


@pytest.mark.parametrize("name", GNN_CONFIGS)
def test_save_load_round_trip(models, two_frames, tmp_path, name):
    model = models[name]
    path = tmp_path / "model.pt"
    model.save(path)
    loaded = load_model(None, checkpoint=path)
    assert loaded.name == name and loaded.checkpoint_sha256 is not None
    batch = batch_from_frames(two_frames)
    torch.testing.assert_close(loaded(batch).energy, model(batch_from_frames(two_frames)).energy)


def test_checkpoint_written_the_fairchem_way_loads_with_ema(two_frames, tmp_path):
    from fairchem.core.modules.exponential_moving_average import ExponentialMovingAverage

    torch.manual_seed(1)
    trained = load_model("painn-tiny")
    ema = ExponentialMovingAverage(trained.module.parameters(), decay=0.5)
    with torch.no_grad():
        for param in trained.module.parameters():
            param.add_(0.1)
    ema.update()  # shadow = average of old and new weights: differs from both
    checkpoint = {
        "epoch": 1,
        "state_dict": {f"module.module.{k}": v for k, v in trained.module.state_dict().items()},
        "config": {"model": "painn", "model_attributes": trained.model_kwargs},
        "ema": ema.state_dict(),
    }
    path = tmp_path / "fairchem.pt"
    torch.save(checkpoint, path)
    loaded = load_model("painn-tiny", checkpoint=path)
    ema.copy_to(trained.module.parameters())
    batch = batch_from_frames(two_frames)
    torch.testing.assert_close(loaded(batch).energy, trained(batch_from_frames(two_frames)).energy)


def test_checkpoint_that_does_not_fit_names_file_and_keys(models, tmp_path):
    path = tmp_path / "schnet.pt"
    models["schnet-tiny"].save(path)
    with pytest.raises(KdaugError, match=r"schnet.pt does not fit model config painn-tiny \(missing: .*unexpected"):
        load_model("painn-tiny", checkpoint=path)


def test_teacher_without_checkpoint_says_where_checkpoints_come_from(tmp_path):
    with pytest.raises(KdaugError, match="teacher gemnet-oc-tiny needs pretrained weights.*OC20 checkpoints"):
        load_teacher("gemnet-oc-tiny")
    with pytest.raises(KdaugError, match="no such file.*OC20 checkpoints"):
        load_teacher("gemnet-oc", checkpoint=tmp_path / "gnoc.pt")


def test_emt_teacher_matches_ase(two_frames):
    from ase.calculators.emt import EMT

    from kdaug.data.convert import frame_to_atoms

    out = load_teacher("emt")(batch_from_frames(two_frames, dtype=torch.float64))
    for index, frame in enumerate(two_frames):
        atoms = frame_to_atoms(frame)
        atoms.calc = EMT()
        assert out.energy[index].item() == pytest.approx(atoms.get_potential_energy(), abs=1e-8)
        np.testing.assert_allclose(out.forces[13 * index : 13 * (index + 1)].numpy(),
                                   atoms.get_forces(apply_constraint=False), atol=1e-8)


def test_emt_teacher_keeps_one_calculator_per_trajectory(two_frames):
    """Two trajectories in one batch keep their own calculators, so a small step reuses EMT's neighbour
    lists; results equal a fresh calculator's; unnamed systems and ended trajectories keep nothing."""
    from kdaug.models.protocol import new_trajectories

    teacher = load_teacher("emt")
    batch = batch_from_frames(two_frames, dtype=torch.float64)
    fresh = teacher(batch)
    assert not teacher._calcs  # unnamed systems: a fresh calculator each, none kept
    batch.trajectory = new_trajectories(2)
    first = teacher(batch)
    batch.pos = batch.pos.clone()
    batch.pos[-1] += 0.02  # one atom, a step well inside EMT's neighbour-list skin
    moved = teacher(batch)
    assert [calc.nl.nupdates for calc in teacher._calcs.values()] == [1, 1]
    torch.testing.assert_close(first.energy, fresh.energy, rtol=0, atol=0)
    assert not torch.allclose(first.forces, moved.forces)
    del batch.trajectory
    unnamed = teacher(batch)
    torch.testing.assert_close(moved.energy, unnamed.energy, rtol=0, atol=1e-10)
    torch.testing.assert_close(moved.forces, unnamed.forces, rtol=0, atol=1e-10)
    teacher.end_trajectories(new_trajectories(0).tolist() + list(teacher._calcs))
    assert not teacher._calcs


def test_model_calculator_is_one_trajectory_ended_with_it(two_frames):
    import gc

    from kdaug.data.convert import frame_to_atoms
    from kdaug.models.ase_calc import ModelCalculator

    teacher = load_teacher("emt")
    atoms = frame_to_atoms(two_frames[0])
    atoms.calc = ModelCalculator(teacher)
    atoms.get_potential_energy()
    atoms.positions[-1] += 0.02
    atoms.get_potential_energy()
    (calc,) = teacher._calcs.values()
    assert calc.nl.nupdates == 1
    atoms.calc = None
    gc.collect()
    assert not teacher._calcs


def test_chgnet_adapter_matches_its_ase_calculator(models, two_frames, oc20_atoms):
    from chgnet.model import StructOptimizer  # noqa: F401  (ensures chgnet.model.dynamics is importable)
    from chgnet.model.dynamics import CHGNetCalculator

    from kdaug.data.convert import atoms_to_frame, frame_to_atoms

    frames = [*two_frames, atoms_to_frame(oc20_atoms, sid=0, fid=0)]
    out = models["chgnet"](batch_from_frames(frames))
    calc = CHGNetCalculator(model=models["chgnet"].model, use_device="cpu")
    start = 0
    for index, frame in enumerate(frames):
        atoms = frame_to_atoms(frame)
        atoms.calc = calc
        assert out.energy[index].item() == pytest.approx(atoms.get_potential_energy(), abs=2e-3)
        forces = out.forces[start : start + frame.n_atoms].detach().numpy()
        np.testing.assert_allclose(forces, atoms.get_forces(apply_constraint=False), atol=2e-3)
        start += frame.n_atoms


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_forces_differentiable_wrt_positions(models, two_frames, name):
    batch = batch_from_frames(two_frames)
    pos = batch.pos.clone().requires_grad_(True)
    batch.pos = pos
    out = models[name](batch)
    (grad,) = torch.autograd.grad((out.forces**2).sum() + out.energy.sum(), pos)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_full_size_configs_build_with_paper_sizes():
    sizes = {name: sum(p.numel() for p in load_model(name).parameters())
             for name in ("painn-small", "schnet")}
    assert sizes["painn-small"] == pytest.approx(3.7e6, rel=0.05)
    assert sizes["schnet"] == pytest.approx(9.1e6, rel=0.05)
    assert isinstance(load_model("schnet"), FairchemModel)


def test_model_calculator_passes_tags_and_matches_the_adapter(two_frames):
    from kdaug.data.convert import frame_to_atoms
    from kdaug.models.ase_calc import ModelCalculator

    torch.manual_seed(0)
    model = load_model("gemnet-oc-tiny")  # its quadruplet graph needs the OC20 tags
    atoms = frame_to_atoms(two_frames[0])
    atoms.calc = ModelCalculator(model)
    expected = model(batch_from_frames(two_frames[:1]))
    assert atoms.get_potential_energy() == pytest.approx(float(expected.energy[0]), rel=1e-5)
    np.testing.assert_allclose(atoms.get_forces(apply_constraint=False), expected.forces.detach().numpy(), atol=1e-5)


def test_legacy_gemnet_checkpoint_with_separate_scale_factors(two_frames, tmp_path):
    from fairchem.core.modules.scaling import ScaleFactor

    torch.manual_seed(3)
    fitted = load_model("gemnet-oc-tiny")
    scale_dict = {}
    for index, (name, module) in enumerate(fitted.module.named_modules()):
        if isinstance(module, ScaleFactor):
            module.set_(0.5 + 0.1 * index)
            scale_dict[module.name or name] = 0.5 + 0.1 * index
    state = {f"module.{k}": v for k, v in fitted.module.state_dict().items() if not k.endswith(".scale_factor")}
    path = tmp_path / "legacy.pt"
    torch.save({"state_dict": state, "config": {"model": "gemnet_oc", "model_attributes": fitted.model_kwargs},
                "scale_dict": scale_dict}, path)
    loaded = load_model("gemnet-oc-tiny", checkpoint=path)
    batch = batch_from_frames(two_frames)
    torch.testing.assert_close(loaded(batch).energy, fitted(batch_from_frames(two_frames)).energy)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_one_line_error():
    with pytest.raises(KdaugError, match="--device cuda: no CUDA device is available"):
        load_model("emt", device="cuda")
