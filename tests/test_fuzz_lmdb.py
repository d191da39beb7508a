"""Fuzz: `inspect`, `export` and `rattle` on a corpus of damaged LMDBs (truncations at many offsets, flipped
bytes, wrong pickles, shape mismatches). Every run ends in success or one error line with exit 2, never a
traceback or a signal, and no committed frame is lost: inputs stay as they were, a previous export survives
a failed one, and a failed rattle leaves no output. The commands run in one child process
(`tests.kdaug_batch`), so a SIGBUS fails the test instead of killing pytest.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import ase.io
import lmdb
import numpy as np
import torch

from kdaug.data.convert import frame_to_data
from kdaug.data.lmdb import FrameDataset, LmdbWriter
from tests.conftest import emt_frames
from tests.test_integrity import kdaug_batch, one_error_line

PAGE = 4096
SENTINEL = "previous export\n"


def _replace(source: bytes, target: Path, key: bytes, value: bytes) -> None:
    target.write_bytes(source)
    env = lmdb.open(str(target), subdir=False, map_size=1 << 26, lock=False)
    with env.begin(write=True) as txn:
        txn.put(key, value)
    env.close()


def _entry(frame, **changes) -> bytes:
    data = frame_to_data(frame)
    for name, value in changes.items():
        if value is None:
            del data[name]
        else:
            data[name] = value
    return pickle.dumps(data)


def build_corpus(base: Path, root: Path, frames) -> list[Path]:
    """Damaged copies of the single-file dataset `base`, one file each."""
    source = base.read_bytes()
    size = len(source)
    corpus: list[Path] = []

    def add(name: str, payload: bytes) -> None:
        corpus.append(root / f"{name}.lmdb")
        corpus[-1].write_bytes(payload)

    for cut in sorted({1, 100, PAGE - 1, PAGE + 200, 2 * PAGE, 2 * PAGE + 1, *range(3 * PAGE, size, size // 8),
                       size - PAGE, size - 1}):
        add(f"truncated-{cut}", source[:cut])
    rng = np.random.default_rng(12)
    meta_fields = [16, 20, 32, 40, 44, 48, 88, 92, 96, 136, 144]  # magic, version, mapsize, dbs, last page, txnid
    header_fields = [page * PAGE + field for page in range(2, size // PAGE) for field in (0, 10, 12, 14)]
    offsets = sorted({*meta_fields, *(PAGE + f for f in meta_fields), *header_fields[::3],
                      *rng.integers(2 * PAGE, size, 40).tolist()})
    for offset in offsets:
        flipped = bytearray(source)
        flipped[offset] ^= 0xFF
        add(f"flipped-{offset}", bytes(flipped))
    frame = frames[1]
    n_atoms = frame.n_atoms
    for name, key, value in [
        ("garbage-pickle", b"1", b"\x80\x05garbage"),
        ("int-pickle", b"1", pickle.dumps(42)),
        ("labels-missing", b"1", _entry(frame, y=None, force=None)),
        ("length-garbage", b"length", b"junk"),
        ("length-negative", b"length", pickle.dumps(-1)),
        ("length-too-long", b"length", pickle.dumps(len(frames) + 3)),
        ("pos-shape", b"1", _entry(frame, pos=torch.zeros(n_atoms, 2))),
        ("cell-shape", b"1", _entry(frame, cell=torch.zeros(2, 3))),
        ("tags-shape", b"1", _entry(frame, tags=torch.zeros(n_atoms + 1, dtype=torch.int))),
        ("atomic-number-zero", b"1", _entry(frame, atomic_numbers=torch.zeros(n_atoms, dtype=torch.uint8))),
        ("forces-nan", b"1", _entry(frame, force=torch.full((n_atoms, 3), float("nan")))),
        ("energy-vector", b"1", _entry(frame, y=torch.zeros(2))),
        ("natoms-wrong", b"1", _entry(frame, natoms=n_atoms + 1)),
        ("details-not-json", b"1", _entry(frame, details="{not json")),
        ("parent-not-a-tensor", b"1", _entry(frame, parent="(1, 2)")),
        ("cell-flat", b"1", _entry(frame, cell=torch.zeros(1, 3, 3).index_fill_(1, torch.tensor([0]), 1.0))),
        ("requires-grad", b"1", _entry(frame, force=frame_to_data(frame).force.requires_grad_())),
    ]:
        corpus.append(root / f"{name}.lmdb")
        _replace(source, corpus[-1], key, value)
    return corpus


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_damaged_lmdbs_end_in_success_or_one_line(tmp_path):
    frames = emt_frames(5)
    with LmdbWriter(tmp_path / "base") as writer:
        writer.write_batch(frames)
    (tmp_path / "corpus").mkdir()
    corpus = build_corpus(tmp_path / "base" / "data.0000.lmdb", tmp_path / "corpus", frames)
    assert len(corpus) > 50
    digests = {path: sha(path) for path in corpus}
    commands = []
    for path in corpus:
        export = tmp_path / "exports" / f"{path.stem}.extxyz"
        export.parent.mkdir(exist_ok=True)
        export.write_text(SENTINEL)
        commands += [["inspect", str(path), "--json"],
                     ["export", str(path), str(export)],
                     ["rattle", "--input", str(path), "--out", str(tmp_path / "rattled" / path.stem), "--teacher",
                      "emt", "--batch-size", "2"]]
    outcomes = {"inspect": [0, 0], "export": [0, 0], "rattle": [0, 0]}
    for result in kdaug_batch(commands):
        command, path = result["argv"][0], Path(result["argv"][1 if result["argv"][0] != "rattle" else 2])
        assert result["code"] in (0, 2), (result["argv"], result["stderr"][-3000:])
        outcomes[command][result["code"] == 2] += 1
        if result["code"] == 2:
            line = one_error_line(result, command)
            assert str(path) in line, line
        if command == "inspect" and result["code"] == 0:
            assert json.loads(result["stdout"])["n_samples"] >= 0
        if command == "export":
            export = Path(result["argv"][2])
            if result["code"] == 0:  # an older snapshot (flipped txnid) may hold no frames
                n_written = int(result["stdout"].split()[1])
                assert len(ase.io.read(export, index=":")) == n_written if n_written else not export.read_text()
            else:
                assert export.read_text() == SENTINEL  # the previous export is intact
            assert not export.with_name(export.name + ".tmp").exists()
        if command == "rattle":
            out = Path(result["argv"][4])
            if result["code"] == 0:
                dataset = FrameDataset(out)
                assert len(dataset) == json.loads(result["stdout"])["written"]
                dataset.check_entries()
                dataset.close()
            else:
                assert not out.exists()  # validated before any output was created
    assert all(sha(path) == digest for path, digest in digests.items())  # inputs are never written
    # Both outcomes occur for every command: the corpus holds readable and unreadable damage.
    assert all(ok and failed for ok, failed in outcomes.values()), outcomes
