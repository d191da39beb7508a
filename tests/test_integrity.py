"""Data integrity: one writer per output, resume only what is compatible, damage and full disks in one line.

Commands that could die by a signal on damaged files (SIGBUS) run in a child process (`tests.kdaug_batch`),
so a regression fails the test instead of killing pytest.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lmdb
import pytest
import torch
from ase.build import bulk

from kdaug.cli.main import main
from kdaug.data.convert import frame_to_data
from kdaug.data.lmdb import FrameDataset, LmdbWriter
from kdaug.errors import KdaugError
from kdaug.generate import GenerateConfig, run_generate
from tests.conftest import emt_frames, mounted_tmpfs

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


# -- helpers -----------------------------------------------------------------------
def kdaug(*args: str) -> subprocess.CompletedProcess:
    """The CLI in this process, for cases that cannot end in a signal."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(list(args))
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def kdaug_batch(commands: list[list[str]], timeout: float = 300) -> list[dict]:
    """Run commands in one child process; fails naming the command that killed it, if one did."""
    feed = "".join(json.dumps(c) + "\n" for c in commands)
    child = subprocess.run([sys.executable, "-m", "tests.kdaug_batch"], input=feed, capture_output=True, text=True,
                           env=ENV, cwd=ROOT, timeout=timeout, check=False)
    results = [json.loads(line) for line in child.stdout.splitlines()]
    if child.returncode != 0:
        culprit = commands[len(results)] if len(results) < len(commands) else None
        pytest.fail(f"child died with {child.returncode} running {culprit}: {child.stderr[-2000:]}")
    return results


def one_error_line(result, command: str) -> str:
    """Assert exit 2 with exactly one error line and no traceback; return the line."""
    code = result["code"] if isinstance(result, dict) else result.returncode
    stderr = result["stderr"] if isinstance(result, dict) else result.stderr
    assert code == 2, (code, stderr[-3000:])
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("kdaug ")]
    assert len(lines) == 1 and lines[0].startswith(f"kdaug {command}: error: "), stderr
    return lines[0]


def write_dataset(path: Path, frames, **kwargs) -> Path:
    with LmdbWriter(path, **kwargs) as writer:
        writer.write_batch(frames)
    return path


def n_frames(path: Path) -> int:
    dataset = FrameDataset(path)
    count = len(dataset)
    assert len(list(dataset.iter_frames())) == count  # every entry decodes
    dataset.close()
    return count


def put_entry(file: Path, key: str, value: bytes) -> None:
    env = lmdb.open(str(file), subdir=False, map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(key.encode(), value)
    env.close()


@pytest.fixture(scope="module")
def bulk_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("bulks") / "bulks.pkl"
    path.write_bytes(pickle.dumps([{"atoms": bulk("Cu", "fcc", a=3.61), "src_id": "test-Cu"}]))
    return path


def generate_config(bulk_db, out, **changes) -> GenerateConfig:
    options = dict(n_systems=2, out=str(out), teacher="emt", bulk_db=str(bulk_db), adsorbate_ids=(0, 1),
                   max_miller=1, optimizer="fire", max_steps=4, frame_fraction=0.5, num_workers=0, seed=3)
    return GenerateConfig(**{**options, **changes})


def generate_args(bulk_db, out, *extra: str) -> list[str]:
    return ["generate", "--n-systems", "2", "--out", str(out), "--teacher", "emt", "--bulk-db", str(bulk_db),
            "--adsorbate-ids", "0", "1", "--max-miller", "1", "--optimizer", "fire", "--max-steps", "4",
            "--num-workers", "0", *extra]


# -- 1. one writer per output --------------------------------------------------------
HOLDER = textwrap.dedent(
    """
    import sys, time
    from kdaug.data.lmdb import LmdbWriter
    from tests.conftest import emt_frames
    writer = LmdbWriter(sys.argv[1])
    writer.write_batch(emt_frames(2), done=["unit-0"])
    print("holding", flush=True)
    time.sleep(120)
    """
)


def test_second_writer_stops_naming_the_holder_and_a_killed_holder_releases(tmp_path, bulk_db):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=ENV,
                              cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(KdaugError, match=rf"being written by another run \(pid {holder.pid} on "
                                             rf"{socket.gethostname()}: python\S* -c "):
            LmdbWriter(out)
        # The case: a second generate on the same output stops before writing anything.
        line = one_error_line(kdaug(*generate_args(bulk_db, out)), "generate")
        assert f"pid {holder.pid}" in line
        assert n_frames(out) == 2
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with LmdbWriter(out) as writer:  # the kernel dropped the dead holder's flock
        assert writer.done_keys() == {"unit-0"}
        writer.write_batch(emt_frames(1))
    assert n_frames(out) == 3


def test_writers_in_one_process_exclude_each_other(tmp_path):
    first = LmdbWriter(tmp_path)
    with pytest.raises(KdaugError, match=rf"pid {os.getpid()} "):
        LmdbWriter(tmp_path)
    first.close()
    LmdbWriter(tmp_path).close()


def test_shards_of_one_dataset_write_side_by_side(tmp_path):
    frames = emt_frames(6)
    writers = [LmdbWriter(tmp_path, stem=f"shard{i:04d}-of-0002") for i in range(2)]
    for step in range(3):
        for index, writer in enumerate(writers):
            writer.write_batch([frames[2 * step + index]], done=[str(2 * step + index)])
    for writer in writers:
        writer.close()
    dataset = FrameDataset(tmp_path)
    assert sorted(f.sid for f in dataset.iter_frames()) == sorted(f.sid for f in frames)
    dataset.close()


# -- 2. resume only what is compatible ------------------------------------------------
def test_generate_resume_refuses_other_data_options_and_allows_the_rest(tmp_path, bulk_db):
    out = tmp_path / "out"
    run_generate(generate_config(bulk_db, out), progress=False)
    before = n_frames(out)
    for changes, names in [
        ({"seed": 4}, ["seed 3 -> 4"]),
        ({"teacher": "ase:ase.calculators.lj:LennardJones"}, ["teacher 'emt' -> 'ase:ase.calculators.lj:"]),
        ({"frame_fraction": 1.0, "max_steps": 9}, ["frame_fraction 0.5 -> 1.0", "max_steps 4 -> 9"]),
        ({"num_shards": 2, "shard_index": 1}, ["num_shards 1 -> 2"]),
    ]:
        with pytest.raises(KdaugError, match="started with other data options") as raised:
            run_generate(generate_config(bulk_db, out, n_systems=3, **changes), progress=False)
        message = str(raised.value)
        assert "\n" not in message and all(name in message for name in names), message
        assert n_frames(out) == before
    # Workers, batch sizes and the number of systems may change: the run resumes and adds system 2.
    summary = run_generate(generate_config(bulk_db, out, n_systems=3, max_systems_per_batch=2), progress=False)
    assert summary["systems"] == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data_options"]["seed"] == 3 and len(manifest["data_options"]["bulk_db_sha256"]) == 64


def test_rattle_resume_refuses_other_options_and_other_inputs(tmp_path):
    source = write_dataset(tmp_path / "in", emt_frames(4))
    out = tmp_path / "out"
    base = ["rattle", "--input", str(source), "--out", str(out), "--teacher", "emt", "--seed", "1"]
    assert kdaug(*base, "--fraction", "0.5", "--sigma", "0.05").returncode == 0
    before = n_frames(out)
    line = one_error_line(kdaug(*base, "--fraction", "1", "--sigma", "0.5", "--copies", "3"), "rattle")
    for name in ("copies 1 -> 3", "fraction 0.5 -> 1.0", "sigma 0.05 -> 0.5"):
        assert name in line
    other = write_dataset(tmp_path / "other", emt_frames(5))
    line = one_error_line(kdaug("rattle", "--input", str(other), "--out", str(out), "--teacher", "emt",
                                "--seed", "1", "--fraction", "0.5", "--sigma", "0.05"), "rattle")
    assert "input_fingerprint" in line
    assert n_frames(out) == before
    assert kdaug(*base, "--fraction", "0.5", "--sigma", "0.05", "--batch-size", "1").returncode == 0  # may change


def test_adversarial_resume_refuses_another_student_or_attack(tmp_path):
    from kdaug.models import load_model
    from kdaug.perturb.adversarial import AdversarialConfig, run_adversarial

    for seed, name in enumerate(("student", "teacher", "other")):
        torch.manual_seed(seed)
        load_model("painn-tiny").save(tmp_path / f"{name}.pt")
    source = write_dataset(tmp_path / "in", emt_frames(4))

    def config(**changes) -> AdversarialConfig:
        options = dict(input=str(source), out=str(tmp_path / "adv"), student=str(tmp_path / "student.pt"),
                       teacher="painn-tiny", checkpoint=str(tmp_path / "teacher.pt"), steps=1, fraction=0.5)
        return AdversarialConfig(**{**options, **changes})

    run_adversarial(config(), progress=False)
    before = n_frames(tmp_path / "adv")
    for changes, name in [({"student": str(tmp_path / "other.pt")}, "student_sha256"), ({"alpha": 0.02}, "alpha"),
                          ({"checkpoint": str(tmp_path / "other.pt")}, "teacher_sha256")]:
        with pytest.raises(KdaugError, match=f"started with other data options .*{name}"):
            run_adversarial(config(fraction=1.0, **changes), progress=False)
    assert n_frames(tmp_path / "adv") == before
    assert run_adversarial(config(batch_size=1), progress=False)["inputs"] == 0  # batch size may change


# -- 3. damaged files ------------------------------------------------------------------
def test_truncated_lmdb_is_one_line_for_every_command(tmp_path, bulk_db):
    source = write_dataset(tmp_path / "in", emt_frames(6) * 2)
    file = source / "data.0000.lmdb"
    file.write_bytes(file.read_bytes()[: file.stat().st_size - 3 * 4096])  # like `head -c`
    damaged_out = write_dataset(tmp_path / "gen", emt_frames(6))
    generated = damaged_out / "data.0000.lmdb"
    generated.write_bytes(generated.read_bytes()[:10000])
    results = kdaug_batch([
        ["inspect", str(source), "--json"],
        ["export", str(source), str(tmp_path / "x.extxyz")],
        ["rattle", "--input", str(source), "--out", str(tmp_path / "rattled"), "--teacher", "emt"],
        generate_args(bulk_db, damaged_out),
    ])
    for result, target in zip(results, [file, file, file, generated]):
        line = one_error_line(result, result["argv"][0])
        assert f"{target}: truncated or damaged LMDB file" in line
    assert not (tmp_path / "rattled").exists() and not list(tmp_path.glob("x.extxyz*"))


def _without_cell(data):
    del data.cell
    return data


def _short_forces(data):
    data.force = data.force[:-1]
    return data


DAMAGES = {
    "not-a-frame": (lambda data: {"not": "a frame"}, "entry 2 is not a structure frame (value is a dict)"),
    "no-cell": (_without_cell, "entry 2 is not a structure frame (missing field cell"),
    "forces-shape": (_short_forces,
                     "entry 2 is not a structure frame (field force has shape (12, 3), expected (13, 3))"),
}


def test_bad_later_entry_is_one_line_naming_file_key_and_field(tmp_path):
    frames = emt_frames(4)
    commands, expected = [], []
    for name, (damage, message) in DAMAGES.items():
        source = write_dataset(tmp_path / name, frames)
        file = source / "data.0000.lmdb"
        put_entry(file, "2", pickle.dumps(damage(frame_to_data(frames[2]))))
        commands += [["inspect", str(source), "--json"],
                     ["export", str(source), str(tmp_path / f"{name}.extxyz")],
                     ["rattle", "--input", str(source), "--out", str(tmp_path / f"{name}-rattled"), "--teacher", "emt"]]
        expected += [f"{file}: {message}"] * 3
    for result, message in zip(kdaug_batch(commands), expected):
        assert message in one_error_line(result, result["argv"][0])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(DAMAGES)  # no output, no temporary file


@pytest.mark.parametrize(
    ("name", "value", "field"),
    [
        ("pos", torch.zeros(13, 2), "field pos has shape (13, 2), expected (13, 3)"),
        ("pos", torch.zeros(13, 3, dtype=torch.long), "field pos has dtype torch.int64"),
        ("cell", torch.eye(3) * 0.1, "field cell has a lattice height below"),
        ("force", torch.full((13, 3), float("inf")), "field force holds non-finite values"),
        ("atomic_numbers", torch.full((13,), 200), "field atomic_numbers must be"),
        ("tags", torch.zeros(12), "field tags has shape (12,), expected (13,)"),
        ("natoms", 14, "field natoms is 14, expected 13"),
        ("origin", 3, "field origin is a int, expected a string"),
        ("y", torch.zeros(2), "field y has shape (2,), expected ()"),
    ],
)
def test_entry_validation_names_the_field(name, value, field):
    from kdaug.data.entries import decode_entry

    data = frame_to_data(emt_frames(1)[0])
    data[name] = value
    with pytest.raises(KdaugError, match=r"^x.lmdb: entry 7 is not a structure frame \(") as raised:
        decode_entry(Path("x.lmdb"), "7", pickle.dumps(data))
    assert field in str(raised.value)


def test_rattle_with_elements_the_teacher_lacks_creates_no_output(tmp_path):
    frames = emt_frames(3)
    iron = frames[2].replace(atomic_numbers=frames[2].atomic_numbers * 0 + 26)
    source = write_dataset(tmp_path / "in", [*frames[:2], iron])
    out = tmp_path / "rattled"
    line = one_error_line(kdaug("rattle", "--input", str(source), "--out", str(out), "--teacher", "emt"), "rattle")
    assert f"--input {source}" in line and "does not support element(s) Fe" in line
    assert not out.exists()


# -- 4. full disks ---------------------------------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path):
    """A 192 KiB tmpfs (needs root); skipped where it cannot be mounted (the simulated tests still run)."""
    yield from mounted_tmpfs(tmp_path / "tiny", "192k")


def test_full_disk_is_one_line_keeps_committed_frames_and_resumes(tmp_path, tiny_disk):
    source = write_dataset(tmp_path / "in", emt_frames(6))
    out = tiny_disk / "rattled"
    rattle = ["rattle", "--input", str(source), "--out", str(out), "--teacher", "emt", "--copies", "12",
              "--batch-size", "1"]
    export = ["export", str(source), str(tiny_disk / "frames.extxyz")]
    first, exported = kdaug_batch([rattle, export])
    assert f"no space left on device writing {out}" in one_error_line(first, "rattle")
    assert f"no space left on device writing {tiny_disk / 'frames.extxyz'}" in one_error_line(exported, "export")
    committed = n_frames(out)
    assert 0 < committed < 72
    assert not [p for p in tiny_disk.rglob("*") if p.name.endswith(".tmp")]
    subprocess.run(["mount", "-o", "remount,size=4m", str(tiny_disk)], check=True)
    assert kdaug(*rattle).returncode == 0
    reference = tmp_path / "reference"
    assert kdaug(*rattle[:4], str(reference), *rattle[5:]).returncode == 0
    ours, theirs = FrameDataset(out), FrameDataset(reference)
    assert sorted((f.sid, f.fid, f.energy) for f in ours.iter_frames()) == sorted(
        (f.sid, f.fid, f.energy) for f in theirs.iter_frames())


def test_export_disk_full_simulated_leaves_no_temporary_file(tmp_path, monkeypatch):
    import ase.io

    source = write_dataset(tmp_path / "in", emt_frames(2))
    out = tmp_path / "frames.extxyz"

    def full_disk(path, images, format):  # noqa: A002 -- ase's keyword
        Path(path).write_text("partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(ase.io, "write", full_disk)
    line = one_error_line(kdaug("export", str(source), str(out)), "export")
    assert line.endswith(f"no space left on device writing {out}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_writer_disk_full_simulated_is_one_line(tmp_path, monkeypatch):
    import shutil

    writer = LmdbWriter(tmp_path)

    class FailingEnv:
        def begin(self, write=False):
            raise lmdb.Error("mdb_txn_commit: Input/output error")

        def close(self):
            pass

    real_env, writer._env = writer._env, FailingEnv()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: type("Usage", (), {"free": 0})())
    with pytest.raises(KdaugError, match=rf"^no space left on device writing {tmp_path}/data.0000.lmdb$"):
        writer.write_batch(emt_frames(1))
    writer._env = real_env
    writer.close()


# -- 5. interrupts and the remaining one-liners -------------------------------------------
def test_ctrl_c_is_one_line_exit_130_and_resumable(tmp_path, bulk_db):
    """Ctrl-C in a terminal signals the whole process group: the sampling worker must stay quiet too."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "kdaug", *generate_args(bulk_db, out, "--frame-fraction", "1")]
    args[args.index("--n-systems") + 1] = "40"
    args[args.index("--num-workers") + 1] = "1"
    # A shell's background job inherits SIGINT ignored, and Python then keeps ignoring it: restore the default.
    process = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    manifest = out / "manifest.json"
    while time.time() < deadline and not (manifest.exists() and json.loads(manifest.read_text())["n_frames"]):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "kdaug generate: interrupted; rerun the same command to resume"
    assert n_frames(out) > 0
    with LmdbWriter(out) as writer:  # lock released, output whole
        assert len(writer.done_keys()) >= 1


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (lambda tmp, src: ["rattle", "--input", str(src), "--out", str(tmp / "o"), "--teacher", "emt",
                           "--device", "tpu"], "--device tpu: expected cpu, cuda or cuda:N"),
        (lambda tmp, src: ["export", str(src), str(tmp)], "is a directory; expected a file name"),
        (lambda tmp, src: ["export", str(src), str(tmp / "missing" / "f.extxyz")], "missing does not exist"),
    ],
    ids=["device-tpu", "export-to-directory", "export-into-missing-directory"],
)
def test_remaining_cases_are_one_line(tmp_path, args, expected):
    source = write_dataset(tmp_path / "in", emt_frames(2))
    argv = args(tmp_path, source)
    assert expected in one_error_line(kdaug(*argv), argv[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
