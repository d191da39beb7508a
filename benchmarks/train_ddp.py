"""Samples/s of `kdaug train` under torchrun: the DistributedDataParallel engine beside the per-parameter
all-reduce it replaced, in one run (same model, data, batch and steps).

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m benchmarks.train_ddp [--student painn-small]
        [--batch 4] [--steps 10] [--rounds 2] [--device cpu]

Both rows time `Trainer.train_step` (forward and backward of the student, AdamW, clipping, EMA) on this
rank's first batch of 82-atom slabs (--batch per rank). "ddp": kdaug's engine, gradients averaged in
buckets during the backward. "per-parameter": the student unwrapped and one blocking all-reduce per
parameter after the backward (the engine before DDP; here it runs just before AdamW, after clipping,
which costs the same). The rows alternate for --rounds rounds of --steps steps; samples/s counts every
rank's samples, timed between barriers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.common import oc20_sized_frame
from kdaug.data.lmdb import LmdbWriter
from kdaug.data.training_set import collate
from kdaug.train.config import TrainConfig
from kdaug.train.loop import Trainer
from kdaug.train.student_head import StudentWithHead


class PerParameterTrainer(Trainer):
    """The trainer with the engine DDP replaced: no wrapper, one all-reduce per parameter before AdamW."""

    def _engine(self) -> torch.nn.Module:
        self.optimizer.register_step_pre_hook(self._average_each_gradient)
        return StudentWithHead(self.student, self.head)

    def _average_each_gradient(self, *_: object) -> None:
        for param in self.parameters:
            if param.requires_grad:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                dist.all_reduce(param.grad)
                param.grad /= self.dist.world_size


def samples_per_s(trainer: Trainer, batch, steps: int) -> float:
    """Samples/s over all ranks of `steps` train steps on `batch` (every rank's batch the same size)."""
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batch.clone())
    dist.barrier()
    return steps * len(batch.natoms) * dist.get_world_size() / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="painn-small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4, help="samples per rank and step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    work = [tempfile.mkdtemp(prefix="kdaug-bench-ddp-") if rank == 0 else None]
    dist.broadcast_object_list(work, src=0)
    work = Path(work[0])
    if rank == 0:
        with LmdbWriter(work / "data") as writer:
            writer.write_batch([oc20_sized_frame(seed=i) for i in range(args.batch * world_size)])
    dist.barrier()
    base = {"student": args.student, "train": (str(work / "data"),), "batch_size": args.batch,
            "max_steps": 10_000, "device": args.device, "energy_reference": "none"}
    trainers = {"ddp": Trainer(TrainConfig(**base, out=str(work / "ddp")), progress=False),
                "per-parameter": PerParameterTrainer(TrainConfig(**base, out=str(work / "per-parameter")),
                                                     progress=False)}
    first = trainers["ddp"]
    batch = collate([first.data[i] for i in first.sampler.epoch_batches(0)[0]]).to(first.device)
    rates: dict[str, list[float]] = {name: [] for name in trainers}
    for name, trainer in trainers.items():  # warm-up step
        samples_per_s(trainer, batch, 1)
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            rates[name].append(samples_per_s(trainer, batch, args.steps))
    if rank == 0:
        n_params = sum(p.numel() for p in first.parameters if p.requires_grad)
        print(f"student {args.student} ({n_params} parameters, {len(first.parameters)} tensors), {args.device}, "
              f"{world_size} ranks x batch {args.batch} (82-atom slabs), {args.rounds} rounds x {args.steps} steps")
        for name, values in rates.items():
            print(f"{name:14} {sum(values) / len(values):8.2f} samples/s  (rounds: "
                  f"{', '.join(f'{v:.2f}' for v in values)})")
    for trainer in trainers.values():
        trainer.close()


if __name__ == "__main__":
    main()
