"""`kdaug inspect` / `kdaug export` end to end, and one-line errors on bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import subprocess
import sys

import ase.io
import lmdb
import numpy as np
import pytest
from torch_geometric.data import Data

from kdaug.cli.main import main
from kdaug.data.lmdb import LmdbWriter
from kdaug.types import Provenance


def kdaug(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI in this process (imports are paid once); same result shape as a subprocess."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(list(args))
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


@pytest.fixture
def dataset(tmp_path, frames):
    out = tmp_path / "ds"
    rattled = [f.replace(provenance=Provenance("rattled", "emt", parent=(f.sid, f.fid))) for f in frames[:2]]
    with LmdbWriter(out, frames_per_file=5) as writer:
        writer.write_batch(frames[:5])
        writer.write_batch([frames[5], *rattled])
    return out, [*frames, *rattled]


def test_inspect_reports_known_contents(dataset):
    path, frames = dataset
    result = kdaug("inspect", str(path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["n_samples"] == 8
    assert report["n_shards"] == 2
    assert report["origins"] == {"dft": 6, "rattled": 2}
    # 12 metal atoms + 1 adsorbate each: Cu/Pt/Au with O/H/C, frames 0..5 then copies of 0 and 1.
    assert report["elements"] == {"H": 3, "C": 2, "O": 3, "Cu": 36, "Pt": 36, "Au": 24}
    assert report["atoms_per_sample"] == {"min": 13.0, "mean": 13.0, "max": 13.0, "std": 0.0}
    energies = np.array([f.energy for f in frames])
    assert report["energy_ev"]["mean"] == pytest.approx(energies.mean())
    assert report["energy_ev"]["min"] == pytest.approx(energies.min())
    norms = np.concatenate([np.linalg.norm(f.forces, axis=1) for f in frames])
    assert report["force_norm_ev_per_ang"]["max"] == pytest.approx(norms.max(), rel=1e-5)
    assert report["fixed_fraction"] == pytest.approx(8 / 13)
    text = kdaug("inspect", str(path))
    assert "8 in 2 shard(s)" in text.stdout


def test_export_extxyz_reads_back_identical(dataset, tmp_path):
    path, frames = dataset
    out = tmp_path / "frames.extxyz"
    result = kdaug("export", str(path), str(out), "--format", "extxyz")
    assert result.returncode == 0, result.stderr
    images = ase.io.read(out, index=":")
    assert len(images) == len(frames)
    for atoms, frame in zip(images, frames):
        np.testing.assert_allclose(atoms.positions, frame.positions, atol=1e-5)
        np.testing.assert_array_equal(atoms.get_tags(), frame.tags)
        fixed = np.zeros(len(atoms), bool)
        fixed[atoms.constraints[0].index] = True
        np.testing.assert_array_equal(fixed, frame.fixed)
        assert atoms.get_potential_energy() == pytest.approx(frame.energy, abs=1e-5)
        np.testing.assert_allclose(atoms.get_forces(apply_constraint=False), frame.forces, atol=1e-5)
        assert atoms.info["sid"] == frame.sid and atoms.info["origin"] == frame.provenance.origin


def _is2re_lmdb(path):
    env = lmdb.open(str(path), subdir=False, map_size=1 << 24)
    with env.begin(write=True) as txn:
        data = Data(pos=np.zeros((2, 3)), atomic_numbers=np.array([1, 1]), y_init=0.0, y_relaxed=-1.0)
        txn.put(b"0", pickle.dumps(data))
        txn.put(b"length", pickle.dumps(1))
    env.close()


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: None, "no such file or directory"),
        (lambda p: p.write_bytes(os.urandom(4096)), "not an LMDB file"),
        (lambda p: p.mkdir(), "directory holds no *.lmdb shards"),
        (_is2re_lmdb, "is not a structure frame"),
    ],
    ids=["missing", "random-bytes", "empty-dir", "is2re"],
)
@pytest.mark.parametrize("command", ["inspect", "export"])
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, make, expected, command):
    target = tmp_path / "input.lmdb"
    make(target)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    args = [command, str(target)] + ([str(tmp_path / "out.extxyz")] if command == "export" else [])
    result = kdaug(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and str(target) in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_debug_shows_traceback_in_a_real_process(tmp_path):
    args = [sys.executable, "-m", "kdaug", "inspect", str(tmp_path / "missing")]
    plain = subprocess.run(args, capture_output=True, text=True, check=False)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    debug = subprocess.run([*args, "--debug"], capture_output=True, text=True, check=False)
    assert "Traceback" in debug.stderr and "no such file or directory" in debug.stderr


def test_help_lists_commands():
    result = subprocess.run([sys.executable, "-m", "kdaug", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    for command in ("generate", "rattle", "adversarial", "inspect", "export"):
        assert command in result.stdout
