"""The trained module: the student and its KD map M_s in one `nn.Module`, the unit DDP wraps.

One forward gives the student's output and the head's mapped features, so a DistributedDataParallel
wrapper sees every trained parameter in one graph (bucketed, overlapped gradient all-reduce, buffers
broadcast). The KD taps are forward hooks the student sets on its own submodules during the call,
which a DDP forward reaches like any other.
"""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.data import Batch

from kdaug.models.protocol import ModelOutput
from kdaug.train.kd import KDHead


class StudentWithHead(nn.Module):
    """`forward(batch, taps)` -> (student output with `taps`, head(output): M_s features or None)."""

    def __init__(self, student: nn.Module, head: KDHead) -> None:
        super().__init__()
        self.student = student
        self.head = head

    def forward(self, batch: Batch, taps: tuple[str, ...] = ()) -> tuple[ModelOutput, torch.Tensor | None]:
        output = self.student(batch, taps=taps)
        return output, self.head(output)


def unused_parameters(model: StudentWithHead, batch: Batch, taps: tuple[str, ...]) -> list[str]:
    """Names of the trainable parameters no loss term reaches (energy, forces, mapped) on `batch`.

    DDP needs find_unused_parameters=True exactly when this is not empty; nothing is accumulated.
    """
    output, mapped = model(batch, taps=taps)
    probe = output.energy.sum() + output.forces.sum()
    if mapped is not None:
        probe = probe + mapped.sum()
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    grads = torch.autograd.grad(probe, [param for _, param in named], allow_unused=True)
    return [name for (name, _), grad in zip(named, grads) if grad is None]
