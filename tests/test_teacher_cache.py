"""Teacher cache (kdaug teacher-cache, TeacherCache) over small EMT LMDBs with tiny random-weight models."""

from __future__ import annotations

import itertools
import json
import pickle
import re

import pytest
import torch
from torch_geometric.data import Batch

from kdaug.cli.main import main
from kdaug.data.lmdb import FrameDataset, LmdbWriter
from kdaug.data.training_set import TrainingSet, collate
from kdaug.errors import KdaugError
from kdaug.models import load_model, load_teacher
from kdaug.train.hessian import HessianKD
from kdaug.train.strategies import LiveTeacher, build_kd_head, get_strategy
from kdaug.train.teacher_cache import TeacherCache, build_teacher_cache
from kdaug.train.losses import LossWeights
from tests.conftest import emt_frames

TEACHER = "gemnet-oc-tiny"
MSE = {"loss": "mse", "l0_weights": LossWeights()}


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


def training_set(paths, cache=None) -> TrainingSet:
    """`TrainingSet(paths[:1], paths[1:])`, carrying the targets of `cache` if given."""
    data = TrainingSet(paths[:1], paths[1:])
    if cache is not None:
        data.attach(cache)
    return data


def indices(data, pairs) -> list[int]:
    """The sample indices of these (dataset_idx, local_idx) pairs."""
    offsets = [0, *itertools.accumulate(len(d) for d in data.datasets)]
    return [offsets[dataset_idx] + local_idx for dataset_idx, local_idx in pairs]


def kd_batch(paths, pairs, cache=None) -> Batch:
    """The training batch of these (dataset_idx, local_idx) samples (`training_set` + `collate`)."""
    data = training_set(paths, cache)
    samples = [data[i] for i in indices(data, pairs)]
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
    strategy = get_strategy(mode)
    cache = TeacherCache.open(out, setup["fingerprints"], teacher.checkpoint_sha256, strategy)
    batch = kd_batch(setup["paths"], [(1, 1), (0, 2), (0, 0)], cache)
    assert batch.dataset_idx.dtype == torch.long and batch.local_idx.tolist() == [1, 2, 0]
    live, cached = LiveTeacher(teacher, strategy).targets(batch), cache.targets(batch)
    torch.testing.assert_close(cached.energy, live.energy, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(cached.forces, live.forces, atol=2e-3, rtol=2e-3)  # float16 storage
    if live.features is None:
        assert cached.features is None
    else:
        torch.testing.assert_close(cached.features, live.features, atol=2e-3, rtol=2e-3)
    torch.manual_seed(0)
    student = load_model("painn-tiny")
    head = build_kd_head(strategy, student, cache, batch)
    output = student(batch, taps=strategy.student_taps)
    weights = torch.tensor([1.5, 0.75, 0.75])
    live_loss = strategy.loss(student, batch, output, head(output), live, weights, **MSE)
    cached_loss = strategy.loss(student, batch, output, head(output), cached, weights, **MSE)
    assert live_loss > 0
    torch.testing.assert_close(cached_loss, live_loss, rtol=2e-3, atol=1e-5)


def test_cache_refuses_other_data_teacher_and_mode(setup, capsys):
    out = setup["root"] / "cache-refuse"
    assert run_cli(setup, "n2n", out) == 0
    sha = setup["teacher"].checkpoint_sha256
    n2n = get_strategy("n2n")
    TeacherCache.open(out, setup["fingerprints"], sha, n2n)
    with pytest.raises(KdaugError, match=r"^--teacher-cache .*cache-refuse: has no targets for --val x.lmdb \(fing"):
        TeacherCache.open(out, [setup["fingerprints"][0], "f" * 64], sha, n2n, names=["a", "--val x.lmdb"])
    with pytest.raises(KdaugError, match=r"^--teacher-cache .*: made with teacher checkpoint sha256 [0-9a-f]{64}, but"):
        TeacherCache.open(out, setup["fingerprints"], "0" * 64, n2n)
    with pytest.raises(KdaugError, match=r"^--teacher-cache .*: made for --kd n2n, not --kd e2n$"):
        TeacherCache.open(out, setup["fingerprints"], sha, get_strategy("e2n"))
    with pytest.raises(KdaugError, match="not a teacher cache"):
        TeacherCache.open(setup["root"] / "dft", setup["fingerprints"], sha, n2n)
    capsys.readouterr()
    assert run_cli(setup, "n2n", out, checkpoint=setup["checkpoints"][1]) == 2
    error = capsys.readouterr().err.strip()
    assert re.match(rf"kdaug teacher-cache: error: --out {re.escape(str(out))} was started with other teacher-cache "
                    r"options: teacher_identity .*; teacher_sha256 '[0-9a-f]{64}' -> '[0-9a-f]{64}'; "
                    r"use another --out$", error), error
    assert "\n" not in error
    assert run_cli(setup, "v2v", out) == 2
    assert "kd 'n2n' -> 'v2v'" in capsys.readouterr().err


def test_a_cache_of_the_old_format_is_refused_in_one_line(setup, capsys):
    out = setup["root"] / "cache-old"
    out.mkdir()
    old = {"teacher": TEACHER, "teacher_sha256": setup["teacher"].checkpoint_sha256, "mode": "n2n",
           "dtype": "float16", "teacher_identity": setup["teacher"].identity}  # format 1: positional records
    (out / "cache.json").write_text(json.dumps(old))
    with pytest.raises(KdaugError, match=r"^--teacher-cache .*cache-old: a teacher cache of format 1, this kdaug reads "
                                         r"format 2; remake it with kdaug teacher-cache$"):
        TeacherCache.open(out, setup["fingerprints"], setup["teacher"].checkpoint_sha256, get_strategy("n2n"))
    assert run_cli(setup, "n2n", out) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"kdaug teacher-cache: error: --out {out}: a teacher cache of format 1")
    assert "\n" not in error


def test_cli_refuses_modes_the_teacher_cannot_do_before_writing(setup, capsys):
    out = setup["root"] / "cache-painn"
    torch.manual_seed(0)
    checkpoint = setup["root"] / "painn.pt"
    load_model("painn-tiny").save(checkpoint)
    assert run_cli(setup, "e2n", out, checkpoint=str(checkpoint), teacher="painn-tiny") == 2
    assert "error: --kd e2n: teacher painn-tiny has no edge features" in capsys.readouterr().err
    assert run_cli(setup, "none", out) == 2
    assert "--kd none: nothing to cache" in capsys.readouterr().err
    assert run_cli(setup, "n3n", out) == 2
    assert "--kd n3n: expected one of none, vanilla1, vanilla2, n2n" in capsys.readouterr().err
    assert main(["teacher-cache", "--teacher", TEACHER, "--checkpoint", setup["checkpoints"][0], "--data",
                 *setup["paths"], "--kd", "n2n", "--out", str(out), "--dtype", "int8"]) == 2
    assert "--dtype int8: expected one of float16, float32" in capsys.readouterr().err
    assert run_cli(setup, "n2n", setup["paths"][1]) == 2
    assert "must not be (inside) the input" in capsys.readouterr().err
    synthetic = setup["root"] / "synthetic"
    assert [p.name for p in synthetic.glob("*.lmdb")] == ["data.0000.lmdb"] and not (synthetic / "cache.json").exists()
    assert not out.exists()


def test_interrupted_cache_resumes_and_a_second_run_does_no_work(setup, monkeypatch):
    teacher, path, v2v = setup["teacher"], setup["paths"][0], get_strategy("v2v")
    reference = build_teacher_cache(teacher, [path], v2v, setup["root"] / "whole", batch_size=1, progress=False)
    assert reference["datasets"][0]["computed"] == 3

    calls = []
    real = v2v.teacher_targets

    def killed_on_second_batch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    out = setup["root"] / "resumed"
    monkeypatch.setattr(v2v, "teacher_targets", killed_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(teacher, [path], v2v, out, batch_size=1, progress=False)
    monkeypatch.undo()
    fingerprint = setup["fingerprints"][:1]
    with pytest.raises(KdaugError, match=r"has incomplete \(1 of 3 frames\) targets for dataset 0"):
        TeacherCache.open(out, fingerprint, teacher.checkpoint_sha256, v2v)
    resumed = build_teacher_cache(teacher, [path], v2v, out, batch_size=1, progress=False)
    assert resumed["datasets"][0]["computed"] == 2
    again = build_teacher_cache(teacher, [path], v2v, out, batch_size=2, progress=False)
    assert again["datasets"][0]["computed"] == 0

    whole = TeacherCache.open(setup["root"] / "whole", fingerprint, teacher.checkpoint_sha256, v2v)
    want = whole.targets(kd_batch([path], [(0, 0), (0, 1), (0, 2)], whole))
    cache = TeacherCache.open(out, fingerprint, teacher.checkpoint_sha256, v2v)
    for reader in (cache, pickle.loads(pickle.dumps(cache))):
        got = reader.targets(kd_batch([path], [(0, 0), (0, 1), (0, 2)], reader))
        assert torch.equal(got.energy, want.energy) and torch.equal(got.forces, want.forces)
        assert torch.equal(got.features, want.features)


@pytest.mark.parametrize("mode", ["vanilla1", "v2v"])
def test_cached_targets_come_through_dataloader_workers_equal_to_live_ones(setup, mode):
    """The training set reads each sample's targets in the worker that loads it; they equal the live teacher's."""
    out = setup["root"] / f"cache-workers-{mode}"
    teacher, strategy = setup["teacher"], get_strategy(mode)
    build_teacher_cache(teacher, setup["paths"], strategy, out, dtype="float32", progress=False)
    cache = TeacherCache.open(out, setup["fingerprints"], teacher.checkpoint_sha256, strategy)
    data = training_set(setup["paths"], cache)
    assert data[0].teacher_forces.shape == (data[0].natoms, 3) and data[0].teacher_energy.dtype == torch.float64
    batches = [indices(data, [(0, 1), (1, 0)]), indices(data, [(1, 1), (0, 2), (0, 0)])]
    loader = torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=1, collate_fn=collate)
    live = LiveTeacher(teacher, strategy)
    for batch in loader:
        got, want = cache.targets(batch), live.targets(batch)
        torch.testing.assert_close(got.energy, want.energy, atol=1e-4, rtol=1e-6)
        torch.testing.assert_close(got.forces, want.forces, atol=1e-5, rtol=1e-5)
        if want.features is None:
            assert got.features is None
        else:
            assert got.features.dtype == torch.float32 and got.features.shape[0] == int(batch.natoms.sum())
            torch.testing.assert_close(got.features, want.features, atol=1e-5, rtol=1e-5)
    data.close()


def test_cached_hessian_targets_give_the_live_loss_through_dataloader_workers(setup):
    """`--kd hessian` with a label-only teacher (EMT, central differences): the cache stores the probe vectors and
    H v; read in a worker they give the live loss."""
    strategy, teacher = HessianKD(k=2, max_atoms=3, seed=5), load_teacher("emt")
    out = setup["root"] / "cache-hessian"
    summary = build_teacher_cache(teacher, setup["paths"], strategy, out, dtype="float32", progress=False)
    assert summary["stamp"]["fields"] == ["energy", "forces", "hessian_vectors", "hessian_hv"]
    assert summary["stamp"]["kd_options"] == {"k": 2, "max_atoms": 3, "eps": 1e-3, "seed": 5}
    cache = TeacherCache.open(out, setup["fingerprints"], None, strategy, teacher_identity=teacher.identity)
    data = training_set(setup["paths"], cache)
    loader = torch.utils.data.DataLoader(data, batch_sampler=[indices(data, [(1, 1), (0, 2), (0, 0)])],
                                         num_workers=1, collate_fn=collate)
    torch.manual_seed(0)
    student = load_model("painn-tiny")
    weights = torch.tensor([1.0, 0.5, 0.25])
    for batch in loader:
        live, cached = LiveTeacher(teacher, strategy).targets(batch), cache.targets(batch)
        assert torch.equal(cached.extras["hessian_vectors"], live.extras["hessian_vectors"])
        torch.testing.assert_close(cached.extras["hessian_hv"], live.extras["hessian_hv"], rtol=1e-5, atol=1e-6)
        batch.pos.requires_grad_(True)
        output = student(batch)
        live_loss = strategy.loss(student, batch, output, None, live, weights, **MSE)
        cached_loss = strategy.loss(student, batch, output, None, cached, weights, **MSE)
        assert float(live_loss) > 0
        torch.testing.assert_close(cached_loss, live_loss, rtol=1e-5, atol=0)
    data.close()
    with pytest.raises(KdaugError, match=r"^--teacher-cache .*: made with --kd hessian settings \{.*'k': 2.*\}, "
                                         r"but this run's are \{.*'k': 3"):
        TeacherCache.open(out, setup["fingerprints"], None, HessianKD(k=3, max_atoms=3, seed=5))
    with pytest.raises(KdaugError, match=r"^--out .* was started with other teacher-cache options: kd_options"):
        build_teacher_cache(teacher, setup["paths"], HessianKD(k=3, max_atoms=3, seed=5), out, dtype="float32",
                            progress=False)


def test_values_beyond_float16_are_refused_naming_dtype(setup, monkeypatch):
    n2n = get_strategy("n2n")
    real = n2n.teacher_targets

    def huge(*args):
        targets = real(*args)
        targets.features = targets.features * 1e6
        return targets

    monkeypatch.setattr(n2n, "teacher_targets", huge)
    with pytest.raises(KdaugError, match=r"^--dtype float16: teacher outputs beyond its range .*use --dtype float32$"):
        build_teacher_cache(setup["teacher"], setup["paths"][:1], n2n, setup["root"] / "overflow", progress=False)
