"""The training half as hard to break as generation (issue #25): run folders, checkpoints, inputs and disk.

Each case ends in success or one line with exit 2 naming the file, flag or YAML key, and loses nothing
committed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kdaug.data.lmdb import LmdbWriter
from kdaug.data.output_lock import OutputLock
from kdaug.models import load_model
from tests.conftest import emt_frames, mounted_tmpfs
from tests.test_cli_data import kdaug

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("run-folder-data")
    frames = emt_frames(11)
    paths = {}
    for name, subset in {"dft": frames[:6], "other": frames[3:9], "val": frames[9:]}.items():
        with LmdbWriter(root / name) as writer:
            writer.write_batch(subset)
        paths[name] = root / name
    torch.manual_seed(1)
    load_model("painn-tiny").save(root / "teacher.pt")
    torch.manual_seed(2)
    load_model("painn-tiny").save(root / "teacher2.pt")
    paths["teacher"], paths["teacher2"] = root / "teacher.pt", root / "teacher2.pt"
    return paths


def train_args(data, out, *extra: str, steps: int = 4) -> list[str]:
    return ["train", "--student", "painn-tiny", "--train", str(data["dft"]), "--batch-size", "2", "--max-steps",
            str(steps), "--checkpoint-every", "2", "--energy-reference", "none", "--out", str(out), *extra]


def one_line(result, *expected: str) -> str:
    """Exit 2, no traceback, one error line (progress bars aside) holding every `expected` text."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("kdaug ")]
    assert len(lines) == 1 and lines[0].startswith(f"kdaug {result.args[0]}: error: "), result.stderr[-2000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def records(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def assert_same_curve(out, reference) -> None:
    ours, theirs = ([r for r in records(o) if "loss" in r] for o in (out, reference))
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in theirs], rel=1e-6)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """An uninterrupted 4-step run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert kdaug(*train_args(data, out)).returncode == 0
    return out


def half_run(data, out) -> None:
    """A run stopped after its step-2 checkpoint (the state a kill leaves, log included)."""
    assert kdaug(*train_args(data, out, steps=2)).returncode == 0
    (out / "student.pt").unlink()


# -- damaged run state -------------------------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _drop_optimizer(path: Path) -> None:
    state = torch.load(path, weights_only=False)
    del state["optimizer"]
    torch.save(state, path)


DAMAGE = {"truncated": _truncate, "random": lambda p: p.write_bytes(os.urandom(4096)),
          "empty": lambda p: p.write_bytes(b""), "no-optimizer": _drop_optimizer}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_checkpoint_is_one_line_and_restart_starts_over(data, reference, tmp_path, damage):
    out = tmp_path / "run"
    half_run(data, out)
    DAMAGE[damage](out / "checkpoint.pt")
    one_line(kdaug(*train_args(data, out)), f"{out / 'checkpoint.pt'}: damaged", "--restart", f"move {out} away")
    assert kdaug(*train_args(data, out), "--restart").returncode == 0
    assert_same_curve(out, reference)


@pytest.mark.parametrize("name", ["config.json", "log.jsonl"])
def test_damaged_config_or_log_is_one_line(data, tmp_path, name):
    out = tmp_path / "run"
    half_run(data, out)
    path = out / name
    path.write_bytes(b"\xff\xfe garbage\n" + path.read_bytes()[:-20] if name == "log.jsonl"
                     else path.read_bytes()[:40])
    one_line(kdaug(*train_args(data, out)), f"{path}: damaged", "--restart")


def test_a_half_written_last_log_line_is_dropped(data, reference, tmp_path):
    out = tmp_path / "run"
    half_run(data, out)
    with open(out / "log.jsonl", "a") as handle:
        handle.write('{"step": 3, "lo')
    assert kdaug(*train_args(data, out)).returncode == 0
    assert_same_curve(out, reference)


def test_config_json_deleted_then_other_seed_and_lr_is_refused(data, tmp_path):
    out = tmp_path / "run"
    half_run(data, out)
    (out / "config.json").unlink()
    line = one_line(kdaug(*train_args(data, out, "--seed", "3", "--lr", "0.01")), "(checkpoint.pt)")
    assert "lr 0.0005 -> 0.01" in line and "seed 0 -> 3" in line


# -- what a resume reads -------------------------------------------------------------------
def test_replaced_training_data_is_refused_on_resume(data, tmp_path):
    train = tmp_path / "train"
    shutil.copytree(data["dft"], train)
    out = tmp_path / "run"
    args = train_args(data, out, steps=2)
    args[args.index(str(data["dft"]))] = str(train)
    assert kdaug(*args).returncode == 0
    shutil.rmtree(train)
    with LmdbWriter(train) as writer:  # other frames, another length
        writer.write_batch(emt_frames(9)[4:])
    one_line(kdaug(*args), "train_fingerprints", "->")
    shutil.rmtree(train)
    relabelled = [f.replace(energy=f.energy + 1.0) for f in emt_frames(6)]  # same structures and length
    with LmdbWriter(train) as writer:
        writer.write_batch(relabelled)
    one_line(kdaug(*args), "train_fingerprints")


def test_replaced_teacher_checkpoint_is_refused_on_resume(data, tmp_path):
    teacher = tmp_path / "teacher.pt"
    shutil.copy(data["teacher"], teacher)
    out = tmp_path / "run"
    args = train_args(data, out, "--kd", "vanilla1", "--teacher", "painn-tiny", "--teacher-checkpoint", str(teacher),
                      "--kd-lambda", "1")
    assert kdaug(*args).returncode == 0
    shutil.copy(data["teacher2"], teacher)
    one_line(kdaug(*args), "teacher_checkpoint_sha256")


# -- one writer ------------------------------------------------------------------------------
def test_a_second_run_on_the_same_folder_names_the_holder(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from kdaug.data.output_lock import OutputLock
        lock = OutputLock(Path({str(out)!r}), "run")
        print("locked", flush=True)
        time.sleep(60)
        """)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        one_line(kdaug(*train_args(data, out)), "being written by another run", f"pid {holder.pid}")
        assert sorted(p.name for p in out.iterdir()) == [".run.lock"]
    finally:
        holder.kill()
        holder.wait()
    assert kdaug(*train_args(data, out)).returncode == 0  # a killed holder releases the folder
    OutputLock(out, "run").release()


# -- inputs, before anything is written ----------------------------------------------------------
@pytest.mark.parametrize(("flags", "expected"), [
    (["--train", ""], "--train '': empty path"),
    (["--val", ""], "--val '': empty path"),
    (["--synthetic", ""], "--synthetic '': empty path"),
    (["--num-workers", "-1"], "--num-workers -1"),
    (["--val", "/nonexistent/val"], "--val /nonexistent/val"),
    (["--val", "{empty}"], "--val {empty}"),
    (["--val", "{truncated}"], "--val {truncated}"),
    (["--train", "{dft}", "{dft}"], "given twice"),
    (["--synthetic", "{dft}"], "given twice (also as --train)"),
    (["--teacher-checkpoint", ""], "--teacher-checkpoint '': empty path"),
])
def test_bad_inputs_are_one_line_naming_the_flag_and_write_nothing(data, tmp_path, flags, expected):
    (tmp_path / "empty").mkdir()
    truncated = tmp_path / "truncated.lmdb"
    whole = (data["val"] / "data.0000.lmdb").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 3])
    names = {"empty": tmp_path / "empty", "truncated": truncated, "dft": data["dft"]}
    flags = [f.format(**names) for f in flags]
    expected = expected.format(**names)
    out = tmp_path / "run"
    args = train_args(data, out)
    if flags[0] == "--train":
        args[args.index("--train") + 1: args.index("--train") + 2] = flags[1:]
        flags = []
    one_line(kdaug(*args, *flags), expected)
    assert not out.exists()


@pytest.mark.parametrize("where", ["equal", "inside"])
def test_out_equal_to_or_inside_the_training_data_is_refused(data, tmp_path, where):
    train = tmp_path / "train"
    shutil.copytree(data["dft"], train)
    out = train if where == "equal" else train / "run"
    args = train_args(data, out)
    args[args.index(str(data["dft"]))] = str(train)
    before = sorted(train.iterdir())
    one_line(kdaug(*args), f"--out {out}: must not be (inside) the input --train {train}")
    assert sorted(train.iterdir()) == before


def test_out_an_existing_file_is_one_line(data, tmp_path):
    (tmp_path / "file").write_text("x")
    one_line(kdaug(*train_args(data, tmp_path / "file")), "is an existing file")


# -- disks ---------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 500 KiB tmpfs (needs root): one checkpoint of painn-tiny (270 KiB) fits, its replacement beside it not."""
    yield from mounted_tmpfs(tmp_path / "small", "500k")


def test_full_disk_at_a_checkpoint_is_one_line_keeps_the_last_one_and_resumes_exactly(data, reference, small_disk):
    out = small_disk / "run"
    one_line(kdaug(*train_args(data, out)), f"no space left on device writing {out / 'checkpoint.pt'}")
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 2
    assert not list(out.glob("*.tmp"))
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    assert kdaug(*train_args(data, out)).returncode == 0
    assert_same_curve(out, reference)


def test_read_only_out_is_one_line(data, small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    one_line(kdaug(*train_args(data, small_disk)), f"--out {small_disk}: cannot write there")
    one_line(kdaug(*train_args(data, small_disk / "run")), f"--out {small_disk / 'run'}: cannot write there")


# -- kill -9 while student.pt is exported ----------------------------------------------------------
def test_kill_during_export_then_rerun_logs_what_an_uninterrupted_run_logs(data, reference, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killer = textwrap.dedent(f"""
        import os, signal, sys
        import kdaug.train.loop as loop
        def export_and_die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        loop.export_student = export_and_die
        from kdaug.cli.main import main
        sys.exit(main({train_args(data, out, "--val", str(data["val"]))!r}))
        """)
    killed = subprocess.run([sys.executable, "-c", killer], env=env, capture_output=True, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "student.pt").exists()
    assert kdaug(*train_args(data, out, "--val", str(data["val"]))).returncode == 0
    uninterrupted = tmp_path / "uninterrupted"
    assert kdaug(*train_args(data, uninterrupted, "--val", str(data["val"]))).returncode == 0
    assert [sorted(r) for r in records(out)] == [sorted(r) for r in records(uninterrupted)]
    assert_same_curve(out, uninterrupted)


# -- the other commands ---------------------------------------------------------------------------
def test_evaluate_with_an_empty_data_path_is_one_line(reference):
    one_line(kdaug("evaluate", "--model", str(reference / "student.pt"), "--data", ""), "--data '': empty path")


def test_cka_out_an_existing_file_or_a_read_only_folder_is_one_line(data, reference, small_disk):
    args = ["cka", "--teacher", str(data["teacher"]), "--student", str(reference / "student.pt"), "--data",
            str(data["val"])]
    (small_disk / "file").write_text("x")
    one_line(kdaug(*args, "--out", str(small_disk / "file")), "is an existing file")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    one_line(kdaug(*args, "--out", str(small_disk)), f"--out {small_disk}: cannot write there")


def test_teacher_cache_inputs_are_checked_before_the_teacher_loads(data, tmp_path):
    base = ["teacher-cache", "--teacher", "painn-tiny", "--checkpoint", str(data["teacher"]), "--kd", "vanilla1"]
    one_line(kdaug(*base, "--data", "", "--out", str(tmp_path / "c")), "--data '': empty path")
    one_line(kdaug(*base, "--data", str(data["dft"]), str(data["dft"]), "--out", str(tmp_path / "c")),
             "given twice")
    one_line(kdaug(*base, "--data", str(data["dft"]), "--out", str(data["dft"])), "must not be (inside)")
    (tmp_path / "file").write_text("x")
    one_line(kdaug(*base, "--data", str(data["dft"]), "--out", str(tmp_path / "file")), "is an existing file")
    assert not (tmp_path / "c").exists()


# -- study -------------------------------------------------------------------------------------------
def _study(tmp_path, data, **changes) -> Path:
    import yaml

    budget = {"max_steps": 2, "batch_size": 2, "energy_reference": "none"}
    config = {"name": "s", "out": str(tmp_path / "study"), "strategies": [], "cka": {"enabled": False},
              "teacher": {"model": "painn-tiny", "train": dict(budget)},
              "student": {"model": "painn-tiny", "train": dict(budget)},
              "data": {"train": [str(data["dft"])], "val": [str(data["val"])]}}
    for key, value in changes.items():
        section = config
        *parents, last = key.split(".")
        for part in parents:
            section = section[part]
        section[last] = value
    path = tmp_path / "study.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("student.train.max_steps", -3, "study.yml: student.train.max_steps: expected a positive number of steps, "
                                    "got -3"),
    ("data.val", [""], "data.val '': empty path"),
    ("data.train", ["{dft}", "{dft}"], "data.train {dft}: given twice"),
    ("out", "{dft}", "out {dft}: must not be (inside) the input data.train {dft}"),
])
def test_bad_study_inputs_are_one_line_before_the_teacher_trains(data, tmp_path, key, value, expected):
    def fill(v):
        return [fill(x) for x in v] if isinstance(v, list) else v.format(dft=data["dft"]) if isinstance(v, str) else v

    study = _study(tmp_path, data, **{key: fill(value)})
    one_line(kdaug("study", str(study)), fill(expected))
    assert not (tmp_path / "study").exists()
