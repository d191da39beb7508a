"""`kdaug study`: the gap-closed arithmetic against hand-computed numbers, and a seconds-sized study end to end:
killed after its first finished student run, rerun (finished runs skipped), rerun again (nothing retrained)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kdaug.config import load_config
from kdaug.data.lmdb import LmdbWriter
from kdaug.study.config import StudyConfig
from kdaug.study.convergence import plateaued
from kdaug.study.plan import plan_runs
from kdaug.study.runner import run_study
from kdaug.study.table import gap_closed, markdown_table, table_rows
from tests.conftest import emt_frames
from tests.test_cli_data import kdaug

ROOT = Path(__file__).resolve().parents[1]


def test_gap_closed_follows_the_papers_table_3():
    # PaiNN-big -> PaiNN-small (paper Table 3): student 489 meV, teacher 440, n2n 457 -> 65 % (64.8 from unrounded
    # values); force cos 0.345 -> 0.348 with teacher 0.376 closes +9.7 % (9.3), vanilla KD (1) at 0.269 -245 % (-237).
    assert gap_closed(489, 457, 440) == pytest.approx(100 * 32 / 49)
    assert gap_closed(0.345, 0.348, 0.376) == pytest.approx(100 * 0.003 / 0.031)
    assert gap_closed(0.345, 0.269, 0.376) == pytest.approx(-100 * 0.076 / 0.031)
    assert gap_closed(0.2, 0.1, 0.2) is None and gap_closed(None, 1.0, 2.0) is None


def test_table_rows_take_each_seed_against_its_own_baseline():
    teacher = {"energy_mae_mev": 100.0, "force_mae_mev_per_ang": 10.0, "force_cos": 0.8, "efwt": 0.5,
               "samples_per_s": 50.0}
    student = {0: {"energy_mae_mev": 200.0, "force_mae_mev_per_ang": 20.0, "force_cos": 0.6, "efwt": 0.1,
                   "samples_per_s": 90.0},
               1: {"energy_mae_mev": 180.0, "force_mae_mev_per_ang": 30.0, "force_cos": 0.4, "efwt": 0.1,
                   "samples_per_s": 110.0}}
    kd = {0: {"energy_mae_mev": 150.0, "force_mae_mev_per_ang": 25.0, "force_cos": 0.7, "efwt": 0.3,
              "samples_per_s": 100.0},
          1: {"energy_mae_mev": 170.0, "force_mae_mev_per_ang": 20.0, "force_cos": 0.6, "efwt": 0.1,
              "samples_per_s": 100.0}}
    rows = table_rows(teacher, {"student": student, "n2n": kd}, "student")
    assert [row["label"] for row in rows] == ["teacher", "student", "n2n"]
    assert "gap_closed_pct" not in rows[1]
    assert rows[1]["metrics"]["energy_mae_mev"]["mean"] == pytest.approx(190.0)
    assert rows[1]["metrics"]["energy_mae_mev"]["std"] == pytest.approx(14.142136, rel=1e-6)  # sample std
    gap = rows[2]["gap_closed_pct"]
    # energy: seed 0 (200-150)/(200-100) = 50 %, seed 1 (180-170)/(180-100) = 12.5 %
    assert gap["energy_mae_mev"]["values"] == pytest.approx([50.0, 12.5])
    assert gap["energy_mae_mev"]["mean"] == pytest.approx(31.25)
    assert gap["energy_mae_mev"]["std"] == pytest.approx(26.516504, rel=1e-6)
    # forces: seed 0 moved away, (20-25)/(20-10) = -50 %; seed 1 (30-20)/(30-10) = +50 %
    assert gap["force_mae_mev_per_ang"]["values"] == pytest.approx([-50.0, 50.0])
    # cosine, higher is better: (0.6-0.7)/(0.6-0.8) = +50 %, (0.4-0.6)/(0.4-0.8) = +50 %
    assert gap["force_cos"]["values"] == pytest.approx([50.0, 50.0])
    assert gap["force_cos"]["std"] == pytest.approx(0.0, abs=1e-9)
    # EFwT: (0.1-0.3)/(0.1-0.5) = +50 %, (0.1-0.1)/(0.1-0.5) = 0 %
    assert gap["efwt"]["values"] == pytest.approx([50.0, 0.0])
    table = markdown_table(rows)
    assert "| n2n | n/a | 160.0 ± 14.1 (+31.2 ± 26.5 %) | 22.5 ± 3.5 (+0.0 ± 70.7 %) |" in table
    assert "| teacher | n/a | 100.0 | 10.0 | 0.800 | 0.500 | 50 |" in table
    assert "*" not in table  # nothing known about convergence: nothing marked

    convergence = {"teacher": {0: {"steps": 400, "plateaued": True}},
                   "student": {0: {"steps": 300, "plateaued": True}, 1: {"steps": 500, "plateaued": True}},
                   "n2n": {0: {"steps": 200, "plateaued": True}, 1: {"steps": 600, "plateaued": False}}}
    rows = table_rows(teacher, {"student": student, "n2n": kd}, "student", convergence)
    assert [row["plateaued"] for row in rows] == [[True], [True, True], [True, False]]
    table = markdown_table(rows)
    assert "| teacher | 400 | 100.0 | 10.0 | 0.800 | 0.500 | 50 |" in table
    assert "| student | 400 ± 141 | 190.0 ± 14.1 | 25.0 ± 7.1 |" in table
    assert "| n2n | 400 ± 283 | 160.0 ± 14.1 (+31.2 ± 26.5 %)* | 22.5 ± 3.5 (+0.0 ± 70.7 %)* |" in table
    assert table.splitlines()[-1].startswith("\\* not plateaued: ")


def test_plateau_flag_compares_the_last_fifth_of_validations_with_the_best_before():
    falling = [100.0, 80.0, 70.0, 65.0, 62.0, 60.0, 59.0, 58.5, 58.0, 57.0]  # tail [58.0, 57.0] vs best 58.5
    assert plateaued(falling) is False  # 58.5 -> 57.0 is 2.6 %
    assert plateaued([*falling[:-1], 57.9]) is True  # 58.5 -> 57.9 is 1.0 %
    assert plateaued([100.0, 90.0, 95.0, 96.0, 97.0]) is True  # the tail [97.0] did not beat 90
    assert plateaued([100.0, 97.0]) is False and plateaued([100.0, 99.0]) is True  # one value before, one after
    assert plateaued([100.0]) is None and plateaued([]) is None


@pytest.fixture(scope="module")
def study_yaml(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("study")
    frames = emt_frames(12)
    for name, part in (("dft", frames[:8]), ("val", frames[8:])):
        with LmdbWriter(root / name) as writer:
            writer.write_batch(part)
    budget = {"max_steps": 3, "batch_size": 2, "lr": 1e-3, "val_every": 100}  # validated once, at the end
    config = {
        "name": "seconds", "out": str(root / "out"), "seeds": [0, 1], "checkpoint_every": 1,
        "teacher": {"model": "painn-tiny", "train": {**budget, "max_steps": 4}},
        "student": {"model": "painn-tiny", "train": budget},
        "data": {"train": [str(root / "dft")], "val": [str(root / "val")]},
        "strategies": ["n2n", "v2v"], "kd_lambda": {"n2n": 1.0},
        "extra": {"rattle_copies": 1, "mix_ratios": [0.5]},
        "cka": {"max_samples": 4},
    }
    path = root / "study.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.glob("**/result.json")}


def test_a_killed_study_resumes_and_a_finished_one_retrains_nothing(study_yaml):
    config = load_config(StudyConfig, [study_yaml])
    out = Path(config.out)
    first = out / "runs" / "student" / "seed0" / "result.json"
    second = out / "runs" / "student" / "seed1"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "kdaug", "study", str(study_yaml)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # kill -9 once the first student run is finished and the second has a checkpoint
        deadline = time.monotonic() + 120
        while not (second / "checkpoint.pt").is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert first.is_file() and (second / "checkpoint.pt").is_file(), "the study was not killed where intended"
    assert not (out / "results.json").exists()
    interrupted = not (second / "result.json").is_file()
    before = _mtimes(out)
    assert {"teacher/result.json", "runs/student/seed0/result.json"} <= set(before)

    report = run_study(config, progress=False)
    after = _mtimes(out)
    assert {k: after[k] for k in before} == before  # finished runs were skipped
    labels = ("student", "n2n", "rattle_a0.5")
    assert set(after) == {"teacher/result.json"} | {f"runs/{label}/seed{s}/result.json" for label in labels
                                                     for s in (0, 1)}
    assert [s["strategy"] for s in report["skipped"]] == ["v2v"]
    assert "edge features" in report["skipped"][0]["reason"]

    # the table is the arithmetic on the runs' own evaluations
    rows = {row["label"]: row for row in report["tables"]["val"]}
    assert list(rows) == ["teacher", "student", "n2n", "rattle a=0.5"]

    def energy(folder: str) -> float:
        return json.loads((out / folder / "result.json").read_text())["val"]["val"]["energy_mae_mev"]

    for seed in (0, 1):
        student, kd = energy(f"runs/student/seed{seed}"), energy(f"runs/n2n/seed{seed}")
        expected = 100 * (student - kd) / (student - energy("teacher"))
        assert rows["n2n"]["gap_closed_pct"]["energy_mae_mev"]["values"][seed] == pytest.approx(expected)
    assert rows["rattle a=0.5"]["metrics"]["samples_per_s"]["n"] == 2
    saved = json.loads((out / "results.json").read_text())
    assert saved["tables"] == report["tables"] and saved["cka"]["gain"]["n2n"]["distilled_pair"] == ["layer1", "layer1"]
    assert "| n2n |" in (out / "results.md").read_text()
    for png in ("gap_closed.png", "learning_curves.png", "cka/student.png", "cka/n2n.png"):
        assert (out / png).stat().st_size > 0
    synthetic = json.loads((out / "runs" / "rattle_a0.5" / "seed0" / "config.json").read_text())
    assert synthetic["mix_ratio"] == 0.5 and synthetic["synthetic"] == [str(out / "data" / "rattle" / "part0")]
    kd_run = json.loads((out / "runs" / "n2n" / "seed0" / "config.json").read_text())  # targets read, not recomputed
    cache = out / "data" / "teacher-cache" / "n2n"
    assert kd_run["teacher_cache"] == str(cache) and len(list(cache.glob("*.lmdb"))) == 1  # the one DFT set
    assert json.loads((cache / "cache.json").read_text())["dtype"] == "float32"
    assert any("val" in json.loads(line) for line in (out / "runs/n2n/seed1/log.jsonl").read_text().splitlines())

    if interrupted:  # the killed run went on from its checkpoint
        assert any(json.loads(line).get("resumed") for line in (second / "log.jsonl").read_text().splitlines())

    run_study(dataclasses.replace(config, checkpoint_every=5), progress=False)  # nothing to retrain
    assert _mtimes(out) == after


def test_plan_lists_every_run_and_skips_what_the_pair_cannot_do(study_yaml):
    config = load_config(StudyConfig, [study_yaml], {"extra.kd": ("none", "n2n"), "online.rattle": (0.05,),
                                                     "extra.rs_dft": (1.0, 0.5)})
    runs, skipped = plan_runs(config, {"v2v": "no edge features"})
    labels = list(dict.fromkeys(run.label for run in runs))
    assert labels == ["student", "n2n", "rattle a=0.5", "rattle a=0.5 +n2n", "rattle a=0.5 r=0.5",
                      "rattle a=0.5 r=0.5 +n2n", "online rattle 0.05"]
    assert len(runs) == 2 * len(labels) and skipped == [{"strategy": "v2v", "reason": "no edge features"}]
    assert {run.folder for run in runs if run.label == "rattle a=0.5 r=0.5 +n2n"} == {
        "runs/rattle_a0.5_r0.5_n2n/seed0", "runs/rattle_a0.5_r0.5_n2n/seed1"}


def test_bad_study_config_is_one_line(tmp_path, study_yaml):
    bad = tmp_path / "bad.yml"
    bad.write_text(study_yaml.read_text() + "strategy: [n2n]\n")
    result = kdaug("study", str(bad))
    assert result.returncode == 2
    assert result.stderr.startswith(f"kdaug study: error: {bad}: unknown key(s) strategy;")
    result = kdaug("study", str(study_yaml), "--seeds", "1", "1")
    assert result.stderr.strip() == "kdaug study: error: --seeds (1, 1): expected distinct seeds (at least one)"
    result = kdaug("study", str(study_yaml), "--student.train.energy-coefficient", "-1")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "energy" in result.stderr and "a weight >= 0" in result.stderr, result.stderr


def test_bulk_databases_hold_only_the_asked_elements(tmp_path, study_yaml):
    import pickle

    from kdaug.errors import KdaugError
    from kdaug.study.runner import Study

    config = load_config(StudyConfig, [study_yaml], {"out": str(tmp_path / "out"),
                                                     "data.generate.elements": ("Cu", "Pt")})
    study = Study(config, progress=False)
    path = study._bulk_db({29, 78})
    assert path.endswith("bulks-Cu-Pt.pkl")
    with open(path, "rb") as handle:
        bulks = pickle.load(handle)
    from kdaug.sampling.oc import load_bulk_db

    cu_pt = {b["src_id"] for b in load_bulk_db(None) if set(b["atoms"].get_chemical_symbols()) <= {"Cu", "Pt"}}
    assert {b["src_id"] for b in bulks} == cu_pt
    assert {"kdaug-dcdft-Cu", "kdaug-dcdft-Pt"} < cu_pt  # and at least one Cu-Pt binary
    with pytest.raises(KdaugError, match="no embedded bulk is made of O only"):
        study._bulk_db({8})
    bad = load_config(StudyConfig, [study_yaml], {"out": str(tmp_path / "bad"), "data.generate.train_systems": 1,
                                                  "data.generate.elements": ("Cu", "Xx")})
    with pytest.raises(KdaugError, match="data.generate.elements: Xx: expected element symbols"):
        Study(bad, progress=False).ground_truth()


def test_made_data_is_made_once_and_refused_when_options_change_or_nothing_was_kept(tmp_path, study_yaml):
    from kdaug.errors import KdaugError
    from kdaug.perturb.rattle import RattleConfig
    from kdaug.study.runner import Study

    study = Study(load_config(StudyConfig, [study_yaml], {"out": str(tmp_path / "out")}), progress=False)
    calls = []

    def make(config, progress):
        calls.append(config)
        Path(config.out).mkdir(parents=True)
        return {"written": 3}

    config = RattleConfig(input=str(tmp_path / "in"), out=str(tmp_path / "r"), sigma=0.05)
    assert study._make("extra.rattle_copies", config, make) == str(tmp_path / "r")
    assert study._make("extra.rattle_copies", config, make) == str(tmp_path / "r") and len(calls) == 1
    with pytest.raises(KdaugError, match=r"^extra.rattle_copies: .*/r was made with other options; delete it"):
        study._make("extra.rattle_copies", RattleConfig(input=config.input, out=config.out, sigma=0.1), make)
    empty = RattleConfig(input=config.input, out=str(tmp_path / "empty"))
    with pytest.raises(KdaugError, match=r'holds no frames \({"written": 0}\)'):
        study._make("extra.rattle_copies", empty, lambda c, progress: make(c, progress) and {"written": 0})


def test_gap_closed_per_regime_against_the_baseline_of_that_regime():
    def metrics(energy: float, forces: float) -> dict:
        return {"energy_mae_mev": energy, "force_mae_mev_per_ang": forces, "force_cos": 0.5, "efwt": 0.1,
                "teacher_energy_mae_mev": energy / 2, "teacher_force_mae_mev_per_ang": forces / 2}

    teacher = {"energy_mae_mev": 100.0, "force_mae_mev_per_ang": 10.0, "force_cos": 0.5, "efwt": 0.1}
    runs = {"student": {0: metrics(200.0, 30.0)}, "n2n": {0: metrics(150.0, 25.0)},
            "student f=0.25": {0: metrics(400.0, 50.0)}, "n2n f=0.25": {0: metrics(250.0, 60.0)},
            "rattle x4 f=0": {0: metrics(300.0, 20.0)}}
    baselines = {"student": "student", "n2n": "student", "student f=0.25": "student f=0.25",
                 "n2n f=0.25": "student f=0.25", "rattle x4 f=0": "student"}
    rows = {row["label"]: row for row in table_rows(teacher, runs, baselines)}
    assert "gap_closed_pct" not in rows["student"] and "gap_closed_pct" not in rows["student f=0.25"]

    def gap(label: str, key: str) -> float:
        return rows[label]["gap_closed_pct"][key]["mean"]

    assert gap("n2n", "energy_mae_mev") == pytest.approx(50.0)  # (200-150)/(200-100)
    assert gap("n2n", "force_mae_mev_per_ang") == pytest.approx(25.0)  # (30-25)/(30-10)
    assert gap("n2n f=0.25", "energy_mae_mev") == pytest.approx(50.0)  # (400-250)/(400-100)
    assert gap("n2n f=0.25", "force_mae_mev_per_ang") == pytest.approx(-25.0)  # (50-60)/(50-10)
    assert gap("rattle x4 f=0", "energy_mae_mev") == pytest.approx(-100.0)  # against the full baseline: (200-300)/100
    assert gap("rattle x4 f=0", "force_mae_mev_per_ang") == pytest.approx(50.0)  # (30-20)/(30-10)
    assert rows["n2n f=0.25"]["baseline"] == "student f=0.25"
    assert rows["n2n"]["metrics"]["teacher_force_mae_mev_per_ang"]["mean"] == pytest.approx(12.5)
    assert "force MAE vs teacher (meV/A)" in markdown_table(list(rows.values())).splitlines()[0]


def test_plan_crosses_the_runs_with_the_data_regimes(study_yaml):
    config = load_config(StudyConfig, [study_yaml], {"regimes.dft_fraction": (0.0, 1.0, 0.25),
                                                     "regimes.synthetic_scale": (1.0, 4.0), "seeds": (0,)})
    runs, _ = plan_runs(config, {"v2v": "no edge features"})
    assert [(run.label, run.baseline) for run in runs] == [
        ("student", "student"), ("n2n", "student"), ("rattle a=0.5 x1", "student"), ("rattle a=0.5 x4", "student"),
        ("student f=0.25", "student f=0.25"), ("n2n f=0.25", "student f=0.25"),
        ("rattle a=0.5 x1 f=0.25", "student f=0.25"), ("rattle a=0.5 x4 f=0.25", "student f=0.25"),
        ("rattle x1 f=0", "student"), ("rattle x4 f=0", "student")]
    pure = runs[-1]
    assert (pure.dft_fraction, pure.synthetic_scale, pure.mix_ratio, pure.folder) == (
        0.0, 4.0, None, "runs/rattle_x4_f0/seed0")
    assert [run.folder for run in runs[:2]] == ["runs/student/seed0", "runs/n2n/seed0"]  # today's layout


def test_a_study_over_data_regimes_trains_each_on_its_share_and_scores_against_the_teacher(study_yaml, tmp_path):
    from kdaug.data.lmdb import FrameDataset

    config = load_config(StudyConfig, [study_yaml], {
        "out": str(tmp_path / "out"), "seeds": (0,), "strategies": (), "cka.enabled": False,
        "regimes.dft_fraction": (1.0, 0.5, 0.0), "regimes.synthetic_scale": (1.0,),
        "student.train.energy_coefficient": 4.0})
    report = run_study(config, progress=False)
    out = Path(config.out)
    rows = {row["label"]: row for row in report["tables"]["val"]}
    assert list(rows) == ["teacher", "student", "rattle a=0.5 x1", "student f=0.5", "rattle a=0.5 x1 f=0.5",
                          "rattle x1 f=0"]

    def run_config(label: str) -> dict:
        return json.loads((out / "runs" / label / "seed0" / "config.json").read_text())

    assert run_config("student")["energy_coefficient"] == 4.0  # the student's budget reaches every run
    assert json.loads((out / "teacher" / "config.json").read_text())["energy_coefficient"] == 1.0
    half = run_config("student_f0.5")["train"]
    assert half == [str(out / "data" / "regimes" / "dft-f0.5")] and len(FrameDataset(half[0])) == 4  # of 8 systems
    scaled = run_config("rattle_a0.5_x1_f0.5")
    assert scaled["train"] == half and len(FrameDataset(scaled["synthetic"][0])) == 4  # 1 x its 4 DFT frames
    pure = run_config("rattle_x1_f0")
    assert pure["synthetic"] == [] and pure["mix_ratio"] is None and len(FrameDataset(pure["train"][0])) == 8
    assert rows["rattle x1 f=0"]["baseline"] == "student" and rows["rattle a=0.5 x1 f=0.5"]["baseline"] == (
        "student f=0.5")
    for label in list(rows)[1:]:
        faithful = rows[label]["metrics"]["teacher_force_mae_mev_per_ang"]["mean"]
        assert faithful is not None and faithful > 0
    assert rows["student"]["steps"]["mean"] == 3 and rows["student"]["plateaued"] == [None]  # validated once
    assert "force MAE vs teacher" in (out / "results.md").read_text()


def test_arm_table_pivots_gap_closed_by_data_arm_and_regime():
    from kdaug.study.table import arm_table

    def row(label: str, energy: list[float], forces: list[float], plateaued: bool = True) -> dict:
        return {"label": label, "plateaued": [plateaued] * len(energy),
                "gap_closed_pct": {"energy_mae_mev": {"mean": sum(energy) / len(energy), "std": 1.0},
                                   "force_mae_mev_per_ang": {"mean": sum(forces) / len(forces), "std": 2.0}}}

    rows = [{"label": "student"}, row("generate a=0.5 x1", [10, 30], [-5, -5]),
            row("generate a=0.5 x1 f=0.25", [60, 40], [25, 35], plateaued=False), row("rattle x1 f=0", [-7], [8])]
    placement = {"generate a=0.5 x1": ("generate a=0.5", 1.0, 1.0),
                 "generate a=0.5 x1 f=0.25": ("generate a=0.5", 0.25, 1.0), "rattle x1 f=0": ("rattle", 0.0, 1.0)}
    assert arm_table(rows, placement).splitlines() == [
        "| data arm | synthetic scale | dft_fraction 1 | dft_fraction 0.25 | dft_fraction 0 |",
        "|---|---|---|---|---|",
        "| generate a=0.5 | x1 | +20 ± 1 / -5 ± 2 | +50 ± 1 / +30 ± 2* | n/a |",
        "| rattle | x1 | n/a | n/a | -7 ± 1 / +8 ± 2 |"]


def test_study_data_arms_onpolicy_and_disagreement_use_the_baseline_student(study_yaml, tmp_path):
    import numpy as np

    from kdaug.data.lmdb import FrameDataset
    from kdaug.data.run_record import sha256_of

    config = load_config(StudyConfig, [study_yaml], {
        "out": str(tmp_path / "out"), "seeds": (0,), "strategies": (), "cka.enabled": False,
        "extra.rattle_copies": 0, "extra.generate_systems": 3, "extra.generate_max_steps": 4,
        "extra.generate_frame_fraction": 1.0, "extra.onpolicy_systems": 2, "extra.disagreement_keep": 0.5,
        "data.generate.adsorbate_ids": (0, 1), "regimes.synthetic_scale": (0.5, 1.0)})
    report = run_study(config, progress=False)
    out = Path(config.out)
    rows = {row["label"]: row for row in report["tables"]["val"]}
    assert list(rows) == ["teacher", "student"] + [f"{arm} a=0.5 x{scale}" for arm in
                                                   ("generate", "onpolicy", "disagreement") for scale in ("0.5", "1")]
    baseline = out / "runs" / "student" / "seed0" / "student.pt"
    driven = FrameDataset(out / "data" / "onpolicy")
    assert json.loads((out / "data" / "onpolicy" / "done.json").read_text())["config"]["driver"] == str(baseline)
    details = driven.frame(0).provenance.details
    assert details["driver_sha256"] == sha256_of(baseline) and driven.frame(0).provenance.teacher is not None
    assert {driven.frame(i).sid for i in range(len(driven))} <= {
        f.sid for f in FrameDataset(out / "data" / "generate").iter_frames()}  # generate's first systems

    pool = len(FrameDataset(out / "data" / "generate"))
    for scale, count in ((0.5, 4), (1.0, 8)):  # x the 8 ground-truth frames, at most the pool
        folder = out / "data" / "regimes" / f"disagreement-f1-x{scale:g}"
        selection = np.load(folder / "selection.npz")
        kept = min(count, pool)
        assert len(FrameDataset(folder)) == kept == len(selection["kept"])
        scores = selection["scores"]
        assert scores[selection["kept"]].min() >= np.delete(scores, selection["kept"]).max(initial=-np.inf)
        manifest = json.loads((folder / "manifest.json").read_text())
        assert sha256_of(baseline) in json.dumps(manifest)
        assert len(FrameDataset(out / "data" / "regimes" / f"generate-f1-x{scale:g}")) == kept  # random, same count
    md = (out / "results.md").read_text()
    assert "| disagreement a=0.5 | x0.5 |" in md and "| onpolicy a=0.5 | x1 |" in md
    assert (out / "gap_vs_scale.png").stat().st_size > 0

    # a baseline student with other weights makes its data stale: refused, not reused
    from kdaug.errors import KdaugError

    baseline.write_bytes((out / "teacher" / "student.pt").read_bytes())
    with pytest.raises(KdaugError, match=r"^extra.onpolicy_systems: .*/onpolicy was made with other options; "
                                         r"delete it .*student_sha256"):
        run_study(config, progress=False)
