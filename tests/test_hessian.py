"""Hessian distillation (kdaug.train.hessian) on EMT slabs, EMT and tiny random-weight students."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.emt import EMT

from kdaug.data.lmdb import LmdbWriter
from kdaug.data.training_set import TrainingSet, collate
from kdaug.errors import KdaugError
from kdaug.models import load_model, load_teacher
from kdaug.models.ase_calc import emt
from kdaug.train.hessian import HessianKD, hvp_autograd, hvp_finite_difference, probe_vectors, student_hvp
from kdaug.train.kd import TeacherTargets
from kdaug.train.losses import LossWeights
from tests.conftest import emt_frames

# Relative change of the Hessian loss when its targets are stored as float32 / float16 (teacher cache --dtype).
ROUND_TRIP_RTOL = 1e-5
FLOAT16_RTOL = 1e-3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four EMT slabs (13 atoms, 5 free) in two LMDBs, as `kdaug train` reads them."""
    root = tmp_path_factory.mktemp("hessian")
    frames = emt_frames(4)
    paths = [root / "dft", root / "synthetic"]
    for path, part in zip(paths, (frames[:2], frames[2:])):
        with LmdbWriter(path) as writer:
            writer.write_batch(part)
    dataset = TrainingSet(paths[:1], paths[1:])
    yield dataset
    dataset.close()


def batch_of(data, indices):
    return collate([data[i] for i in indices])


def round_trip(targets: TeacherTargets, dtype=np.float32) -> TeacherTargets:
    """The targets stored as numpy `dtype` and read back (as a teacher cache does)."""
    def trip(value):
        return torch.from_numpy(value.detach().cpu().numpy().astype(dtype))

    return TeacherTargets(trip(targets.energy), trip(targets.forces), None,
                          {name: trip(value) for name, value in targets.extras.items()})


def hessian_loss(strategy, student, batch, targets, weights=None, loss="mse"):
    batch = batch.clone()
    batch.pos.requires_grad_(True)
    output = student(batch)
    return strategy.loss(student, batch, output, None, targets, weights, loss=loss, l0_weights=LossWeights())


def test_vectors_are_unit_on_free_atoms_and_the_same_in_any_batching(data):
    first = batch_of(data, [0, 1, 2, 3])
    vectors = probe_vectors(first, 3, 7, 32)
    assert vectors.shape == (first.pos.shape[0], 3, 3)
    assert vectors.dtype == first.pos.dtype
    assert not vectors[first.fixed].any()
    assert bool((vectors[~first.fixed] != 0).all())
    norms = torch.stack([vectors[first.batch == s].square().sum(dim=(0, 2)).sqrt() for s in range(4)])
    torch.testing.assert_close(norms, torch.ones(4, 3))
    other = batch_of(data, [2, 0])
    again = probe_vectors(other, 3, 7, 32)
    for s, index in enumerate([2, 0]):
        torch.testing.assert_close(again[other.batch == s], vectors[first.batch == index], rtol=0, atol=0)
    assert not torch.equal(probe_vectors(first, 3, 8, 32), vectors)  # the seed matters
    sample0, sample1 = vectors[first.batch == 0], vectors[first.batch == 1]
    assert not torch.equal(sample0, sample1)  # so does the sample (both are 13-atom slabs)


def test_budget_holds_atoms_per_sample(data):
    batch = batch_of(data, [0, 1, 2, 3])
    vectors = probe_vectors(batch, 2, 0, 3)
    for s in range(4):
        mine = vectors[batch.batch == s]
        probed = mine.abs().sum(dim=(1, 2)) > 0
        assert int(probed.sum()) == 3  # of 5 free atoms
        assert not probed[batch.fixed[batch.batch == s]].any()
        torch.testing.assert_close(mine.square().sum(dim=(0, 2)), torch.ones(2))
    chosen = [set(torch.nonzero(vectors[batch.batch == s].abs().sum(dim=(1, 2))).view(-1).tolist()) for s in range(4)]
    assert len({frozenset(c) for c in chosen}) > 1  # the budget's atoms are drawn per sample


def test_double_backward_equals_central_differences_on_a_gradient_force_model(data):
    torch.manual_seed(0)
    model = load_model("schnet-tiny")  # forces = -dE/dx; fairchem's radius graph is float32 only
    assert model.conservative and model.differentiable
    batch = batch_of(data, [0, 3])
    vectors = probe_vectors(batch, 2, 0, 32)
    exact = hvp_autograd(model, batch, vectors)
    assert not batch.pos.requires_grad
    differences = hvp_finite_difference(model, batch, vectors, eps=1e-2)  # float32 forces: a larger step
    assert exact.abs().max() > 0.1
    torch.testing.assert_close(differences, exact, rtol=0, atol=2e-3 * float(exact.abs().max()))
    student_batch = batch.clone()
    student_batch.pos.requires_grad_(True)
    trained = student_hvp(student_batch, model(student_batch).forces, vectors)
    assert trained.requires_grad  # the student's H v keeps its graph, so a loss on it trains the model
    torch.testing.assert_close(trained.detach(), exact)


def test_direct_force_student_hvp_is_the_transposed_force_jacobian(data):
    torch.manual_seed(0)
    student = load_model("painn-tiny")  # direct forces: -dF/dx is not symmetric, H v here is J^T v
    assert not student.conservative
    batch = batch_of(data, [1, 2])
    v = probe_vectors(batch, 2, 0, 32)
    u = probe_vectors(batch, 2, 1, 32)
    student_batch = batch.clone()
    student_batch.pos.requires_grad_(True)
    jt_v = student_hvp(student_batch, student(student_batch).forces, v).detach()
    j_u = hvp_finite_difference(student, batch, u, eps=1e-2)
    # u . (J^T v) == v . (J u), per sample and vector
    for s in range(2):
        mine = batch.batch == s
        left = (u[mine] * jt_v[mine]).sum(dim=(0, 2))
        right = (v[mine] * j_u[mine]).sum(dim=(0, 2))
        torch.testing.assert_close(left, right, rtol=2e-2, atol=1e-3)


def test_chgnet_teacher_takes_double_backward_and_agrees_with_central_differences(data):
    teacher = load_teacher("chgnet")
    assert teacher.differentiable  # its forces carry a graph, so HessianKD takes the double backward
    batch = batch_of(data, [0, 2])
    targets = HessianKD(k=2).teacher_targets(teacher, batch)
    vectors, hv = targets.extras["hessian_vectors"], targets.extras["hessian_hv"]
    differences = hvp_finite_difference(teacher, batch, vectors, eps=1e-3)  # float32: rounding limits the match
    assert hv.abs().max() > 1
    torch.testing.assert_close(hv, differences, rtol=0, atol=2e-2 * float(hv.abs().max()))


def ase_numeric_hessian_times(atoms: Atoms, vector: np.ndarray, delta: float = 1e-4) -> np.ndarray:
    """(n, 3) H v from ASE alone: H's columns by central differences of EMT forces, one free coordinate at a time."""
    atoms = atoms.copy()
    atoms.calc = EMT()
    base = atoms.get_positions()
    hv = np.zeros_like(base)
    for atom, axis in zip(*np.nonzero(vector)):
        column = []
        for sign in (1, -1):
            moved = base.copy()
            moved[atom, axis] += sign * delta
            atoms.set_positions(moved)
            column.append(atoms.get_forces())
        hv += -(column[0] - column[1]) / (2 * delta) * vector[atom, axis]
    return hv


def test_emt_hvp_by_central_differences_matches_ases_numeric_hessian(data):
    batch = batch_of(data, [0, 2])  # float32 positions, as in training
    teacher = emt()
    targets = HessianKD(k=2, max_atoms=4).teacher_targets(teacher, batch)
    vectors, hv = targets.extras["hessian_vectors"], targets.extras["hessian_hv"]
    assert hv.shape == vectors.shape == (batch.pos.shape[0], 2, 3)
    for s in range(2):
        mine = (batch.batch == s).numpy()
        atoms = Atoms(numbers=batch.atomic_numbers[mine].numpy(), positions=batch.pos[mine].double().numpy(),
                      cell=batch.cell[s].double().numpy(), pbc=True)
        for j in range(2):
            reference = ase_numeric_hessian_times(atoms, vectors[mine, j].double().numpy())
            assert np.abs(reference).max() > 0.5
            np.testing.assert_allclose(hv[mine, j].numpy(), reference, atol=1e-4)
        atoms.calc = EMT()
        np.testing.assert_allclose(float(targets.energy[s]), atoms.get_potential_energy(), rtol=1e-6)
        np.testing.assert_allclose(targets.forces[mine].numpy(), atoms.get_forces(), atol=1e-5)


# gradient and direct forces; PaiNN's force Jacobian reacts more strongly to a step
@pytest.mark.parametrize(("student_name", "lr"), [("schnet-tiny", 1e-3), ("painn-tiny", 3e-4)])
def test_hessian_loss_falls_in_a_few_steps(data, student_name, lr):
    strategy = HessianKD(k=2, max_atoms=32)
    assert (strategy.name, strategy.teacher_taps, strategy.student_taps) == ("hessian", (), ())
    assert strategy.needs_pos_grad and strategy.uses_teacher and not strategy.needs_head
    assert strategy.cache_fields() == ("hessian_vectors", "hessian_hv")
    batch = batch_of(data, [0, 1, 3])
    targets = strategy.teacher_targets(emt(), batch)
    torch.manual_seed(1)
    student = load_model(student_name)
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr)
    weights = torch.tensor([1.0, 0.5, 1.0])
    losses = []
    for _ in range(6):
        loss = hessian_loss(strategy, student, batch, targets, weights)
        optimizer.zero_grad()
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses


def test_system_weights_weigh_each_free_atom(data):
    strategy = HessianKD()
    torch.manual_seed(0)
    student = load_model("schnet-tiny")
    teacher = emt()
    pair, alone = batch_of(data, [0, 1]), batch_of(data, [0])
    both = hessian_loss(strategy, student, pair, strategy.teacher_targets(teacher, pair), torch.tensor([1.0, 0.0]))
    first = hessian_loss(strategy, student, alone, strategy.teacher_targets(teacher, alone))
    n_free = int((~pair.fixed).sum())
    torch.testing.assert_close(both * n_free, first * int((~alone.fixed).sum()))
    mae = hessian_loss(strategy, student, alone, strategy.teacher_targets(teacher, alone), loss="mae")
    assert float(mae) > 0 and not torch.isclose(mae, first)


@pytest.mark.parametrize(("dtype", "rtol"), [(np.float32, ROUND_TRIP_RTOL), (np.float16, FLOAT16_RTOL)])
def test_live_and_stored_targets_give_the_same_loss(data, dtype, rtol):
    """Live targets (float32 training batch) against targets made as a cache makes them (a batch in the
    teacher's float64) and stored as `dtype`."""
    strategy = HessianKD(k=2, max_atoms=3, seed=5)
    batch = batch_of(data, [3, 1, 2])
    teacher = emt()
    torch.manual_seed(0)
    student = load_model("painn-tiny")
    live = strategy.teacher_targets(teacher, batch)
    in_teacher_dtype = batch.clone()
    in_teacher_dtype.pos, in_teacher_dtype.cell = batch.pos.double(), batch.cell.double()
    stored = round_trip(strategy.teacher_targets(teacher, in_teacher_dtype), dtype).to(batch.pos.device,
                                                                                      batch.pos.dtype)
    torch.testing.assert_close(stored.extras["hessian_vectors"].float(), probe_vectors(batch, 2, 5, 3),
                               rtol=rtol, atol=0)
    weights = torch.tensor([1.0, 0.5, 0.25])
    live_loss = hessian_loss(strategy, student, batch, live, weights)
    stored_loss = hessian_loss(strategy, student, batch, stored, weights)
    assert float(live_loss) > 0.1
    torch.testing.assert_close(stored_loss, live_loss, rtol=rtol, atol=0)


def test_bad_input_is_one_line(data):
    batch = batch_of(data, [0])
    for attribute in ("dataset_idx", "local_idx"):
        stripped = batch.clone()
        del stripped[attribute]
        with pytest.raises(KdaugError, match=r"^--kd hessian: batch has no dataset_idx/local_idx"):
            probe_vectors(stripped, 2, 0, 32)
    with pytest.raises(KdaugError, match=r"^--kd hessian: k 0: expected an integer >= 1$"):
        HessianKD(k=0)
    with pytest.raises(KdaugError, match=r"^--kd hessian: max_atoms 2.5"):
        HessianKD(max_atoms=2.5)
    with pytest.raises(KdaugError, match=r"^--kd hessian: seed -1: expected an integer >= 0$"):
        HessianKD(seed=-1)
    with pytest.raises(KdaugError, match=r"^--kd hessian: eps 0"):
        HessianKD(eps=0)
    strategy = HessianKD()
    torch.manual_seed(0)
    student = load_model("schnet-tiny")
    targets = strategy.teacher_targets(emt(), batch)
    output = student(batch)
    with pytest.raises(KdaugError, match=r"^--kd hessian: batch.pos does not require grad"):
        strategy.loss(student, batch, output, None, targets, None, loss="mse", l0_weights=LossWeights())
    plain = TeacherTargets(targets.energy, targets.forces)
    with pytest.raises(KdaugError, match=r"^--kd hessian: the teacher targets have no hessian_vectors"):
        hessian_loss(strategy, student, batch, plain)
    with pytest.raises(KdaugError, match=r"^--kd-loss huber: expected one of mse, mae$"):
        hessian_loss(strategy, student, batch, targets, loss="huber")
