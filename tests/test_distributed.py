"""DistributedDataParallel training: 2 gloo ranks (torch.multiprocessing, a FileStore) end with the same
weights, buffers, EMA and KD head on both ranks, and those of one process trained on the doubled batch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdaug.data.batch import batch_from_frames
from kdaug.models import load_model
from kdaug.train.config import TrainConfig
from kdaug.train.distributed import Distributed
from kdaug.train.strategies import LiveTeacher, build_kd_head, get_strategy
from kdaug.train.loop import Trainer
from kdaug.train.student_head import StudentWithHead, unused_parameters
from tests.conftest import emt_frames, write_training_data


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """6 DFT and 4 synthetic EMT slabs (13 atoms, 9 free each), 2 for validation, a painn-tiny teacher."""
    return write_training_data(tmp_path_factory.mktemp("ddp-data"), 12)


def _weights(trainer: Trainer) -> dict:
    return {"student": trainer.student.state_dict(), "head": trainer.head.state_dict(),
            "ema": [p.clone() for p in trainer.ema.shadow_params], "step": trainer.step}


def _rank(rank: int, world_size: int, store: str, options: dict) -> None:
    """One torchrun-like rank: the process group on a FileStore, then the Trainer `kdaug train` runs."""
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world_size), rank=rank, world_size=world_size)
    trainer = Trainer(TrainConfig(**options), progress=False)
    try:
        trainer.run()
        assert isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel)
        assert trainer.model.module.student is trainer.student and trainer.model.module.head is trainer.head
        torch.save(_weights(trainer), Path(options["out"]) / f"weights.rank{rank}.pt")
    finally:
        trainer.close()


def _assert_tensors(a: dict | list, b: dict | list, **tolerance) -> None:
    items = a.items() if isinstance(a, dict) else enumerate(a)
    for key, value in items:
        if tolerance:
            torch.testing.assert_close(value, b[key], **tolerance, msg=lambda m, key=key: f"{key}: {m}")
        else:
            assert torch.equal(value, b[key]), key


@pytest.mark.parametrize("student", [
    {"student": "painn-tiny"},  # direct forces
    {"student": "schnet-tiny", "kd": "n2n", "kd_lambda": 1.0, "teacher": "painn-tiny"},  # gradient forces, M_s
], ids=["painn-tiny", "schnet-tiny-n2n"])
def test_two_ranks_end_identical_and_equal_to_one_process_on_the_doubled_batch(data, tmp_path, student):
    options = {"train": (data["dft"],), "synthetic": (data["synthetic"],), "mix_ratio": 0.5, "max_steps": 7,
               "checkpoint_every": 3, "lr": 1e-3, "lr_milestones": (4,), "val": (data["val"],), "val_every": 3,
               "seed": 3, **student}
    if "teacher" in student:
        options["teacher_checkpoint"] = data["teacher"]
    ddp = {**options, "batch_size": 1, "out": str(tmp_path / "ddp")}
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), ddp), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"weights.rank{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["step"] == rank1["step"] == 7  # an epoch is 10 samples: 5 steps, so 2 epochs
    for part in ("student", "head", "ema"):
        _assert_tensors(rank0[part], rank1[part])  # bitwise: parameters, buffers, EMA
    buffers = dict(load_model(student["student"]).named_buffers())
    assert buffers and set(buffers) <= set(rank0["student"])
    if "kd" in student:
        assert rank0["head"]["projection.weight"].shape == (16, 16)

    single = Trainer(TrainConfig(**{**options, "batch_size": 2, "out": str(tmp_path / "single")}), progress=False)
    try:
        single.run()
        assert single.model.student is single.student  # one process: no DDP wrapper
        reference = _weights(single)
    finally:
        single.close()
    for part in ("student", "head", "ema"):
        _assert_tensors(rank0[part], reference[part], rtol=1e-5, atol=1e-6)  # seen: <= 6e-8 (float32)
    checkpoint = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)
    _assert_tensors(rank0["student"], checkpoint["student"])  # unwrapped: no "module." prefix
    assert set(checkpoint["student"]) == set(rank0["student"]) == set(reference["student"])


@pytest.mark.parametrize(("name", "mode"), [("painn-tiny", "none"), ("painn-tiny", "v2v"), ("schnet-tiny", "n2n"),
                                            ("gemnet-oc-tiny", "n2n")])
def test_every_trainable_parameter_gets_a_gradient_so_ddp_needs_no_unused_search(name, mode):
    batch = batch_from_frames(emt_frames(2))
    torch.manual_seed(0)
    student = load_model(name).train()
    teacher = load_model("gemnet-oc-tiny" if mode == "v2v" else "painn-tiny")  # v2v needs edge features
    strategy = get_strategy(mode)
    head = build_kd_head(strategy, student, LiveTeacher(teacher, strategy), batch)
    assert unused_parameters(StudentWithHead(student, head), batch, strategy.student_taps) == []


def _spare_model() -> StudentWithHead:
    """painn-tiny with a parameter nothing reads, and an n2n head."""
    torch.manual_seed(0)
    student = load_model("painn-tiny").train()
    student.register_parameter("spare", torch.nn.Parameter(torch.zeros(3)))
    return StudentWithHead(student, get_strategy("n2n").head(16, 4))


def _gradients(model: torch.nn.Module, batch) -> dict[str, torch.Tensor]:
    """Two backward passes of energy, forces and mapped features; the gradients of the second."""
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        output, mapped = model(batch, taps=("node",))
        (output.energy.sum() + output.forces.square().sum() + mapped.sum()).backward()
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return {name: param.grad.clone() for name, param in inner.named_parameters() if param.grad is not None}


def _spare_rank(rank: int, world_size: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world_size), rank=rank, world_size=world_size)
    try:
        model = _spare_model()
        batch = batch_from_frames(emt_frames(2)[rank : rank + 1])
        unused = unused_parameters(model, batch, ("node",))
        ddp = Distributed(rank, world_size, torch.device("cpu")).wrap(model, find_unused_parameters=bool(unused))
        torch.save(_gradients(ddp, batch), Path(out) / f"grads.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_parameter_no_loss_reaches_is_found_and_ddp_then_averages_the_others(tmp_path):
    model = _spare_model()
    frames = emt_frames(2)
    assert unused_parameters(model, batch_from_frames(frames[:1]), ("node",)) == ["student.spare"]
    mp.spawn(_spare_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"grads.rank{r}.pt") for r in (0, 1))
    alone = [_gradients(_spare_model(), batch_from_frames(frames[r : r + 1])) for r in (0, 1)]
    assert "student.spare" not in rank0 and set(rank0) == set(alone[0])
    _assert_tensors(rank0, rank1)
    _assert_tensors(rank0, {name: (alone[0][name] + alone[1][name]) / 2 for name in rank0}, rtol=1e-5, atol=1e-7)
