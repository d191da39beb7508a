"""`kdaug train` fits per-element energy references and normalizers on the training set, trains through
them, keeps them on resume and exports them for fairchem's OCPCalculator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdaug.data.convert import frame_to_data
from kdaug.data.lmdb import LmdbWriter
from kdaug.data.training_set import TrainingSet
from kdaug.evaluate import evaluate
from kdaug.train import loop, target_stats
from kdaug.train.config import TrainConfig
from kdaug.train.loop import Trainer
from kdaug.train.target_stats import N_ELEMENTS, fit_output_transform, fit_references
from tests.conftest import emt_frames
from tests.test_cli_data import kdaug

# Per-atom energies (eV) added to EMT's energies make DFT-like totals: tens of eV apart across compositions.
ATOM_ENERGIES = {1: -3.4, 6: -7.1, 8: -4.9, 28: -5.5, 29: -3.7, 47: -2.8, 78: -6.0, 79: -3.2}


def totals(frames):
    return [f.replace(energy=f.energy + sum(ATOM_ENERGIES[int(z)] for z in f.atomic_numbers)) for f in frames]


@pytest.fixture(scope="module")
def dft(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("targets") / "dft"
    with LmdbWriter(path) as writer:
        writer.write_batch(totals(emt_frames(9)))
    return str(path)


def config(dft, out, **changes) -> TrainConfig:
    options = {"student": "painn-tiny", "train": (dft,), "out": str(out), "batch_size": 3, "max_steps": 2,
               "lr": 1e-3, "ema_decay": 0.0}
    return TrainConfig(**{**options, **changes})


def alloyed(frames, seed=0):
    """The EMT frames with their metal atoms drawn among Ni, Cu, Ag, Pt, Au and, in every other frame, one
    metal atom turned into H, C or O: compositions whose element counts are linearly independent."""
    rng = np.random.default_rng(seed)
    out = []
    for i, frame in enumerate(frames):
        numbers = frame.atomic_numbers.copy()
        metal = np.flatnonzero(numbers > 20)
        numbers[metal] = rng.choice([28, 29, 47, 78, 79], size=len(metal))
        if i % 2:
            numbers[rng.choice(metal)] = rng.choice([1, 6, 8])
        out.append(frame.replace(atomic_numbers=numbers))
    return out


def test_reference_fit_recovers_known_per_element_energies():
    frames = alloyed(emt_frames(24))
    rng = np.random.default_rng(1)
    counts = np.stack([np.bincount(f.atomic_numbers, minlength=N_ELEMENTS) for f in frames])
    known = np.zeros(N_ELEMENTS)
    known[list(ATOM_ENERGIES)] = list(ATOM_ENERGIES.values())
    energies = counts @ known + rng.normal(scale=0.01, size=len(frames))
    assert np.linalg.matrix_rank(counts[:, counts.sum(axis=0) > 0]) == len(ATOM_ENERGIES)
    fitted = fit_references(counts, energies)
    present = counts.sum(axis=0) > 0
    np.testing.assert_allclose(fitted[present], known[present], atol=0.02)
    assert not fitted[~present].any()

    samples = [frame_to_data(f.replace(energy=float(e))) for f, e in zip(frames, energies)]
    transform = fit_output_transform(samples, energy_reference="linear", normalize=True, conservative=False, seed=0)
    np.testing.assert_allclose(transform.references.numpy()[present], known[present], atol=0.02)
    assert abs(transform.energy[0]) < 0.01 and transform.energy[1] == pytest.approx(0.01, abs=0.006)
    free = np.concatenate([~f.fixed for f in frames])
    force_rms = np.sqrt((np.concatenate([f.forces for f in frames])[free] ** 2).sum(axis=1).mean())
    assert transform.forces == pytest.approx((0.0, force_rms), rel=1e-5)
    conservative = fit_output_transform(samples, energy_reference="linear", normalize=True, conservative=True, seed=0)
    assert conservative.energy[1] == conservative.forces[1] == pytest.approx(force_rms, rel=1e-5)


def test_collinear_compositions_get_the_minimum_norm_fit_and_large_sets_a_seeded_sample(monkeypatch):
    frames = emt_frames(6)  # Cu12 O, Pt12 H, Au12 C: 6 elements, 3 independent compositions
    counts = np.stack([np.bincount(f.atomic_numbers, minlength=N_ELEMENTS) for f in frames])
    energies = np.array([f.energy for f in frames]) + counts @ np.linspace(-5, -1, N_ELEMENTS)
    fitted = fit_references(counts, energies)
    residual = energies - counts @ fitted
    assert abs(residual.mean()) < 1e-9 and residual.std() < np.std([f.energy for f in frames])
    assert np.linalg.norm(fitted) <= np.linalg.norm(fitted + np.linalg.svd(counts)[2][-1])  # a null direction

    samples = [frame_to_data(f) for f in emt_frames(12)]
    monkeypatch.setattr(target_stats, "MAX_FIT_SAMPLES", 5)
    fits = [fit_output_transform(samples, energy_reference="linear", normalize=True, conservative=False, seed=s)
            for s in (0, 0, 1)]
    assert fits[0].n_samples == 5 and fits[0].energy != fits[2].energy
    assert fits[0].energy == fits[1].energy and torch.equal(fits[0].references, fits[1].references)


def energy_mae_after_training(dft, out, **options) -> float:
    trainer = Trainer(config(dft, out, **options), progress=False)
    trainer.run()
    trainer.close()
    return evaluate(trainer.student, [dft])["energy_mae_mev"]


def test_the_default_references_train_to_a_much_lower_energy_error(dft, tmp_path):
    # DFT-like totals (large per-element offsets), SchNet-tiny, 40 steps: with the default references, seeds 0-2
    # gave 5.5, 0.33 and 1.5 eV against 58, 35 and 38 eV without (ratio <= 0.095); two runs without (seeds s and
    # s + 10) differ by a ratio of 0.8-2, so the margin is the references' doing.
    options = {"student": "schnet-tiny", "max_steps": 40}
    with_transform = energy_mae_after_training(dft, tmp_path / "with", **options)
    without = energy_mae_after_training(dft, tmp_path / "without", energy_reference="none", normalize=False,
                                        **options)
    assert with_transform < 0.25 * without, (with_transform, without)


def test_resume_keeps_the_fitted_transform_and_another_option_is_refused(dft, tmp_path, monkeypatch):
    first = Trainer(config(dft, tmp_path, normalize=True), progress=False)
    transform = first.student.output_transform
    assert not transform.is_identity and float(transform.energy.rmsd) != float(transform.forces.rmsd)
    first.run()
    first.close()
    fitted = {k: v.clone() for k, v in transform.state_dict().items()}
    assert transform.references.element_references.nonzero().flatten().tolist() == [1, 6, 8, 29, 78, 79]

    def no_refit(*args, **kwargs):
        raise AssertionError("refitted on resume")

    monkeypatch.setattr(loop, "fit_output_transform", no_refit)
    resumed = Trainer(config(dft, tmp_path, normalize=True, max_steps=3), progress=False)
    for key, value in resumed.student.output_transform.state_dict().items():
        assert torch.equal(value, fitted[key]), key
    resumed.run()
    resumed.close()
    monkeypatch.undo()

    args = ["train", "--student", "painn-tiny", "--train", dft, "--batch-size", "3", "--max-steps", "3",
            "--ema-decay", "0", "--lr", "0.001", "--normalize", "--out", str(tmp_path)]
    assert kdaug(*args).returncode == 0  # same options: resumes (nothing left to do)
    for flag in (["--energy-reference", "none"], ["--no-normalize"]):
        result = kdaug(*args, *flag)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert flag[0][2:].replace("-", "_").removeprefix("no_") in result.stderr


def test_a_student_checkpoint_with_normalizers_keeps_them(dft, tmp_path, monkeypatch):
    first = Trainer(config(dft, tmp_path / "first"), progress=False)
    first.run()
    first.close()
    exported = torch.load(tmp_path / "first" / "student.pt", weights_only=False)

    monkeypatch.setattr(loop, "fit_output_transform", lambda *a, **k: pytest.fail("refitted"))
    second = Trainer(config(dft, tmp_path / "second", student_checkpoint=str(tmp_path / "first" / "student.pt"),
                            energy_reference="none", normalize=False), progress=False)
    transform = second.student.output_transform
    assert torch.equal(transform.energy.rmsd, exported["normalizers"]["energy"]["rmsd"])
    assert torch.equal(transform.references.element_references,
                       exported["elementrefs"]["energy"]["element_references"])
    assert second._fit_output_transform()["source"].startswith("kept from --student-checkpoint")
    second.close()


def test_training_set_samples_feed_the_fit(dft):
    data = TrainingSet([dft])
    try:
        none = fit_output_transform(data, energy_reference="none", normalize=False, conservative=False, seed=0)
    finally:
        data.close()
    assert none.energy == (0.0, 1.0) and none.forces == (0.0, 1.0) and not none.references.any()
