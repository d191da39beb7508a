"""On-policy generation: `kdaug generate --driver` relaxes with the driver's forces, the teacher labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.emt import EMT

from kdaug.data.run_record import sha256_of
from kdaug.generate import run_generate
from kdaug.models import load_model
from tests.test_generate import assert_same_frames, bulk_db, cli, read_frames, small_config

__all__ = ["bulk_db"]  # the module fixture, shared with tests/test_generate.py


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    """Two tiny PaiNN checkpoints, initialised differently (two different drivers)."""
    folder = tmp_path_factory.mktemp("drivers")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        load_model("painn-tiny").save(folder / f"student{seed}.pt")
        paths.append(str(folder / f"student{seed}.pt"))
    return paths


def emt_label(frame) -> tuple[float, np.ndarray]:
    atoms = Atoms(numbers=frame.atomic_numbers, positions=frame.positions, cell=frame.cell, pbc=True)
    atoms.calc = EMT()
    return atoms.get_potential_energy(), atoms.get_forces()


def test_a_driver_equal_to_the_teacher_gives_the_frames_of_a_plain_generate(bulk_db, tmp_path):
    plain = run_generate(small_config(bulk_db, tmp_path / "plain", n_systems=4), progress=False)
    driven = run_generate(small_config(bulk_db, tmp_path / "driven", n_systems=4, driver="emt"), progress=False)
    ours, theirs = read_frames(tmp_path / "driven"), read_frames(tmp_path / "plain")
    assert len(ours) > 0
    assert_same_frames(ours, theirs)
    assert driven["driver_evaluations"] == plain["evaluations"]  # the same relaxation steps
    assert driven["teacher_evaluations"] == driven["frames"] == plain["frames"]  # one label per kept frame
    assert "evaluations" not in driven
    for frame in ours.values():
        assert frame.provenance.teacher == "emt" and frame.provenance.details["driver"] == "emt"
    counters = json.loads((tmp_path / "driven" / "manifest.json").read_text())["counters"]
    assert counters["driver_evaluations"] == plain["evaluations"] and counters["teacher_evaluations"] == len(ours)


def test_a_student_drives_the_teacher_labels_and_provenance_holds_its_sha256(bulk_db, tmp_path, students):
    config = small_config(bulk_db, tmp_path / "on-policy", driver=students[0], frame_fraction=0.5,
                          n_systems=3)
    summary = run_generate(config, progress=False)
    frames = read_frames(tmp_path / "on-policy")
    assert summary["frames"] == len(frames) > 0 and summary["teacher_evaluations"] >= len(frames)
    sha = sha256_of(students[0])
    manifest = json.loads((tmp_path / "on-policy" / "manifest.json").read_text())
    assert manifest["data_options"]["driver_sha256"] == sha == manifest["creation_args"]["driver_sha256"]
    assert manifest["creation_args"]["driver"] == students[0]
    run_generate(small_config(bulk_db, tmp_path / "plain", frame_fraction=0.5, n_systems=3), progress=False)
    plain = read_frames(tmp_path / "plain")
    moved_differently = 0
    for key, frame in frames.items():
        assert frame.provenance.details["driver_sha256"] == sha
        energy, forces = emt_label(frame)  # labels: the teacher's at the driver's positions (stored as float32)
        assert frame.energy == pytest.approx(energy, abs=1e-4)
        np.testing.assert_allclose(frame.forces, forces, atol=1e-4)
        if key[1] > 0 and key in plain:
            moved_differently += not np.allclose(frame.positions, plain[key].positions, atol=1e-6)
    assert moved_differently > 0  # the trajectories follow the student, not the teacher


def test_resume_refuses_a_changed_driver_in_one_line(bulk_db, tmp_path, students):
    out = tmp_path / "out"
    base = ["--n-systems", "2", "--teacher", "emt", "--bulk-db", str(bulk_db), "--out", str(out),
            "--max-miller", "1", "--max-steps", "3", "--num-workers", "0", "--adsorbate-ids", "0", "1"]
    code, lines = cli(*base, "--driver", students[0])
    assert code == 0, lines
    code, lines = cli(*base, "--driver", students[0])  # the same driver resumes (nothing left to do)
    assert code == 0, lines
    for other in (["--driver", students[1]], ["--driver", "emt"], []):
        code, lines = cli(*base, *other)
        assert code == 2 and len(lines) == 1 and "was started with other data options" in lines[0], lines
        assert "driver_sha256" in lines[0] or "driver_name" in lines[0]


@pytest.mark.parametrize(("driver", "expected"), [
    ("missing.pt", "--driver .*missing.pt: no such checkpoint file"),
    ("painn-tiny", "--driver painn-tiny: no such checkpoint file"),
    ("not-a-checkpoint", "--driver .*not-a-checkpoint: not a model checkpoint kdaug can load"),
], ids=["missing", "untrained-config", "junk-file"])
def test_bad_driver_is_one_line(bulk_db, tmp_path, driver, expected):
    import re

    if driver == "not-a-checkpoint":
        driver = str(tmp_path / driver)
        (tmp_path / "not-a-checkpoint").write_bytes(b"junk")
    elif driver.endswith(".pt"):
        driver = str(tmp_path / driver)
    code, lines = cli("--n-systems", "2", "--teacher", "emt", "--bulk-db", str(bulk_db), "--out",
                      str(tmp_path / "out"), "--driver", driver)
    assert code == 2 and len(lines) == 1 and re.search(expected, lines[0]), lines
    assert not (tmp_path / "out").exists()
