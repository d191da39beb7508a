"""`kdaug generate` and the batched relaxer on real (small) systems with the EMT teacher."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.optimize import FIRE as AseFIRE
from ase.optimize import LBFGS as AseLBFGS

from kdaug.cli.main import main
from kdaug.data.convert import fixed_mask
from kdaug.data.lmdb import FrameDataset
from kdaug.generate import GenerateConfig, anomaly, run_generate
from kdaug.models import load_model
from kdaug.relax.runner import BatchedRelaxer, RelaxResult, RelaxTask, StepRecord
from kdaug.sampling.oc import SamplerConfig, SystemSampler, iter_systems
from tests.conftest import emt_slab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bulk_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("bulks") / "bulks.pkl"
    entries = [{"atoms": bulk("Cu", "fcc", a=3.61), "src_id": "test-Cu"},
               {"atoms": bulk("Pt", "fcc", a=3.92), "src_id": "test-Pt"}]
    path.write_bytes(pickle.dumps(entries))
    return path


def small_config(bulk_db, out, **changes) -> GenerateConfig:
    options = dict(n_systems=6, out=str(out), teacher="emt", bulk_db=str(bulk_db), adsorbate_ids=(0, 1, 2),
                   max_miller=1, optimizer="fire", max_steps=15, frame_fraction=0.3, max_systems_per_batch=3,
                   num_workers=0, seed=3)
    options.update(changes)
    return GenerateConfig(**options)


def read_frames(out):
    dataset = FrameDataset(out)
    frames = {(f.sid, f.fid): f for f in dataset.iter_frames()}
    dataset.close()
    return frames


def tasks_of(slabs):
    return [RelaxTask.from_atoms(slab, sid=i) for i, slab in enumerate(slabs)]


SLABS = [("Cu", "O"), ("Pt", "H"), ("Au", "C"), ("Ni", "N"), ("Pd", "O")]


@pytest.mark.parametrize(("name", "ase_optimizer"), [("fire", AseFIRE), ("lbfgs", AseLBFGS)])
def test_relaxer_matches_ase_one_by_one(name, ase_optimizer):
    slabs = [emt_slab(m, a, seed=i) for i, (m, a) in enumerate(SLABS)]
    relaxer = BatchedRelaxer(load_model("emt"), optimizer=name, max_systems=2, fmax=0.05, max_steps=200)
    results = {r.task.sid: r for r in relaxer.run(tasks_of(slabs))}
    for sid, slab in enumerate(slabs):
        atoms = slab.copy()
        atoms.calc = EMT()
        optimizer = ase_optimizer(atoms, logfile=None)
        optimizer.run(fmax=0.05, steps=200)
        result = results[sid]
        assert result.converged
        assert result.n_steps == optimizer.nsteps
        assert result.final.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-6)
        np.testing.assert_allclose(result.final.positions, atoms.positions, atol=1e-5)
        fixed = fixed_mask(slab)
        np.testing.assert_array_equal(result.final.positions[fixed], slab.positions[fixed])


def test_batch_stays_full_while_work_remains():
    slabs = [emt_slab(m, a, seed=i) for i, (m, a) in enumerate(SLABS * 2)]
    handed_out = []

    def tasks():
        for task in tasks_of(slabs):
            handed_out.append(task.sid)
            yield task

    sizes = []
    relaxer = BatchedRelaxer(load_model("emt"), max_systems=3, max_steps=40,
                             on_step=lambda n_systems, n_atoms: sizes.append((n_systems, len(handed_out))))
    results = list(relaxer.run(tasks()))
    assert sorted(r.task.sid for r in results) == list(range(10))
    # Every forward taken before the last system entered ran with a full batch.
    before_last = [n for n, handed in sizes if handed < len(slabs)]
    assert before_last and all(n == 3 for n in before_last)
    assert len({r.n_steps for r in results}) > 1  # systems really finished at different steps


def test_atom_budget_and_out_of_memory_backoff():
    class OutOfMemoryAboveTwo(torch.nn.Module):
        """EMT that raises CUDA's out-of-memory error for batches of more than two systems."""

        def __init__(self):
            super().__init__()
            self.emt = load_model("emt")
            self.sizes, self.failures = [], 0

        dtype = torch.float64

        def check_elements(self, numbers):
            self.emt.check_elements(numbers)

        def forward(self, batch):
            if len(batch.natoms) > 2:
                self.failures += 1
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            self.sizes.append(len(batch.natoms))
            return self.emt(batch)

    slabs = [emt_slab(m, a, seed=i) for i, (m, a) in enumerate(SLABS)]
    reference = {r.task.sid: r for r in BatchedRelaxer(load_model("emt"), max_steps=10).run(tasks_of(slabs))}
    model = OutOfMemoryAboveTwo()
    relaxer = BatchedRelaxer(model, max_systems=5, max_steps=10)
    results = {r.task.sid: r for r in relaxer.run(tasks_of(slabs))}
    assert relaxer.max_systems == 2 and model.failures == 1 and max(model.sizes) == 2
    assert sorted(results) == list(range(len(slabs)))  # nothing lost
    for sid, result in results.items():
        np.testing.assert_allclose(result.final.positions, reference[sid].final.positions)
    sizes = []
    budget = BatchedRelaxer(load_model("emt"), max_systems=5, max_atoms=27, max_steps=3,
                            on_step=lambda n, atoms: sizes.append(atoms))
    list(budget.run(tasks_of(slabs)))
    assert max(sizes) <= 27


def test_sampling_is_deterministic_per_system_and_worker_count(bulk_db):
    sampler = SystemSampler(SamplerConfig(bulk_db=str(bulk_db), adsorbate_ids=(0, 1, 2), max_miller=1, seed=5))
    alone = sampler.sample(3)
    in_process = list(iter_systems(sampler, [1, 2, 3], num_workers=0))
    with_workers = list(iter_systems(sampler, [1, 2, 3], num_workers=2))
    np.testing.assert_array_equal(alone.atoms.positions, in_process[2].atoms.positions)
    for a, b in zip(in_process, with_workers):
        np.testing.assert_array_equal(a.atoms.positions, b.atoms.positions)
        assert a.details == b.details
    tags = alone.atoms.get_tags()
    assert set(tags) == {0, 1, 2}
    np.testing.assert_array_equal(fixed_mask(alone.atoms), tags == 0)
    assert sampler.sample(4).details != alone.details or not np.array_equal(
        sampler.sample(4).atoms.positions, alone.atoms.positions)


def test_generate_writes_fixed_atoms_unmoved_and_provenance(bulk_db, tmp_path):
    config = small_config(bulk_db, tmp_path / "out")
    summary = run_generate(config, progress=False)
    frames = read_frames(tmp_path / "out")
    assert summary["systems"] == 6 and summary["frames"] == len(frames) > 0
    sampler = SystemSampler(SamplerConfig(bulk_db=str(bulk_db), adsorbate_ids=(0, 1, 2), max_miller=1, seed=3))
    for (sid, fid), frame in frames.items():
        start = sampler.sample(sid).atoms
        np.testing.assert_array_equal(frame.fixed, fixed_mask(start))
        np.testing.assert_allclose(frame.positions[frame.fixed], start.positions[frame.fixed], atol=1e-5)
        assert frame.provenance.origin == "synthetic" and frame.provenance.teacher == "emt"
        details = frame.provenance.details
        assert details["step"] == fid and details["bulk_src_id"] in {"test-Cu", "test-Pt"}
        assert set(details) >= {"miller", "shift", "adsorbate_id", "placement", "n_steps", "converged", "seed"}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["n_frames"] == len(frames)
    assert manifest["counters"] == {key: n for key, n in summary.items() if n and key != "seconds"}
    assert manifest["creation_args"]["teacher"] == "emt"


def test_two_shards_equal_the_unsharded_run(bulk_db, tmp_path):
    run_generate(small_config(bulk_db, tmp_path / "whole"), progress=False)
    for index in range(2):
        run_generate(small_config(bulk_db, tmp_path / "sharded", num_shards=2, shard_index=index), progress=False)
    whole, sharded = read_frames(tmp_path / "whole"), read_frames(tmp_path / "sharded")
    assert sorted(whole) == sorted(sharded)
    for key, frame in whole.items():
        np.testing.assert_array_equal(frame.positions, sharded[key].positions)
        assert frame.energy == sharded[key].energy
    from fairchem.core.datasets import LmdbDataset

    assert len(LmdbDataset({"src": str(tmp_path / "sharded")})) == len(whole)


def test_kill_and_resume_gives_the_same_frames(bulk_db, tmp_path):
    config = small_config(bulk_db, tmp_path / "whole", n_systems=8)
    run_generate(config, progress=False)
    out = tmp_path / "resumed"
    args = [sys.executable, "-m", "kdaug", "generate", "--n-systems", "8", "--out", str(out), "--teacher", "emt",
            "--bulk-db", str(bulk_db), "--adsorbate-ids", "0", "1", "2", "--max-miller", "1", "--optimizer", "fire",
            "--max-steps", "15", "--frame-fraction", "0.3", "--max-systems-per-batch", "3", "--num-workers", "0",
            "--seed", "3"]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        counters = json.loads(manifest.read_text())["counters"] if manifest.exists() else {}
        if counters.get("systems", 0) - counters.get("dropped", 0) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = read_frames(out)
    assert 0 < len(partial) < len(read_frames(tmp_path / "whole"))
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True)
    whole, resumed = read_frames(tmp_path / "whole"), read_frames(out)
    assert sorted(whole) == sorted(resumed)
    dataset = FrameDataset(out)
    assert len(dataset) == len(whole)  # nothing written twice
    dataset.close()


def test_anomalies_are_dropped_by_reason():
    slab = emt_slab("Cu", "O")
    task = tasks_of([slab])[0]
    forces = np.zeros((13, 3))
    start = StepRecord(0, slab.positions.copy(), 0.0, forces)
    desorbed = slab.positions.copy()
    desorbed[-1, 2] += 6.0
    result = RelaxResult(task, [], StepRecord(5, desorbed, -1.0, forces), [0.0, -1.0], 5, True, True)
    assert anomaly(result) == "desorbed"
    result = RelaxResult(task, [start], StepRecord(5, slab.positions, 200.0, forces), [0.0, 200.0], 5, False, True)
    assert anomaly(result) == "exploded"
    result = RelaxResult(task, [], start, [float("nan")], 0, False, False)
    assert anomaly(result) == "non_finite"
    assert anomaly(RelaxResult(task, [], start, [0.0], 0, True, True)) is None


def cli(*args):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["generate", *args])
    return code, stderr.getvalue().strip().splitlines()


@pytest.mark.parametrize(
    ("make_args", "expected"),
    [
        (lambda tmp, db: ["--bulk-db", str(tmp / "nope.pkl")], "--bulk-db .*nope.pkl: no such file"),
        (lambda tmp, db: ["--bulk-db", str(_write(tmp / "junk.pkl", b"junk"))], "junk.pkl: not a pickle"),
        (lambda tmp, db: ["--bulk-db", str(_write(tmp / "list.pkl", pickle.dumps([1, 2])))],
         "expected a non-empty list of dicts"),
        (lambda tmp, db: ["--bulk-db", str(db), "--adsorbate-ids", "999"], "--adsorbate-ids 999: not in"),
        (lambda tmp, db: ["--bulk-db", str(_write(tmp / "fe.pkl", pickle.dumps(
            [{"atoms": bulk("Fe"), "src_id": "fe"}])))], "none of its 1 bulks uses only elements the teacher"),
        (lambda tmp, db: ["--bulk-db", str(db), "--out", str(_write(tmp / "file", b"")) + "/sub"],
         "--out .*file/sub: cannot write there"),
        (lambda tmp, db: ["--bulk-db", str(db), "--frame-fraction", "1.5"], "--frame-fraction 1.5: expected"),
    ],
    ids=["missing-db", "garbage-db", "wrong-shape-db", "unknown-adsorbate", "teacher-lacks-element",
         "unwritable-out", "bad-fraction"],
)
def test_bad_generate_input_is_one_line(tmp_path, bulk_db, make_args, expected):
    import re

    args = ["--n-systems", "2", "--teacher", "emt", "--out", str(tmp_path / "out"), *make_args(tmp_path, bulk_db)]
    code, lines = cli(*args)
    assert code == 2
    assert len(lines) == 1 and re.search(expected, lines[0]), lines
    assert not (tmp_path / "out").exists()  # rejected before anything was written


def _write(path, payload):
    path.write_bytes(payload)
    return path


def test_recipe_yaml_with_unknown_key_is_an_error(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("n_systems: 2\nteacher: emt\nframe_fracton: 0.2\n")
    code, lines = cli("--config", str(recipe), "--out", str(tmp_path / "out"))
    assert code == 2 and "unknown key(s) frame_fracton" in lines[0]
