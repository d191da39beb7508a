"""Data-parallel training under torchrun: process group, parameter broadcast, gradient averaging.

The student is not wrapped in DistributedDataParallel: its KD taps hook into the fairchem
module's own submodules, which DDP would hide. Gradients are averaged with one all-reduce per
parameter after backward instead; the sampler gives every rank the same number of batches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kdaug.errors import KdaugError


@dataclass
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def from_environment(cls, device: str) -> Distributed:
        """Single process, or one rank of a torchrun job (gloo on CPU, nccl on CUDA)."""
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise KdaugError(f"--device {device}: no CUDA device is available here (use --device cpu)")
        if device.type not in ("cpu", "cuda"):
            raise KdaugError(f"--device {device}: expected cpu or cuda")
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

    def broadcast(self, parameters: Sequence[torch.Tensor]) -> None:
        """Every rank starts from rank 0's weights."""
        if self.world_size > 1:
            for tensor in parameters:
                dist.broadcast(tensor.data, src=0)

    def average_gradients(self, parameters: Sequence[torch.Tensor]) -> None:
        if self.world_size == 1:
            return
        for param in parameters:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad)
            param.grad /= self.world_size

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(world_size, ...) stack of every rank's `tensor` (same shape on all ranks)."""
        if self.world_size == 1:
            return tensor[None]
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
