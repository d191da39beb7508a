"""`kdaug rattle` and `kdaug adversarial` on small EMT-labelled frames with tiny GNNs."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT

from kdaug.cli.main import main
from kdaug.data.batch import batch_from_frames, make_batch
from kdaug.data.convert import frame_to_atoms
from kdaug.data.lmdb import FrameDataset, LmdbWriter
from kdaug.models import load_model, load_teacher
from kdaug.perturb.adversarial import AdversarialConfig, AttackParams, adversarial_perturb, discrepancy, run_adversarial
from kdaug.perturb.rattle import RattleConfig, run_rattle
from tests.conftest import emt_frames


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("source")
    with LmdbWriter(path) as writer:
        writer.write_batch(emt_frames(6))
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny PaiNN student and a differently initialised tiny PaiNN teacher: they disagree."""
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for seed, name in ((0, "student"), (1, "teacher"), (2, "schnet")):
        torch.manual_seed(seed)
        load_model("schnet-tiny" if name == "schnet" else "painn-tiny").save(folder / f"{name}.pt")
        paths[name] = str(folder / f"{name}.pt")
    return paths


def read(path):
    dataset = FrameDataset(path)
    frames = list(dataset.iter_frames())
    dataset.close()
    return frames


def test_rattle_moves_only_free_atoms_with_sigma_and_labels_with_teacher(source, tmp_path):
    counts = run_rattle(RattleConfig(input=str(source), out=str(tmp_path / "r"), teacher="emt", sigma=0.05,
                                     copies=20, seed=1), progress=False)
    parents = {(f.sid, f.fid): f for f in read(source)}
    frames = read(tmp_path / "r")
    assert counts["written"] == len(frames) == 120
    displacements = []
    for frame in frames:
        parent = parents[frame.provenance.parent]
        assert frame.provenance.origin == "rattled" and frame.provenance.teacher == "emt"
        assert frame.sid == parent.sid and frame.fid // 20 == parent.fid
        np.testing.assert_array_equal(frame.positions[frame.fixed], parent.positions[frame.fixed].astype(np.float32))
        displacements.append((frame.positions - parent.positions)[~frame.fixed])
        atoms = frame_to_atoms(frame)
        atoms.calc = EMT()
        assert frame.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-4)
    displacements = np.concatenate(displacements).ravel()
    assert displacements.std() == pytest.approx(0.05, rel=0.05)
    assert abs(displacements.mean()) < 0.005
    from fairchem.core.datasets import LmdbDataset

    assert len(LmdbDataset({"src": str(tmp_path / "r")})) == 120


def test_rattle_is_deterministic_resumable_and_rejects_overlaps(source, tmp_path):
    config = RattleConfig(input=str(source), out=str(tmp_path / "a"), teacher="emt", sigma=0.05, copies=2,
                          fraction=0.5, seed=7)
    run_rattle(config, progress=False)
    run_rattle(config.__class__(**{**config.__dict__, "out": str(tmp_path / "b")}), progress=False)
    first, second = read(tmp_path / "a"), read(tmp_path / "b")
    assert len(first) == 6
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.positions, b.positions)
    again = run_rattle(config, progress=False)  # everything already done
    assert again["inputs"] == 0 and len(read(tmp_path / "a")) == 6
    wild = run_rattle(RattleConfig(input=str(source), out=str(tmp_path / "wild"), teacher="emt", sigma=1.0,
                                   copies=5, min_distance_factor=0.8), progress=False)
    assert wild["rejected_min_distance"] > 0
    assert wild["written"] + wild["rejected_min_distance"] == 30


def attack_batch(teacher_dtype=torch.float32):
    return batch_from_frames(emt_frames(3), dtype=teacher_dtype)


def test_adversarial_discrepancy_rises_and_beats_random_noise(checkpoints):
    student = load_model(None, checkpoint=checkpoints["student"])
    teacher = load_teacher("painn-tiny", checkpoints["teacher"])
    batch = attack_batch()
    params = AttackParams(steps=5, alpha=0.02, step_rule="normalized", max_displacement=0.1)
    positions, history = adversarial_perturb(batch, student, teacher, params)
    assert len(history) == 6
    assert history[-1] > history[0]
    assert all(b >= a - 1e-6 for a, b in zip(history, history[1:]))  # it climbs every step
    delta = positions - batch.pos
    fixed = batch.fixed
    assert torch.all(delta[fixed] == 0)
    assert delta.norm(dim=1).max() <= 0.1 + 1e-6
    # Random noise of the same norm per system does much less.
    generator = torch.Generator().manual_seed(0)
    random_losses = []
    for _ in range(5):
        noise = torch.randn(delta.shape, generator=generator) * (~fixed)[:, None]
        per_system = lambda x: torch.zeros(3).index_add_(0, batch.batch, (x * x).sum(1)).sqrt()
        noise = noise * (per_system(delta) / per_system(noise))[batch.batch, None]
        moved = make_batch(batch.pos + noise, batch.atomic_numbers, batch.cell, batch.natoms, batch.tags, fixed)
        with torch.no_grad():
            random_losses.append(float(discrepancy(student(moved), teacher(moved), moved, params).mean()))
    assert history[-1] > max(random_losses)


def test_orthogonal_step_has_no_component_along_the_teacher_force(checkpoints):
    student = load_model(None, checkpoint=checkpoints["student"])
    teacher = load_teacher("painn-tiny", checkpoints["teacher"])
    batch = attack_batch()
    params = AttackParams(steps=1, alpha=1e-4, orthogonal_to_force=True, max_displacement=10.0)
    positions, _ = adversarial_perturb(batch, student, teacher, params)
    delta = positions - batch.pos
    with torch.no_grad():
        force = teacher(batch).forces * (~batch.fixed)[:, None]
    along = torch.zeros(3).index_add_(0, batch.batch, (delta * force).sum(1))
    norms = torch.zeros(3).index_add_(0, batch.batch, (delta * delta).sum(1)).sqrt()
    force_norms = torch.zeros(3).index_add_(0, batch.batch, (force * force).sum(1)).sqrt()
    assert (along.abs() / (norms * force_norms)).max() < 1e-3
    assert norms.min() > 0


def test_gradient_force_student_double_backward_and_kT(checkpoints):
    student = load_model(None, checkpoint=checkpoints["schnet"])
    teacher = load_teacher("painn-tiny", checkpoints["teacher"])
    params = AttackParams(steps=3, alpha=1e-3, kT=0.5, random_start=0.01)
    _, history = adversarial_perturb(attack_batch(), student, teacher, params,
                                     generator=torch.Generator().manual_seed(0))
    assert np.isfinite(history).all() and len(history) == 4


def test_run_adversarial_writes_labelled_frames_fairchem_reads(source, checkpoints, tmp_path):
    config = AdversarialConfig(input=str(source), out=str(tmp_path / "adv"), student=checkpoints["student"],
                               teacher="painn-tiny", checkpoint=checkpoints["teacher"], steps=5, alpha=0.02,
                               step_rule="normalized", max_displacement=0.1, batch_size=3)
    summary = run_adversarial(config, progress=False)
    steps = summary["mean_discrepancy_per_step"]
    assert steps[-1] > steps[0]
    frames = read(tmp_path / "adv")
    assert summary["written"] == len(frames) > 0
    teacher = load_teacher("painn-tiny", checkpoints["teacher"])
    with torch.no_grad():
        out = teacher(batch_from_frames(frames))
    np.testing.assert_allclose([f.energy for f in frames], out.energy.numpy(), rtol=1e-4, atol=1e-4)
    assert all(f.provenance.origin == "adversarial" and f.provenance.parent is not None for f in frames)
    assert frames[0].provenance.details["step_rule"] == "normalized"
    from fairchem.core.datasets import LmdbDataset

    assert len(LmdbDataset({"src": str(tmp_path / "adv")})) == len(frames)


def cli(*args):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(list(args))
    return code, stdout.getvalue(), stderr.getvalue().strip().splitlines()


def test_cli_runs_and_bad_input_is_one_line(source, checkpoints, tmp_path):
    code, out, _ = cli("rattle", "--input", str(source), "--out", str(tmp_path / "r"), "--teacher", "emt",
                       "--copies", "1", "--fraction", "0.5")
    assert code == 0 and '"written": 3' in out
    code, out, _ = cli("adversarial", "--input", str(source), "--out", str(tmp_path / "a"), "--student",
                       checkpoints["student"], "--teacher", "painn-tiny", "--checkpoint", checkpoints["teacher"],
                       "--steps", "2", "--step-rule", "normalized", "--alpha", "0.02", "--fraction", "0.5")
    assert code == 0 and "discrepancy per step" in out
    bad = {
        "label-only": ("adversarial", "--input", str(source), "--out", str(tmp_path / "x"), "--student",
                       checkpoints["student"], "--teacher", "emt"),
        "missing-student": ("adversarial", "--input", str(source), "--out", str(tmp_path / "x"), "--student",
                            str(tmp_path / "none.pt"), "--teacher", "emt"),
        "into-input": ("rattle", "--input", str(source), "--out", str(source), "--teacher", "emt"),
        "bad-sigma": ("rattle", "--input", str(source), "--out", str(tmp_path / "x"), "--sigma", "-1"),
        "missing-input": ("rattle", "--input", str(tmp_path / "none"), "--out", str(tmp_path / "x")),
        "bad-alpha": ("adversarial", "--input", str(source), "--out", str(tmp_path / "x"), "--student",
                      checkpoints["student"], "--alpha", "0"),
        "bad-rule": ("adversarial", "--input", str(source), "--out", str(tmp_path / "x"), "--student",
                     checkpoints["student"], "--step-rule", "sideways"),
    }
    expected = {"label-only": "emt is label-only", "missing-student": "--student .*none.pt: no such checkpoint",
                "into-input": "must not be", "bad-sigma": "--sigma -1.0", "missing-input": "no such file",
                "bad-alpha": "--alpha 0.0: expected positive", "bad-rule": "--step-rule sideways: expected one of"}
    import re

    for key, args in bad.items():
        code, _, lines = cli(*args)
        assert code == 2 and len(lines) == 1 and re.search(expected[key], lines[0]), (key, lines)
    assert len(read(source)) == 6  # the input is untouched
