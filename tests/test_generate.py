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
from pathlib import Path

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
from kdaug.errors import KdaugError
from kdaug.relax.runner import BatchedRelaxer, ReadyTasks, RelaxResult, RelaxTask, StepRecord
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
        # one energy and one largest free-atom force per evaluation, the kept ones among them
        assert len(result.energies) == len(result.fmaxes) == result.n_steps + 1
        for record in [*result.kept, result.final]:
            assert result.fmaxes[record.step] == pytest.approx(np.linalg.norm(record.forces[~fixed], axis=1).max())
        assert result.fmaxes[-1] < 0.05 <= min(result.fmaxes[:-1])


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


def test_relaxer_steps_while_the_sampler_is_slow_and_loses_nothing():
    slabs = [emt_slab(m, a, seed=i) for i, (m, a) in enumerate(SLABS * 2)]
    produced = []

    def slow_tasks():  # a sampler that hands over systems out of sid order, one every 50 ms
        for task in [tasks_of(slabs)[k] for k in (3, 0, 7, 1, 9, 2, 8, 4, 6, 5)]:
            time.sleep(0.05)
            produced.append(task.sid)
            yield task

    steps_while_waiting = []
    relaxer = BatchedRelaxer(load_model("emt"), max_systems=4, max_steps=40,
                             on_step=lambda n_systems, n_atoms: steps_while_waiting.append(len(produced) < 10))
    with ReadyTasks(slow_tasks(), ahead=2) as ready:
        results = list(relaxer.run(ready))
    assert sorted(r.task.sid for r in results) == list(range(10))  # each system once
    assert sum(steps_while_waiting) > 1  # it stepped the systems it had instead of waiting for a full batch
    alone = {r.task.sid: r for r in BatchedRelaxer(load_model("emt"), max_systems=1, max_steps=40).run(tasks_of(slabs))}
    for result in results:
        assert result.n_steps == alone[result.task.sid].n_steps
        np.testing.assert_allclose(result.final.positions, alone[result.task.sid].final.positions, atol=1e-10)


def test_a_relaxation_stopped_and_resumed_repeats_the_uninterrupted_one_bit_for_bit():
    """Each system's numbers depend only on its own trajectory (one EMT calculator each, from its first step):
    stopping the relaxer after two results and relaxing the rest with the same, warm, model gives exactly the
    energies and positions of one uninterrupted run, and every trajectory's calculator is dropped."""
    slabs = [emt_slab(m, a, seed=i) for i, (m, a) in enumerate(SLABS)]
    model = load_model("emt")
    whole = {r.task.sid: r for r in BatchedRelaxer(model, max_systems=3, max_steps=12).run(tasks_of(slabs))}
    assert not model._calcs
    run = BatchedRelaxer(model, max_systems=3, max_steps=12).run(tasks_of(slabs))
    stopped = [next(run), next(run)]
    run.close()  # the systems in flight are lost, as in a killed `kdaug generate`
    assert not model._calcs
    done = {r.task.sid for r in stopped}
    rest = BatchedRelaxer(model, max_systems=3, max_steps=12).run([t for t in tasks_of(slabs) if t.sid not in done])
    for result in [*stopped, *rest]:
        reference = whole[result.task.sid]
        assert result.energies == reference.energies
        np.testing.assert_array_equal(result.final.positions, reference.final.positions)


def test_sampler_errors_reach_the_relaxer():
    def failing():
        yield tasks_of([emt_slab()])[0]
        raise KdaugError("--bulk-db x: broken")

    with ReadyTasks(failing()) as ready, pytest.raises(KdaugError, match="broken"):
        list(BatchedRelaxer(load_model("emt"), max_steps=2).run(ready))


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

        def end_trajectories(self, ids):
            self.emt.end_trajectories(ids)

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
    with_workers = sorted(iter_systems(sampler, [1, 2, 3], num_workers=2), key=lambda system: system.sid)
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
    timing = ("seconds", "evaluations_per_s", "first_evaluation_s")
    assert manifest["counters"] == {key: n for key, n in summary.items() if n and key not in timing}
    steps = {frame.sid: frame.provenance.details["n_steps"] for frame in frames.values()}
    assert len(steps) == summary["systems"]  # every system kept frames: each cost its steps plus the start
    assert summary["evaluations"] == sum(n + 1 for n in steps.values())
    assert 0 < summary["first_evaluation_s"] < summary["seconds"]
    assert manifest["creation_args"]["teacher"] == "emt" and manifest["creation_args"]["precision"] == "fp32"


def assert_same_frames(ours, theirs):
    """Same (sid, fid) set; labels equal up to float64 rounding (batch composition changes summation order)."""
    assert sorted(ours) == sorted(theirs)
    for key, frame in ours.items():
        np.testing.assert_allclose(frame.positions, theirs[key].positions, rtol=0, atol=1e-10)
        np.testing.assert_allclose(frame.forces, theirs[key].forces, rtol=0, atol=1e-9)
        assert frame.energy == pytest.approx(theirs[key].energy, abs=1e-10)


def test_two_shards_equal_the_unsharded_run(bulk_db, tmp_path):
    run_generate(small_config(bulk_db, tmp_path / "whole"), progress=False)
    for index in range(2):
        run_generate(small_config(bulk_db, tmp_path / "sharded", num_shards=2, shard_index=index), progress=False)
    whole, sharded = read_frames(tmp_path / "whole"), read_frames(tmp_path / "sharded")
    assert_same_frames(whole, sharded)
    from fairchem.core.datasets import LmdbDataset

    assert len(LmdbDataset({"src": str(tmp_path / "sharded")})) == len(whole)


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (Linux)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(condition, seconds: float = 20.0) -> bool:
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.05)
    return condition()


def test_sampling_workers_end_with_their_killed_parent(bulk_db):
    code = ("import sys; from kdaug.sampling.oc import SamplerConfig, SystemSampler, iter_systems\n"
            "sampler = SystemSampler(SamplerConfig(bulk_db=sys.argv[1], adsorbate_ids=(0,), max_miller=1))\n"
            "for system in iter_systems(sampler, range(10**6), num_workers=2, ahead=2):\n"
            "    print(system.sid, flush=True)\n")
    process = subprocess.Popen([sys.executable, "-c", code, str(bulk_db)], cwd=ROOT, stdout=subprocess.PIPE)
    for _ in range(4):  # past the in-process start: the workers deliver
        process.stdout.readline()
    children = [int(pid) for task in Path(f"/proc/{process.pid}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    workers = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(workers) == 2 and wait_until(lambda: not any(map(running, workers)))


def test_kill_and_resume_gives_the_same_frames(bulk_db, tmp_path):
    # Sampling workers and the writer thread run; kill -9 lands while systems are in flight on all three.
    config = small_config(bulk_db, tmp_path / "whole", n_systems=8)
    run_generate(config, progress=False)
    out = tmp_path / "resumed"
    args = [sys.executable, "-m", "kdaug", "generate", "--n-systems", "8", "--out", str(out), "--teacher", "emt",
            "--bulk-db", str(bulk_db), "--adsorbate-ids", "0", "1", "2", "--max-miller", "1", "--optimizer", "fire",
            "--max-steps", "15", "--frame-fraction", "0.3", "--max-systems-per-batch", "3", "--num-workers", "2",
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
    assert_same_frames(whole, resumed)
    dataset = FrameDataset(out)
    assert len(dataset) == len(whole)  # nothing written twice
    dataset.close()


def test_workers_completing_out_of_order_give_the_in_process_frames(bulk_db, tmp_path):
    in_process = run_generate(small_config(bulk_db, tmp_path / "serial"), progress=False)
    pooled = run_generate(small_config(bulk_db, tmp_path / "pooled", num_workers=2), progress=False)
    assert_same_frames(read_frames(tmp_path / "serial"), read_frames(tmp_path / "pooled"))
    timing = ("seconds", "evaluations_per_s", "first_evaluation_s")
    assert {k: v for k, v in in_process.items() if k not in timing} == {k: v for k, v in pooled.items()
                                                                        if k not in timing}


def test_a_failing_write_stops_the_run_in_one_line_and_keeps_what_was_committed(bulk_db, tmp_path, monkeypatch):
    from kdaug.data.lmdb import LmdbWriter

    real_write, calls = LmdbWriter.write_batch, []

    def write_batch(self, frames, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_write(self, frames, **kwargs)

    out = tmp_path / "out"
    monkeypatch.setattr(LmdbWriter, "write_batch", write_batch)
    with pytest.raises(KdaugError) as error:
        run_generate(small_config(bulk_db, out), progress=False)
    message = str(error.value)
    assert "\n" not in message and "No space left on device" in message and "2 systems written" in message
    committed = read_frames(out)
    dataset = FrameDataset(out)
    assert len(dataset) == len(committed)
    dataset.close()
    monkeypatch.setattr(LmdbWriter, "write_batch", real_write)
    summary = run_generate(small_config(bulk_db, out), progress=False)
    assert summary["systems"] == 4  # the two committed systems are not redone
    resumed = read_frames(out)
    assert set(committed) <= set(resumed)
    dataset = FrameDataset(out)
    assert len(dataset) == len(resumed)  # nothing written twice
    dataset.close()


def test_anomalies_are_dropped_by_reason():
    slab = emt_slab("Cu", "O")
    task = tasks_of([slab])[0]
    forces = np.zeros((13, 3))
    start = StepRecord(0, slab.positions.copy(), 0.0, forces)
    desorbed = slab.positions.copy()
    desorbed[-1, 2] += 6.0
    result = RelaxResult(task, [], StepRecord(5, desorbed, -1.0, forces), [0.0, -1.0], [1.0, 0.01], 5, True, True)
    assert anomaly(result) == "desorbed"
    result = RelaxResult(task, [start], StepRecord(5, slab.positions, 200.0, forces), [0.0, 200.0], [1.0, 0.01], 5,
                         False, True)
    assert anomaly(result) == "exploded"
    result = RelaxResult(task, [], start, [float("nan")], [float("nan")], 0, False, False)
    assert anomaly(result) == "non_finite"
    assert anomaly(RelaxResult(task, [], start, [0.0], [0.01], 0, True, True)) is None


def test_a_force_spike_explodes_a_trajectory_whether_or_not_its_frame_was_kept():
    slab = emt_slab("Cu", "O")
    task = tasks_of([slab])[0]
    calm = StepRecord(2, slab.positions.copy(), -0.1, np.zeros((13, 3)))
    fmaxes = [1.0, 60.0, 0.01]  # the second evaluation's free-atom force is above 50 eV/A
    for kept in ([], [calm]):
        assert anomaly(RelaxResult(task, kept, calm, [0.0, 0.1, -0.1], fmaxes, 2, True, True)) == "exploded"
    assert anomaly(RelaxResult(task, [], calm, [0.0, 0.1, -0.1], [1.0, 40.0, 0.01], 2, True, True)) is None


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
        (lambda tmp, db: ["--bulk-db", str(db), "--precision", "tf32"], "--precision tf32: needs --device cuda"),
        (lambda tmp, db: ["--bulk-db", str(db), "--precision", "bf16"], "--precision bf16: expected one of"),
        (lambda tmp, db: ["--bulk-db", str(db), "--graph-workers", "2"], "--graph-workers 2: only the chgnet"),
    ],
    ids=["missing-db", "garbage-db", "wrong-shape-db", "unknown-adsorbate", "teacher-lacks-element",
         "unwritable-out", "bad-fraction", "tf32-on-cpu", "unknown-precision", "graph-workers-not-chgnet"],
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
