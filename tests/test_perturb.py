"""`kdaug rattle` and `kdaug adversarial` on small EMT-labelled frames with tiny GNNs."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT

from kdaug.cli.main import main
from kdaug.data.batch import batch_from_frames
from kdaug.data.convert import frame_to_atoms
from kdaug.data.lmdb import FrameDataset
from kdaug.models import load_model, load_teacher
from kdaug.perturb.adversarial import (
    AdversarialConfig,
    AttackParams,
    adversarial_perturb,
    attack,
    discrepancy,
    run_adversarial,
)
from kdaug.perturb.rattle import RattleConfig, run_rattle
from kdaug.state import BatchState
from tests.conftest import emt_frames


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
    manifest = json.loads((tmp_path / "wild" / "manifest.json").read_text())
    assert manifest["counters"] == {key: n for key, n in wild.items() if n}  # one tally for both


def attack_state(teacher_dtype=torch.float32):
    return BatchState.from_frames(emt_frames(3), dtype=teacher_dtype)


def test_adversarial_discrepancy_rises_and_beats_random_noise(checkpoints):
    student = load_model(None, checkpoint=checkpoints["student"])
    teacher = load_teacher("painn-tiny", checkpoints["teacher"])
    state = attack_state()
    params = AttackParams(steps=5, alpha=0.02, step_rule="normalized", max_displacement=0.1)
    result = attack(state, student, teacher, params)
    assert result.discrepancy.shape == (6, 3)
    history = result.discrepancy.mean(dim=1).tolist()
    assert history[-1] > history[0]
    assert all(b >= a - 1e-6 for a, b in zip(history, history[1:]))  # it climbs every step
    delta = result.positions - state.positions
    fixed = state.fixed
    assert torch.all(delta[fixed] == 0)
    assert delta.norm(dim=1).max() <= 0.1 + 1e-6
    # Random noise of the same norm per system does much less.
    generator = torch.Generator().manual_seed(0)
    random_losses = []
    for _ in range(5):
        noise = torch.randn(delta.shape, generator=generator) * (~fixed)[:, None]
        per_system = lambda x: torch.zeros(3).index_add_(0, state.system_idx, (x * x).sum(1)).sqrt()
        noise = noise * (per_system(delta) / per_system(noise))[state.system_idx, None]
        moved = state.replace(positions=state.positions + noise)
        with torch.no_grad():
            loss = discrepancy(student(moved.to_batch()), teacher(moved.to_batch()), moved, params)
        random_losses.append(float(loss.mean()))
    assert history[-1] > max(random_losses)


def test_orthogonal_step_has_no_component_along_the_teacher_force(checkpoints):
    student = load_model(None, checkpoint=checkpoints["student"])
    teacher = load_teacher("painn-tiny", checkpoints["teacher"])
    state = attack_state()
    params = AttackParams(steps=1, alpha=1e-4, orthogonal_to_force=True, max_displacement=10.0)
    delta = attack(state, student, teacher, params).positions - state.positions
    with torch.no_grad():
        force = teacher(state.to_batch()).forces * (~state.fixed)[:, None]
    along = torch.zeros(3).index_add_(0, state.system_idx, (delta * force).sum(1))
    norms = torch.zeros(3).index_add_(0, state.system_idx, (delta * delta).sum(1)).sqrt()
    force_norms = torch.zeros(3).index_add_(0, state.system_idx, (force * force).sum(1)).sqrt()
    assert (along.abs() / (norms * force_norms)).max() < 1e-3
    assert norms.min() > 0


def test_gradient_force_student_double_backward_and_kT(checkpoints):
    student = load_model(None, checkpoint=checkpoints["schnet"])
    teacher = load_teacher("painn-tiny", checkpoints["teacher"])
    params = AttackParams(steps=3, alpha=1e-3, kT=0.5, random_start=0.01)
    batch = attack_state().to_batch()  # the training loop's entry point takes a model input Batch
    generator = torch.Generator().manual_seed(0)
    positions, history = adversarial_perturb(batch, student, teacher, params, generator=generator)
    assert np.isfinite(history).all() and len(history) == 4
    assert positions.shape == batch.pos.shape and torch.all(positions[batch.fixed] == batch.pos[batch.fixed])


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


def test_adversarial_output_is_independent_of_batch_size_for_a_seed(source, checkpoints, tmp_path):
    options = dict(input=str(source), student=checkpoints["student"], teacher="painn-tiny",
                   checkpoint=checkpoints["teacher"], steps=3, alpha=0.02, step_rule="normalized",
                   max_displacement=0.1, random_start=0.02, seed=4)
    runs = {}
    for batch_size in (1, 3):
        out = tmp_path / f"batch{batch_size}"
        summary = run_adversarial(AdversarialConfig(out=str(out), batch_size=batch_size, **options), progress=False)
        runs[batch_size] = (summary, {(f.sid, f.fid): f for f in read(out)})
    (summary_1, alone), (summary_3, together) = runs[1], runs[3]
    assert sorted(alone) == sorted(together) and len(alone) == summary_1["written"] > 0
    for key, frame in alone.items():
        # The same frame up to float32 rounding in the batched forwards (~1e-6 A).
        np.testing.assert_allclose(frame.positions, together[key].positions, rtol=0, atol=1e-5)
        assert frame.energy == pytest.approx(together[key].energy, rel=1e-5)
        details, other = frame.provenance.details, together[key].provenance.details
        assert details["final_discrepancy"] == pytest.approx(other["final_discrepancy"], rel=1e-5)
        assert details["seed"] == 4 and details["random_start"] == 0.02 and details["force_weight"] == 100.0
    np.testing.assert_allclose(summary_1["mean_discrepancy_per_step"], summary_3["mean_discrepancy_per_step"],
                               rtol=1e-5)
    # A different seed starts elsewhere.
    other = run_adversarial(AdversarialConfig(out=str(tmp_path / "seed5"), batch_size=3, **{**options, "seed": 5}),
                            progress=False)
    assert other["mean_discrepancy_per_step"][0] != summary_3["mean_discrepancy_per_step"][0]


def test_each_adversarial_frame_records_its_own_discrepancy(source, checkpoints, tmp_path):
    config = AdversarialConfig(input=str(source), out=str(tmp_path / "adv"), student=checkpoints["student"],
                               teacher="painn-tiny", checkpoint=checkpoints["teacher"], steps=2, alpha=0.02,
                               step_rule="normalized", max_displacement=0.1, batch_size=6)
    run_adversarial(config, progress=False)
    frames = read(tmp_path / "adv")
    finals = [f.provenance.details["final_discrepancy"] for f in frames]
    assert len(frames) > 1 and len(set(finals)) == len(finals)  # not one batch mean for all
    for frame in frames:
        steps = frame.provenance.details["discrepancy_per_step"]
        assert len(steps) == 3 and steps[-1] == frame.provenance.details["final_discrepancy"]
    # Recompute the last frame's discrepancy alone, at its stored positions.
    student = load_model(None, checkpoint=checkpoints["student"])
    teacher = load_teacher("painn-tiny", checkpoints["teacher"])
    state = BatchState.from_frames(frames[-1:], dtype=torch.float32)
    with torch.no_grad():
        own = discrepancy(student(state.to_batch()), teacher(state.to_batch()), state, config.params())
    assert finals[-1] == pytest.approx(float(own[0]), rel=1e-4)


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
