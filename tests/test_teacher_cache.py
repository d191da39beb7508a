"""Teacher cache (kdaug teacher-cache, TeacherCache) over small EMT LMDBs with tiny random-weight models."""

from __future__ import annotations

import itertools
import pickle

import pytest
import torch
from torch_geometric.data import Batch

from kdaug.cli.main import main
from kdaug.data.lmdb import FrameDataset, LmdbWriter
from kdaug.data.training_set import TrainingSet, collate
from kdaug.errors import KdaugError
from kdaug.models import load_model, load_teacher
from kdaug.train import teacher_cache
from kdaug.train.kd import build_kd_head, kd_loss, live_teacher_targets, required_taps
from kdaug.train.teacher_cache import TeacherCache, build_teacher_cache
from tests.conftest import emt_frames

TEACHER = "gemnet-oc-tiny"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two LMDBs (3 DFT and 2 synthetic frames), a random-weight teacher checkpoint and a second one."""
    root = tmp_path_factory.mktemp("cache")
    frames = emt_frames(5)
    paths = [root / "dft", root / "synthetic"]
    with LmdbWriter(paths[0]) as writer:
        writer.write_batch(frames[:3])
    with LmdbWriter(paths[1]) as writer:
        writer.write_batch([f.replace(provenance=f.provenance.__class__(origin="synthetic")) for f in frames[3:]])
    checkpoints = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        checkpoints.append(root / f"teacher{seed}.pt")
        load_model(TEACHER).save(checkpoints[-1])
    teacher = load_teacher(TEACHER, checkpoints[0])
    fingerprints = [FrameDataset(p).fingerprint() for p in paths]
    return {"root": root, "paths": [str(p) for p in paths], "checkpoints": [str(c) for c in checkpoints],
            "teacher": teacher, "fingerprints": fingerprints}


def kd_batch(paths, pairs) -> Batch:
    """The training batch of these (dataset_idx, local_idx) samples: `TrainingSet(paths[:1], paths[1:])` + `collate`."""
    data = TrainingSet(paths[:1], paths[1:])
    offsets = [0, *itertools.accumulate(len(d) for d in data.datasets)]
    samples = [data[offsets[dataset_idx] + local_idx] for dataset_idx, local_idx in pairs]
    assert [(s.dataset_idx, s.local_idx) for s in samples] == list(pairs)
    return collate(samples)


def run_cli(setup, mode, out, checkpoint=None, teacher=TEACHER):
    return main(["teacher-cache", "--teacher", teacher, "--checkpoint", checkpoint or setup["checkpoints"][0],
                 "--data", *setup["paths"], "--kd", mode, "--out", str(out), "--batch-size", "2"])


@pytest.mark.parametrize("mode", ["vanilla1", "vanilla2", "n2n", "e2n", "v2v"])
def test_cached_and_live_targets_give_the_same_loss(setup, mode, capsys):
    out = setup["root"] / f"cache-{mode}"
    assert run_cli(setup, mode, out) == 0
    teacher = setup["teacher"]
    cache = TeacherCache.open(out, setup["fingerprints"], teacher.checkpoint_sha256, mode)
    batch = kd_batch(setup["paths"], [(1, 1), (0, 2), (0, 0)])
    assert batch.dataset_idx.dtype == torch.long and batch.local_idx.tolist() == [1, 2, 0]
    live, cached = live_teacher_targets(mode, teacher, batch), cache.targets(batch)
    torch.testing.assert_close(cached.energy, live.energy, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(cached.forces, live.forces, atol=2e-3, rtol=2e-3)  # float16 storage
    if live.features is None:
        assert cached.features is None
    else:
        torch.testing.assert_close(cached.features, live.features, atol=2e-3, rtol=2e-3)
    torch.manual_seed(0)
    student = load_model("painn-tiny")
    head = build_kd_head(mode, student, cache, batch)
    output = student(batch, taps=required_taps(mode)[1])
    weights = torch.tensor([1.5, 0.75, 0.75])
    live_loss = kd_loss(mode, head(output), output, live, batch, weights)
    cached_loss = kd_loss(mode, head(output), output, cached, batch, weights)
    assert live_loss > 0
    torch.testing.assert_close(cached_loss, live_loss, rtol=2e-3, atol=1e-5)


def test_cache_refuses_other_data_teacher_and_mode(setup, capsys):
    out = setup["root"] / "cache-refuse"
    assert run_cli(setup, "n2n", out) == 0
    sha = setup["teacher"].checkpoint_sha256
    TeacherCache.open(out, setup["fingerprints"], sha, "n2n")
    with pytest.raises(KdaugError, match=r"^--teacher-cache .*cache-refuse: has no targets for --val x.lmdb \(fing"):
        TeacherCache.open(out, [setup["fingerprints"][0], "f" * 64], sha, "n2n", names=["a", "--val x.lmdb"])
    with pytest.raises(KdaugError, match=r"^--teacher-cache .*: made with teacher checkpoint sha256 [0-9a-f]{64}, but"):
        TeacherCache.open(out, setup["fingerprints"], "0" * 64, "n2n")
    with pytest.raises(KdaugError, match=r"^--teacher-cache .*: made for --kd n2n, not --kd e2n$"):
        TeacherCache.open(out, setup["fingerprints"], sha, "e2n")
    with pytest.raises(KdaugError, match="not a teacher cache"):
        TeacherCache.open(setup["root"] / "dft", setup["fingerprints"], sha, "n2n")
    capsys.readouterr()
    assert run_cli(setup, "n2n", out, checkpoint=setup["checkpoints"][1]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"kdaug teacher-cache: error: --out {out}: holds a teacher cache made with teacher_sha256")
    assert "\n" not in error
    assert run_cli(setup, "v2v", out) == 2
    assert "mode 'n2n' (now 'v2v')" in capsys.readouterr().err


def test_cli_refuses_modes_the_teacher_cannot_do_before_writing(setup, capsys):
    out = setup["root"] / "cache-painn"
    torch.manual_seed(0)
    checkpoint = setup["root"] / "painn.pt"
    load_model("painn-tiny").save(checkpoint)
    assert run_cli(setup, "e2n", out, checkpoint=str(checkpoint), teacher="painn-tiny") == 2
    assert "error: --kd e2n: teacher painn-tiny has no edge features" in capsys.readouterr().err
    assert run_cli(setup, "none", out) == 2
    assert "--kd none: nothing to cache" in capsys.readouterr().err
    assert main(["teacher-cache", "--teacher", TEACHER, "--checkpoint", setup["checkpoints"][0], "--data",
                 *setup["paths"], "--kd", "n2n", "--out", str(out), "--dtype", "int8"]) == 2
    assert "--dtype int8: expected one of float16, float32" in capsys.readouterr().err
    assert run_cli(setup, "n2n", setup["paths"][1]) == 2
    assert "must not be (inside) the input" in capsys.readouterr().err
    synthetic = setup["root"] / "synthetic"
    assert [p.name for p in synthetic.glob("*.lmdb")] == ["data.0000.lmdb"] and not (synthetic / "cache.json").exists()
    assert not out.exists()


def test_interrupted_cache_resumes_and_a_second_run_does_no_work(setup, monkeypatch):
    teacher, path = setup["teacher"], setup["paths"][0]
    reference = build_teacher_cache(teacher, [path], "v2v", setup["root"] / "whole", batch_size=1, progress=False)
    assert reference["datasets"][0]["computed"] == 3

    calls = []
    real = teacher_cache.live_teacher_targets

    def killed_on_second_batch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    out = setup["root"] / "resumed"
    monkeypatch.setattr(teacher_cache, "live_teacher_targets", killed_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(teacher, [path], "v2v", out, batch_size=1, progress=False)
    monkeypatch.undo()
    fingerprint = setup["fingerprints"][:1]
    with pytest.raises(KdaugError, match=r"has incomplete \(1 of 3 frames\) targets for dataset 0"):
        TeacherCache.open(out, fingerprint, teacher.checkpoint_sha256, "v2v")
    resumed = build_teacher_cache(teacher, [path], "v2v", out, batch_size=1, progress=False)
    assert resumed["datasets"][0]["computed"] == 2
    again = build_teacher_cache(teacher, [path], "v2v", out, batch_size=2, progress=False)
    assert again["datasets"][0]["computed"] == 0

    batch = kd_batch([path], [(0, 0), (0, 1), (0, 2)])
    whole = TeacherCache.open(setup["root"] / "whole", fingerprint, teacher.checkpoint_sha256, "v2v").targets(batch)
    cache = TeacherCache.open(out, fingerprint, teacher.checkpoint_sha256, "v2v")
    for got, want in ((cache.targets(batch), whole), (pickle.loads(pickle.dumps(cache)).targets(batch), whole)):
        assert torch.equal(got.energy, want.energy) and torch.equal(got.forces, want.forces)
        assert torch.equal(got.features, want.features)


def test_cache_is_read_in_dataloader_workers(setup):
    out = setup["root"] / "cache-workers"
    teacher = setup["teacher"]
    build_teacher_cache(teacher, setup["paths"], "n2n", out, dtype="float32", progress=False)
    cache = TeacherCache.open(out, setup["fingerprints"], teacher.checkpoint_sha256, "n2n")
    pairs = [[(0, 1), (1, 0)], [(1, 1)]]
    batches = [kd_batch(setup["paths"], p) for p in pairs]
    in_main = [cache.targets(b) for b in batches]
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=1, collate_fn=cache.targets)
    for got, want in zip(loader, in_main):
        assert torch.equal(got.features, want.features) and got.features.dtype == torch.float32
    assert len(batches[0].natoms) == 2 and in_main[0].features.shape[0] == int(batches[0].natoms.sum())


def test_values_beyond_float16_are_refused_naming_dtype(setup, monkeypatch):
    real = teacher_cache.live_teacher_targets

    def huge(*args):
        targets = real(*args)
        targets.features = targets.features * 1e6
        return targets

    monkeypatch.setattr(teacher_cache, "live_teacher_targets", huge)
    with pytest.raises(KdaugError, match=r"^--dtype float16: teacher outputs beyond its range .*use --dtype float32$"):
        build_teacher_cache(setup["teacher"], setup["paths"][:1], "n2n", setup["root"] / "overflow", progress=False)
