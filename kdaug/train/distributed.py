"""Data-parallel training under torchrun: process group, DistributedDataParallel, collectives.

`Distributed.wrap` puts the trained module (`kdaug.train.student_head.StudentWithHead`) under
torch's DistributedDataParallel: parameters and buffers are broadcast from rank 0 when it is built,
buffers again before every forward, and gradients are averaged in buckets, overlapped with the
backward pass. The KD taps are forward hooks the student sets during its call, so a DDP forward reaches
them. The sampler gives every rank the same number of batches, so every rank runs the same steps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from kdaug.models.registry import check_device


@dataclass
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def from_environment(cls, device: str) -> Distributed:
        """Single process, or one rank of a torchrun job (gloo on CPU, nccl on CUDA)."""
        device = check_device(device)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls(0, 1, device)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: nn.Module, *, find_unused_parameters: bool) -> nn.Module:
        """`module` under DistributedDataParallel (whose `.module` it is), or `module` itself in one
        process. find_unused_parameters: True when some trainable parameter gets no gradient."""
        if self.world_size == 1:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids,
                                                   find_unused_parameters=find_unused_parameters)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(world_size, ...) stack of every rank's `tensor` (same shape on all ranks)."""
        if self.world_size == 1:
            return tensor[None]
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Rank 0's `tensor` on every rank (in place)."""
        if self.world_size > 1:
            dist.broadcast(tensor, src=0)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
