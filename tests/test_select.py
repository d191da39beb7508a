"""`kdaug select`: disagreement selection (top-k by the stated score) against random subsampling."""

from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import pytest
import torch

from kdaug.cli.main import main
from kdaug.data.lmdb import FrameDataset
from kdaug.errors import KdaugError
from kdaug.models import load_model
from kdaug.select import Disagreement, SelectConfig, disagreement, run_select
from kdaug.state import BatchState
from kdaug.types import Frame


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    path = tmp_path_factory.mktemp("student") / "student.pt"
    torch.manual_seed(0)
    load_model("painn-tiny").save(path)
    return str(path)


def read(path):
    dataset = FrameDataset(path)
    frames = list(dataset.iter_frames())
    dataset.close()
    return frames


def selection(out):
    with np.load(out / "selection.npz") as stored:
        return stored["scores"], stored["kept"]


def test_the_score_by_hand():
    frame = Frame(positions=np.zeros((3, 3)), atomic_numbers=np.array([29, 29, 8]), cell=np.eye(3) * 10,
                  tags=np.array([0, 1, 2]), fixed=np.array([True, False, False]), energy=1.0,
                  forces=np.zeros((3, 3)), sid=0, fid=0)
    forces = np.array([[50.0, 0, 0], [3.0, 4.0, 0], [0, 0, 1.0]])  # the fixed atom's error does not count
    # 1 * |1.3 - 1| / 3 atoms + 100 * mean(|(3, 4, 0)|, |(0, 0, 1)|) = 0.1 + 100 * 3
    assert disagreement(frame, 1.3, forces) == pytest.approx(300.1)


def test_disagreement_keeps_exactly_the_top_k_by_the_score(source, student, tmp_path):
    frames = read(source)
    model = load_model(None, checkpoint=student)
    hand = []
    for frame in frames:  # the student on each frame alone; the score written out with numpy
        out = model(BatchState.from_frames([frame], dtype=model.dtype).to_batch())
        energy, forces = float(out.energy.item()), out.forces.detach().double().numpy()
        free = ~frame.fixed
        force_error = np.sqrt(((forces[free] - frame.forces[free]) ** 2).sum(axis=1)).mean()
        hand.append(1.0 * abs(energy - frame.energy) / frame.n_atoms + 100.0 * force_error)
    hand = np.array(hand)
    order = np.argsort(-hand)
    assert hand[order[2]] - hand[order[3]] > 1e-3 * hand[order[2]]  # the cut is clear of float32 noise
    summary = run_select(SelectConfig(input=str(source), out=str(tmp_path / "sel"), student=student, keep=3,
                                      batch_size=4), progress=False)
    scores, kept = selection(tmp_path / "sel")
    np.testing.assert_allclose(scores, hand, rtol=1e-5)
    np.testing.assert_array_equal(kept, np.sort(order[:3]))
    chosen = read(tmp_path / "sel")
    assert [(f.sid, f.fid) for f in chosen] == [(frames[i].sid, frames[i].fid) for i in kept]
    for frame, index in zip(chosen, kept):  # the kept frames are the input's, labels untouched
        np.testing.assert_allclose(frame.positions, frames[index].positions, atol=1e-6)
        assert frame.energy == pytest.approx(frames[index].energy)
    with np.load(tmp_path / "sel" / "metadata.npz") as metadata:
        np.testing.assert_array_equal(metadata["natoms"], [frames[i].n_atoms for i in kept])
    assert summary["kept"] == summary["written"] == 3 and summary["kept_score_min"] == pytest.approx(hand[order[2]])
    manifest = json.loads((tmp_path / "sel" / "manifest.json").read_text())
    assert manifest["counters"] == {"kept": 3} and manifest["data_options"]["student_sha256"] == model.checkpoint_sha256
    assert manifest["data_options"]["force_weight"] == 100.0


def test_random_keeps_the_count_and_is_deterministic_for_a_seed(source, tmp_path):
    picks = {}
    for seed in range(4):
        for run in ("a", "b"):
            out = tmp_path / f"{seed}{run}"
            run_select(SelectConfig(input=str(source), out=str(out), by="random", keep=0.5, seed=seed),
                       progress=False)
            picks[seed, run] = selection(out)[1].tolist()
            assert len(read(out)) == 3 and len(picks[seed, run]) == 3
        assert picks[seed, "a"] == picks[seed, "b"]
    assert len({tuple(picks[seed, "a"]) for seed in range(4)}) > 1  # another seed, another subset


def test_a_killed_scoring_resumes_to_the_same_selection(source, student, tmp_path, monkeypatch):
    config = SelectConfig(input=str(source), out=str(tmp_path / "sel"), student=student, keep=2, batch_size=2)
    real, calls = Disagreement.scores, []

    def dies_on_the_second_chunk(self, dataset, indices):
        calls.append(list(indices))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, dataset, indices)

    monkeypatch.setattr(Disagreement, "scores", dies_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        run_select(config, progress=False)
    monkeypatch.setattr(Disagreement, "scores", real)
    with open(tmp_path / "sel" / ".scores.f64", "ab") as handle:
        handle.write(b"\x01\x02\x03")  # a torn write
    resumed = run_select(config, progress=False)
    assert resumed["scored"] == 4  # the first chunk's scores were kept
    fresh = run_select(dataclass_replace(config, out=str(tmp_path / "fresh")), progress=False)
    np.testing.assert_allclose(selection(tmp_path / "sel")[0], selection(tmp_path / "fresh")[0])
    np.testing.assert_array_equal(selection(tmp_path / "sel")[1], selection(tmp_path / "fresh")[1])
    assert [f.sid for f in read(tmp_path / "sel")] == [f.sid for f in read(tmp_path / "fresh")]
    again = run_select(config, progress=False)
    assert again["scored"] == again["written"] == 0 and fresh["written"] == 2
    with pytest.raises(KdaugError, match=r"was started with other data options \(data.0000.lmdb\): keep 2 -> 3"):
        run_select(dataclass_replace(config, keep=3), progress=False)


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def cli(*args):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["select", *args])
    return code, stdout.getvalue(), stderr.getvalue().strip().splitlines()


def test_cli_runs_and_bad_input_is_one_line(source, student, tmp_path):
    code, out, _ = cli(str(source), "--student", student, "--keep", "2", "--out", str(tmp_path / "ok"))
    assert code == 0 and json.loads(out)["kept"] == 2 and len(read(tmp_path / "ok")) == 2
    damaged = tmp_path / "damaged.lmdb"
    raw = (source / "data.0000.lmdb").read_bytes()
    damaged.write_bytes(raw[: len(raw) - 3 * 4096])
    bad = {
        "missing-student": ([str(source), "--student", str(tmp_path / "none.pt"), "--keep", "2"],
                            "--student .*none.pt: no such checkpoint file"),
        "no-student": ([str(source), "--keep", "2"], "--student None: expected a student checkpoint"),
        "keep-zero": ([str(source), "--by", "random", "--keep", "0"], "--keep 0: expected a count of at least 1"),
        "keep-fraction": ([str(source), "--by", "random", "--keep", "1.5"], "--keep 1.5: expected a count"),
        "keep-too-many": ([str(source), "--by", "random", "--keep", "7"],
                          "--keep 7: expected at most the 6 frames of --input"),
        "keep-text": ([str(source), "--by", "random", "--keep", "half"], "--keep half: expected an integer or"),
        "unknown-by": ([str(source), "--by", "loss", "--keep", "2"], "--by loss: expected one of disagreement"),
        "missing-input": ([str(tmp_path / "none"), "--by", "random", "--keep", "2"], "no such file"),
        "into-input": ([str(source), "--by", "random", "--keep", "2", "--out", str(source / "sub")], "must not be"),
        "damaged-input": ([str(damaged), "--by", "random", "--keep", "2"], "damaged.lmdb: truncated or damaged"),
    }
    for key, (args, expected) in bad.items():
        if "--out" not in args:
            args = [*args, "--out", str(tmp_path / "x")]
        code, _, lines = cli(*args)
        assert code == 2 and len(lines) == 1 and re.search(expected, lines[0]), (key, lines)
        assert not (tmp_path / "x").exists(), key
    assert len(read(source)) == 6
