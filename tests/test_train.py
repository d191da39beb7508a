"""`kdaug train` end to end on tiny models and EMT-labelled slabs: mixing, KD, online augmentation,
resume after kill -9, export to fairchem's OCPCalculator, torchrun, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdaug.data.batch import batch_from_frames
from kdaug.data.lmdb import LmdbWriter
from kdaug.models import load_model
from kdaug.train.config import TrainConfig
from kdaug.train.loop import Trainer, run_train
from tests.conftest import emt_frames, emt_slab, write_training_data
from tests.test_cli_data import kdaug

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """6 DFT (EMT) frames, 4 synthetic ones, 3 for validation, painn-tiny and gemnet-oc-tiny teacher checkpoints."""
    root = tmp_path_factory.mktemp("train-data")
    paths = write_training_data(root, 13)
    load_model("gemnet-oc-tiny").save(root / "gemnet.pt")
    paths["gemnet"] = str(root / "gemnet.pt")
    return paths


def config(data, out, **changes) -> TrainConfig:
    options = {"student": "painn-tiny", "train": (data["dft"],), "out": str(out), "batch_size": 2,
               "max_steps": 6, "checkpoint_every": 2, "lr": 1e-3}
    return TrainConfig(**{**options, **changes})


def read_log(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_mixed_training_writes_run_files_and_the_export_runs_in_ocpcalculator(data, tmp_path):
    from fairchem.core.common.relaxation.ase_utils import OCPCalculator

    summary = run_train(config(data, tmp_path, synthetic=(data["synthetic"],), mix_ratio=0.5, rs_dft=0.5,
                               val=(data["val"], data["dft"]), normalize=True, energy_coefficient=4.0),
                        progress=False)
    assert summary["steps"] == 6
    assert {"checkpoint.pt", "student.pt", "log.jsonl", "curves.png", "config.json"} <= {
        p.name for p in tmp_path.iterdir()}
    train_lines = [r for r in read_log(tmp_path) if "loss" in r]
    assert [r["step"] for r in train_lines] == list(range(1, 7))
    assert any(0 < r["synthetic_share"] for r in train_lines)
    assert "val" in read_log(tmp_path)[-2]
    assert read_log(tmp_path)[-1] == {"stopped": {"step": 6, "reason": "max_steps", "best_step": 6,
                                                  "best": summary["val"]["force_mae_mev_per_ang"]}}

    exported = torch.load(tmp_path / "student.pt", weights_only=False)
    energy_norm, forces_norm = exported["normalizers"]["energy"], exported["normalizers"]["forces"]
    assert float(energy_norm["rmsd"]) not in (1.0, float(forces_norm["rmsd"])) and float(forces_norm["rmsd"]) != 1.0
    assert exported["elementrefs"]["energy"]["element_references"][[1, 6, 8, 29, 78, 79]].all()
    assert exported["config"]["loss_functions"] == [{"energy": {"fn": "mae", "coefficient": 4.0}},
                                                    {"forces": {"fn": "l2mae", "coefficient": 100.0}}]

    atoms = emt_slab("Pt", "H", seed=3)
    expected = load_model(None, tmp_path / "student.pt")
    frame_batch = batch_from_frames([_frame(atoms)])
    output = expected(frame_batch)
    atoms.calc = OCPCalculator(checkpoint_path=str(tmp_path / "student.pt"), cpu=True)
    assert atoms.get_potential_energy() == pytest.approx(float(output.energy), abs=1e-4)
    np.testing.assert_allclose(atoms.get_forces(apply_constraint=False), output.forces.detach().numpy(), atol=1e-4)


def _frame(atoms):
    from kdaug.data.convert import atoms_to_frame

    return atoms_to_frame(atoms, sid=0, fid=0)


def test_mix_ratio_sets_the_synthetic_share_and_rs_dft_the_weights(data, tmp_path):
    trainer = Trainer(config(data, tmp_path, synthetic=(data["synthetic"],), mix_ratio=1.0, max_steps=2),
                      progress=False)
    trainer.run()
    assert all(r["synthetic_share"] == 1.0 for r in read_log(tmp_path) if "loss" in r)
    assert trainer.visits[:6].sum() == 0 and trainer.visits[6:].sum() == 4


@pytest.mark.parametrize("mode", ["vanilla1", "n2n", "v2v", "hessian"])
def test_kd_modes_train_with_a_live_teacher(data, tmp_path, mode):
    teacher = {"vanilla1": {"teacher": "emt"}, "hessian": {"teacher": "emt"},
               "n2n": {"teacher": "painn-tiny", "teacher_checkpoint": data["teacher"]},
               "v2v": {"teacher": "gemnet-oc-tiny", "teacher_checkpoint": data["gemnet"]}}[mode]
    run_train(config(data, tmp_path, kd=mode, kd_lambda=1.0, max_steps=3, **teacher), progress=False)
    kd_values = [r["kd"] for r in read_log(tmp_path) if "loss" in r]
    assert all(np.isfinite(kd_values)) and kd_values[0] > 0


def test_cached_teacher_targets_give_the_live_loss(data, tmp_path):
    cache = tmp_path / "cache"
    result = kdaug("teacher-cache", "--teacher", "painn-tiny", "--checkpoint", data["teacher"], "--data",
                   data["dft"], "--kd", "n2n", "--out", str(cache))
    assert result.returncode == 0, result.stderr
    teacher = {"teacher": "painn-tiny", "teacher_checkpoint": data["teacher"], "kd": "n2n", "kd_lambda": 1.0,
               "max_steps": 2}
    run_train(config(data, tmp_path / "live", **teacher), progress=False)
    run_train(config(data, tmp_path / "cached", teacher_cache=str(cache), **teacher), progress=False)
    live, cached = ([r for r in read_log(tmp_path / name) if "loss" in r] for name in ("live", "cached"))
    for a, b in zip(live, cached):
        assert b["kd"] == pytest.approx(a["kd"], rel=1e-2)
        assert b["l0"] == pytest.approx(a["l0"], rel=1e-5)


@pytest.mark.parametrize("online", [{"online_rattle": 0.05}, {"online_adversarial": 2}])
def test_online_augmentation_relabels_a_share_of_each_batch(data, tmp_path, online):
    teacher = {"teacher": "emt"} if "online_rattle" in online else {"teacher": "painn-tiny",
                                                                    "teacher_checkpoint": data["teacher"]}
    run_train(config(data, tmp_path, online_share=0.5, max_steps=3, **teacher, **online), progress=False)
    assert [r["synthetic_share"] for r in read_log(tmp_path) if "loss" in r] == [0.5, 0.5, 0.5]


def test_kill_9_then_resume_reproduces_the_uninterrupted_loss_curve(data, tmp_path):
    args = ["train", "--student", "painn-tiny", "--train", data["dft"], "--synthetic", data["synthetic"],
            "--mix-ratio", "0.5", "--batch-size", "2", "--max-steps", "60", "--checkpoint-every", "3",
            "--online-rattle", "0.05", "--teacher", "emt"]
    reference = tmp_path / "reference"
    assert kdaug(*args, "--out", str(reference)).returncode == 0
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "kdaug", *args, "--out", str(killed)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(_lines(killed / "log.jsonl")) < 10:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(_lines(killed / "log.jsonl")) < 60
    saved_step = torch.load(killed / "checkpoint.pt", weights_only=False)["step"]
    assert 3 <= saved_step < 60
    assert kdaug(*args, "--out", str(killed)).returncode == 0
    resumed = [r for r in read_log(killed) if "loss" in r]
    uninterrupted = [r for r in read_log(reference) if "loss" in r]
    assert [r["step"] for r in read_log(killed) if "resumed" in r] == [saved_step]
    assert [r["step"] for r in resumed] == list(range(1, 61))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in uninterrupted], rel=1e-6)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def test_torchrun_two_ranks_train_on_disjoint_samples(data, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
               "-m", "kdaug", "train", "--student", "schnet-tiny", "--train", data["dft"], "--synthetic",
               data["synthetic"], "--batch-size", "1", "--epochs", "1", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    rank0, rank1 = np.load(out / "visits.rank0.npy"), np.load(out / "visits.rank1.npy")
    assert rank0.sum() == rank1.sum() == 5
    assert not np.any((rank0 > 0) & (rank1 > 0))
    assert np.all(rank0 + rank1 == 1)
    assert (out / "student.pt").is_file()


@pytest.mark.parametrize(("flags", "expected"), [
    (["--mix-ratio", "1.5"], "--mix-ratio"),
    (["--mix-ratio", "0.5"], "--mix-ratio"),
    (["--rs-dft", "0"], "--rs-dft"),
    (["--energy-coefficient", "-1"], "--energy-coefficient"),
    (["--energy-coefficient", "0", "--force-coefficient", "0"], "--force-coefficient"),
    (["--kd", "v2v", "--teacher", "emt", "--student", "schnet-tiny"], "--kd"),
    (["--kd", "n2n"], "--teacher"),
    (["--student", "emt"], "--student"),
    (["--train", "/nonexistent/lmdb"], "/nonexistent/lmdb"),
])
def test_bad_input_is_one_line_and_writes_nothing(data, tmp_path, flags, expected):
    out = tmp_path / "run"
    base = ["train", "--student", "painn-tiny", "--train", data["dft"], "--max-steps", "2", "--out", str(out)]
    result = kdaug(*base, *flags)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, result.stderr
    assert not out.exists()


def test_resume_with_other_data_shaping_options_is_refused(data, tmp_path):
    base = ["train", "--student", "painn-tiny", "--train", data["dft"], "--max-steps", "2", "--out", str(tmp_path)]
    assert kdaug(*base).returncode == 0
    result = kdaug(*base, "--seed", "5")
    assert result.returncode == 2 and "seed" in result.stderr
    assert kdaug(*base[:-4], "--max-steps", "3", "--out", str(tmp_path)).returncode == 0
    assert [r["step"] for r in read_log(tmp_path) if "loss" in r] == [1, 2, 3]


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs" / "train").glob("*.yml")), ids=lambda p: p.stem)
def test_paper_training_recipes_load(recipe):
    from kdaug.config import load_config

    loaded = load_config(TrainConfig, [recipe], {"student": "painn-small", "train": ("d",), "out": "o",
                                                  "max_steps": 10})
    assert loaded.ema_decay == 0.999 and loaded.clip_grad_norm == 10.0 and loaded.lr_milestones


def test_hessian_from_a_teacher_cache_gives_the_live_loss(data, tmp_path):
    """The engine makes batch.pos require grad for --kd hessian; cached vectors and H v (read in the DataLoader
    worker) give the live teacher's loss."""
    from kdaug.models import load_teacher
    from kdaug.train.strategies import get_strategy
    from kdaug.train.teacher_cache import build_teacher_cache

    cache = tmp_path / "cache"
    build_teacher_cache(load_teacher("emt"), [data["dft"], data["synthetic"]], get_strategy("hessian"), cache,
                        dtype="float32", progress=False)
    options = {"teacher": "emt", "kd": "hessian", "kd_lambda": 1.0, "max_steps": 2, "synthetic": (data["synthetic"],),
               "num_workers": 1}
    run_train(config(data, tmp_path / "live", **options), progress=False)
    run_train(config(data, tmp_path / "cached", teacher_cache=str(cache), **options), progress=False)
    live, cached = ([r for r in read_log(tmp_path / name) if "loss" in r] for name in ("live", "cached"))
    assert live[0]["kd"] > 0 and len(live) == len(cached) == 2
    for a, b in zip(live, cached):
        assert b["kd"] == pytest.approx(a["kd"], rel=1e-4)
        assert b["l0"] == pytest.approx(a["l0"], rel=1e-5)


@pytest.mark.parametrize("kd", [None, "vanilla1"])
def test_dataloader_workers_open_their_own_lmdb_environments(data, tmp_path, kd):
    """--num-workers 2 after the parent read the data (the linear reference fit; KD from a teacher cache),
    on a kdaug-written and a fairchem-tutorial LMDB, fresh and on resume."""
    from tests.test_train_data import write_tutorial_lmdb

    tutorial, _ = write_tutorial_lmdb(tmp_path / "tutorial.lmdb", 4)
    extra = {}
    if kd is not None:
        cache = tmp_path / "cache"
        result = kdaug("teacher-cache", "--teacher", "emt", "--data", data["dft"], str(tutorial), "--kd", kd,
                       "--out", str(cache))
        assert result.returncode == 0, result.stderr
        extra = {"kd": kd, "kd_lambda": 1.0, "teacher": "emt", "teacher_cache": str(cache)}
    out = tmp_path / "run"
    options = {"train": (data["dft"], str(tutorial)), "num_workers": 2, "checkpoint_every": 2, **extra}
    run_train(config(data, out, max_steps=2, **options), progress=False)
    run_train(config(data, out, max_steps=4, **options), progress=False)
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3, 4]


def test_a_teacher_cache_refuses_changed_data_and_another_label_only_teacher_naming_the_file(data, tmp_path):
    changed = emt_frames(6)
    changed[2] = changed[2].replace(energy=changed[2].energy + 0.5)  # same length, first and last frame
    paths = {}
    for name, frames in (("same", emt_frames(6)), ("changed", changed)):
        with LmdbWriter(tmp_path / name) as writer:
            writer.write_batch(frames)
        paths[name] = str(tmp_path / name)
    cache = tmp_path / "cache"
    result = kdaug("teacher-cache", "--teacher", "emt", "--data", paths["same"], "--kd", "vanilla1",
                   "--out", str(cache))
    assert result.returncode == 0, result.stderr
    base = ["train", "--student", "painn-tiny", "--max-steps", "1", "--kd", "vanilla1", "--kd-lambda", "1",
            "--teacher-cache", str(cache)]
    assert kdaug(*base, "--teacher", "emt", "--train", paths["same"], "--out", str(tmp_path / "ok")).returncode == 0
    result = kdaug(*base, "--teacher", "emt", "--train", paths["changed"], "--out", str(tmp_path / "changed-run"))
    assert result.returncode == 2 and f"no targets for --train {paths['changed']}" in result.stderr, result.stderr
    result = kdaug(*base, "--teacher", "ase:ase.calculators.lj:LennardJones", "--train", paths["same"],
                   "--out", str(tmp_path / "lj-run"))
    assert result.returncode == 2 and "ase.calculators.emt.EMT" in result.stderr, result.stderr
    assert "LennardJones" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_epochs_1_reports_one_epoch(data, tmp_path):
    result = kdaug("train", "--student", "painn-tiny", "--train", data["dft"], "--batch-size", "2", "--epochs", "1",
                   "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["epochs"] == 1 and summary["steps"] == 3
