"""Fuzz: damaged run folders (checkpoint.pt, config.json, log.jsonl, student.pt truncated at many offsets,
flipped bytes, empty, random, wrong JSON) through `kdaug train` (resume), `kdaug evaluate` and `kdaug study`.
Every run ends in success or one error line with exit 2 naming the damaged file, never a traceback, and a
failed resume leaves the folder as it was. The commands run in one child process (`tests.kdaug_batch`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import yaml

from kdaug.data.lmdb import LmdbWriter
from tests.conftest import emt_frames
from tests.test_integrity import kdaug_batch, one_error_line


def damaged_copies(name: str, source: bytes, rng: np.random.Generator) -> dict[str, bytes]:
    """Named damaged versions of one file's bytes."""
    size = len(source)
    copies = {"empty": b"", "random": rng.bytes(max(size, 64))}
    for cut in sorted({1, 10, size // 3, size // 2, size - 200, size - 1} - {0}):
        if 0 < cut < size:
            copies[f"truncated-{cut}"] = source[:cut]
    for offset in sorted({0, 5, size // 4, size // 2, 3 * size // 4, size - 2} & set(range(size))):
        flipped = bytearray(source)
        flipped[offset] ^= 0xFF
        copies[f"flipped-{offset}"] = bytes(flipped)
    if name.endswith(".json"):
        copies |= {"list": b"[]", "wrong-types": json.dumps({"seed": "x", "train": 3}).encode()}
    if name == "log.jsonl":
        lines = source.splitlines(keepends=True)
        copies["garbage-line"] = b"".join([lines[0], b"not json\n", *lines[1:]])
    return copies


def folder_files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != ".run.lock"}


def test_damaged_run_folders_end_in_success_or_one_line(tmp_path):
    frames = emt_frames(8)
    for name, part in (("dft", frames[:6]), ("val", frames[6:])):
        with LmdbWriter(tmp_path / name) as writer:
            writer.write_batch(part)
    train = ["train", "--student", "painn-tiny", "--train", str(tmp_path / "dft"), "--batch-size", "2",
             "--checkpoint-every", "2", "--energy-reference", "none"]
    half, full = tmp_path / "half", tmp_path / "full"
    made = kdaug_batch([[*train, "--max-steps", "2", "--out", str(half)],
                        [*train, "--max-steps", "4", "--out", str(full)]])
    assert [r["code"] for r in made] == [0, 0], made
    (half / "student.pt").unlink()
    rng = np.random.default_rng(25)
    commands, expected_state = [], {}
    for name in ("checkpoint.pt", "config.json", "log.jsonl", "student.pt"):
        base = full if name == "student.pt" else half
        for damage, payload in damaged_copies(name, (base / name).read_bytes(), rng).items():
            folder = tmp_path / "corpus" / f"{name}-{damage}"
            shutil.copytree(base, folder)
            (folder / name).write_bytes(payload)
            expected_state[str(folder)] = folder_files(folder)
            commands.append([*train, "--max-steps", "4", "--out", str(folder)])
            if name in ("student.pt", "checkpoint.pt"):
                commands.append(["evaluate", "--model", str(folder / name), "--data", str(tmp_path / "val")])
    assert len(commands) > 60
    outcomes = {"train": [0, 0], "evaluate": [0, 0]}
    for result in kdaug_batch(commands):
        command = result["argv"][0]
        assert result["code"] in (0, 2), (result["argv"], result["stderr"][-3000:])
        outcomes[command][result["code"] == 2] += 1
        if command == "train":
            folder = Path(result["argv"][-1])
            damaged = folder.name.split("-")[0]
            if result["code"] == 2:
                line = one_error_line(result, "train")
                assert str(folder / damaged) in line or f"{folder} ({damaged})" in line, line
                assert "--restart" in line, line
                assert folder_files(folder) == expected_state[str(folder)]  # nothing lost or changed
            else:
                log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
                assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
                assert (folder / "student.pt").is_file()
        else:
            model = result["argv"][2]
            if result["code"] == 2:
                assert model in one_error_line(result, "evaluate")
            else:
                assert "energy MAE" in result["stdout"]
    assert all(failed for _, failed in outcomes.values()) and outcomes["train"][0], outcomes


def test_damaged_study_folders_end_in_success_or_one_line(tmp_path):
    frames = emt_frames(8)
    for name, part in (("dft", frames[:6]), ("val", frames[6:])):
        with LmdbWriter(tmp_path / name) as writer:
            writer.write_batch(part)
    budget = {"max_steps": 2, "batch_size": 2, "energy_reference": "none"}
    study = tmp_path / "study.yml"
    study.write_text(yaml.safe_dump({
        "name": "fuzz", "out": str(tmp_path / "out"), "strategies": [], "cka": {"enabled": False},
        "checkpoint_every": 1, "teacher": {"model": "painn-tiny", "train": dict(budget)},
        "student": {"model": "painn-tiny", "train": dict(budget)},
        "data": {"train": [str(tmp_path / "dft")], "val": [str(tmp_path / "val")]}}))
    assert kdaug_batch([["study", str(study)]])[0]["code"] == 0
    good = tmp_path / "out"
    rng = np.random.default_rng(7)
    commands = []
    run = Path("runs") / "student" / "seed0"
    for relative in (run / "result.json", run / "checkpoint.pt", run / "config.json", run / "log.jsonl",
                     Path("teacher") / "result.json", Path("teacher") / "student.pt"):
        for damage, payload in list(damaged_copies(relative.name, (good / relative).read_bytes(), rng).items())[::3]:
            out = tmp_path / "corpus" / f"{relative.parent.name}-{relative.name}-{damage}"
            shutil.copytree(good, out)
            (out / relative).write_bytes(payload)
            if relative.name != "result.json":
                os.remove(out / relative.parent / "result.json")  # the run is redone, reading what was damaged
            commands.append(["study", str(study), "--out", str(out)])
    outcomes = [0, 0]
    for result in kdaug_batch(commands):
        assert result["code"] in (0, 2), (result["argv"], result["stderr"][-3000:])
        outcomes[result["code"] == 2] += 1
        if result["code"] == 2:
            line = one_error_line(result, "study")
            assert str(Path(result["argv"][-1])) in line, line
        else:
            assert (Path(result["argv"][-1]) / "results.md").is_file()
    assert all(outcomes), outcomes
