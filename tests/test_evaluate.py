"""`kdaug evaluate`: metrics equal hand-computed values and fairchem's Evaluator; CLI end to end; bad input."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fairchem.core.modules.evaluator import Evaluator

from kdaug.cli.main import main
from kdaug.data.lmdb import LmdbWriter
from kdaug.data.training_set import TrainingSet, collate
from kdaug.evaluate import evaluate, metrics_from_predictions
from kdaug.models import AtomisticModel, ModelOutput, load_model
from kdaug.types import Provenance
from tests.conftest import emt_frames


def kdaug(*args: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(list(args))
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture
def data(tmp_path):
    """Two LMDBs of EMT-labelled slabs: 3 DFT frames and 2 rattled ones (13 atoms, 5 free each)."""
    dft = tmp_path / "dft"
    rattled = tmp_path / "rattled"
    with LmdbWriter(dft) as writer:
        writer.write_batch(emt_frames(3))
    with LmdbWriter(rattled) as writer:
        writer.write_batch([f.replace(provenance=Provenance("rattled", "emt")) for f in emt_frames(2)])
    return dft, rattled


class ShiftedEMT(AtomisticModel):
    """EMT with a known error: energy + energy_shift eV, force x component + force_shift eV/A on every atom."""

    name = "emt-shifted"
    differentiable = False

    def __init__(self, energy_shift: float, force_shift: float) -> None:
        super().__init__()
        self.emt = load_model("emt")
        self.energy_shift, self.force_shift = energy_shift, force_shift

    def compute(self, batch, taps):
        out = self.emt(batch)
        shift = torch.tensor([self.force_shift, 0.0, 0.0], dtype=out.forces.dtype)
        return ModelOutput(energy=out.energy + self.energy_shift, forces=out.forces + shift)


def test_metrics_equal_hand_computed_values_per_origin():
    # system A: atom 0 fixed (its huge error is ignored), atom 1 free; system B: two free atoms
    energy, energy_target = torch.tensor([1.0, 2.0]), torch.tensor([1.01, 2.05])
    forces = torch.tensor([[5.0, 5.0, 5.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    forces_target = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.02], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]])
    fixed = torch.tensor([True, False, False, False])
    report = metrics_from_predictions(energy, energy_target, forces, forces_target, torch.tensor([2, 2]), fixed,
                                      origin=["dft", "rattled"])
    cos_a = 1 / math.sqrt(1 + 0.02**2)
    expected = {
        "n_samples": 2, "n_free_atoms": 3,
        "energy_mae_mev": (10 + 50) / 2,
        "force_mae_mev_per_ang": 1000 * (0.02 + 2.0) / 9,
        "force_cos": (cos_a + 1 - 1) / 3,
        "efwt": 0.5,  # A: 0.01 eV, max 0.02 eV/A -> within; B: 0.05 eV -> not
    }
    for key, value in expected.items():
        assert report[key] == pytest.approx(value, rel=1e-5), key
    assert report["per_origin"]["dft"] == pytest.approx(
        {"n_samples": 1, "n_free_atoms": 1, "energy_mae_mev": 10, "force_mae_mev_per_ang": 20 / 3,
         "force_cos": cos_a, "efwt": 1.0}, rel=1e-5)
    assert report["per_origin"]["rattled"] == pytest.approx(
        {"n_samples": 1, "n_free_atoms": 2, "energy_mae_mev": 50, "force_mae_mev_per_ang": 2000 / 6,
         "force_cos": 0.0, "efwt": 0.0}, rel=1e-5, abs=1e-9)
    assert "per_origin" not in metrics_from_predictions(energy, energy_target, forces, forces_target,
                                                        torch.tensor([2, 2]), fixed, origin=["dft", "dft"])
    # a system without free atoms: no force metrics; its force condition of EFwT holds
    alone = metrics_from_predictions(torch.tensor([0.0]), torch.tensor([0.001]), forces[:1], forces_target[:1],
                                     torch.tensor([1]), fixed[:1])
    assert alone["force_mae_mev_per_ang"] is None and alone["force_cos"] is None and alone["efwt"] == 1.0


def test_metrics_match_fairchem_evaluator_on_free_atoms():
    generator = torch.Generator().manual_seed(0)
    natoms = torch.tensor([5, 8, 3, 6])
    n_atoms = int(natoms.sum())
    energy_target = torch.randn(4, generator=generator)
    energy = energy_target + 0.02 * torch.randn(4, generator=generator)
    forces_target = torch.randn(n_atoms, 3, generator=generator)
    forces = forces_target + 0.01 * torch.randn(n_atoms, 3, generator=generator)
    forces[:5] = forces_target[:5] + 0.001  # system 0 is within the force threshold
    fixed = torch.rand(n_atoms, generator=generator) < 0.3
    ours = metrics_from_predictions(energy, energy_target, forces, forces_target, natoms, fixed)
    free = ~fixed
    free_natoms = torch.zeros(4, dtype=torch.long).index_add_(0, torch.repeat_interleave(torch.arange(4), natoms),
                                                             free.long())
    theirs = Evaluator(task="s2ef").eval(
        {"energy": energy, "forces": forces[free], "natoms": free_natoms},
        {"energy": energy_target, "forces": forces_target[free], "natoms": free_natoms})
    assert ours["energy_mae_mev"] == pytest.approx(1000 * theirs["energy_mae"]["metric"], rel=1e-5)
    assert ours["force_mae_mev_per_ang"] == pytest.approx(1000 * theirs["forces_mae"]["metric"], rel=1e-5)
    assert ours["force_cos"] == pytest.approx(theirs["forces_cosine_similarity"]["metric"], rel=1e-5)
    assert ours["efwt"] == theirs["energy_forces_within_threshold"]["metric"]
    assert 0 < ours["efwt"] < 1


def test_emt_on_emt_labels_has_no_error(data):
    report = evaluate(load_model("emt"), list(data), batch_size=2, device="cpu")
    assert report["n_samples"] == 5 and report["n_free_atoms"] == 5 * 5
    assert report["energy_mae_mev"] == pytest.approx(0, abs=1e-2)
    assert report["force_mae_mev_per_ang"] == pytest.approx(0, abs=1e-2)
    assert report["force_cos"] == pytest.approx(1, abs=1e-6)
    assert report["efwt"] == 1.0
    assert report["per_origin"]["dft"]["n_samples"] == 3 and report["per_origin"]["rattled"]["n_samples"] == 2
    assert report["samples_per_s"] > 0 and report["model"] == "emt"


@pytest.mark.parametrize(("energy_shift", "efwt"), [(0.01, 1.0), (0.03, 0.0)])
def test_known_errors_through_evaluate(data, energy_shift, efwt):
    model = ShiftedEMT(energy_shift, 0.02).train()
    report = evaluate(model, [data[0]], batch_size=2)
    assert model.training  # evaluation leaves the model's mode as it found it
    assert report["energy_mae_mev"] == pytest.approx(1000 * energy_shift, abs=1e-2)
    assert report["force_mae_mev_per_ang"] == pytest.approx(20 / 3, abs=1e-2)  # 20 meV/A on x, 0 on y and z
    assert report["efwt"] == efwt
    assert "per_origin" not in report


def test_cli_evaluates_a_saved_tiny_painn(tmp_path, data):
    torch.manual_seed(0)
    painn = load_model("painn-tiny")
    checkpoint = tmp_path / "painn.pt"
    painn.save(checkpoint)
    code, stdout, stderr = kdaug("evaluate", "--model", str(checkpoint), "--data", *map(str, data), "--json",
                                 "--batch-size", "3")
    assert code == 0, stderr
    report = json.loads(stdout)
    dataset = TrainingSet(list(data))
    batch = collate([dataset[i] for i in range(len(dataset))])
    dataset.close()
    with torch.no_grad():
        out = painn(batch)
    expected = metrics_from_predictions(out.energy, batch.y, out.forces, batch.force, batch.natoms, batch.fixed,
                                        batch.origin)
    assert report["model"] == "painn-tiny" and report["data"] == list(map(str, data))
    assert sorted(report["per_origin"]) == ["dft", "rattled"]
    pairs = [(report, expected), *((report["per_origin"][o], expected["per_origin"][o]) for o in ("dft", "rattled"))]
    for got, want in pairs:
        for key in ("n_samples", "n_free_atoms", "energy_mae_mev", "force_mae_mev_per_ang", "force_cos", "efwt"):
            assert got[key] == pytest.approx(want[key], rel=1e-4), key
    assert report["energy_mae_mev"] > 1  # an untrained model: the comparison is not trivially 0 == 0
    code, text, _ = kdaug("evaluate", "--model", str(checkpoint), "--data", str(data[0]))
    assert code == 0 and "EFwT" in text and "samples/s" in text


def test_bad_input_is_one_line(tmp_path, data):
    checkpoint = tmp_path / "painn.pt"
    load_model("painn-tiny").save(checkpoint)
    not_a_model = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(3)}, not_a_model)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    LmdbWriter(tmp_path / "empty").close()
    cases = [
        (["--model", str(checkpoint), "--data", str(tmp_path / "nowhere")], rf"--data {tmp_path / 'nowhere'}: no such"),
        (["--model", str(checkpoint), "--data", str(tmp_path / "empty")], rf"--data {tmp_path / 'empty'}: holds no"),
        (["--model", str(tmp_path / "missing.pt"), "--data", str(data[0])], r"--model .*missing.pt: no such file"),
        (["--model", str(not_a_model), "--data", str(data[0])], r"--model .*weights.pt: not a model checkpoint"),
        (["--model", str(text), "--data", str(data[0])], r"--model .*notes.txt: not a model checkpoint"),
        (["--model", str(checkpoint), "--model-config", "schnet-tiny", "--data", str(data[0])],
         r"--model .*painn.pt: not a model checkpoint .*does not fit model config schnet-tiny"),
        (["--model", str(checkpoint), "--data", str(data[0]), "--batch-size", "0"], r"--batch-size 0: "),
        (["--model", str(checkpoint), "--data", str(data[0]), "--device", "gpu0"], r"--device gpu0: expected"),
    ]
    for args, pattern in cases:
        code, stdout, stderr = kdaug("evaluate", *args)
        assert code == 2 and stdout == "", args
        assert stderr.count("\n") == 1, stderr
        assert stderr.startswith("kdaug evaluate: error: ")
        assert re.search(pattern, stderr), (pattern, stderr)


def test_evaluate_does_not_import_the_training_half():
    """Imports run down the layers: train imports evaluate, never the other way."""
    code = ("import sys, kdaug.evaluate, kdaug.data.training_set; "
            "print(sorted(m for m in sys.modules if m.startswith('kdaug.train')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "[]"
