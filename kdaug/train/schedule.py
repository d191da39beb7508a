"""Learning-rate schedules: linear warmup, then step decay at milestones, cosine to the step cap (the paper's
configs) or plateau (x gamma when validation stalls, `kdaug.train.early_stopping.Plateau`).

(fairchem's `warmup_lr_lambda` refuses milestones under 100 steps and a warmup of 0 steps,
which short CPU runs need.)
"""

from __future__ import annotations

import bisect
import math

import torch

from kdaug.train.early_stopping import Plateau


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, warmup_factor: float, schedule: str,
              milestones: tuple[int, ...], gamma: float) -> float:
    """Multiplier of the initial learning rate at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        alpha = step / warmup_steps
        return warmup_factor * (1.0 - alpha) + alpha
    if schedule == "plateau":
        return 1.0
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return gamma ** bisect.bisect_right(milestones, step)


def build_scheduler(optimizer: torch.optim.Optimizer, plateau: Plateau | None = None,
                    **kwargs) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `lr_factor` (its keyword arguments), times the plateau schedule's reduction if given."""
    if plateau is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, **kwargs))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, **kwargs) * plateau.reduction)
