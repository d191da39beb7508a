"""Learning-rate schedules of the paper's configs: linear warmup, then step decay at milestones or cosine.

(fairchem's `warmup_lr_lambda` refuses milestones under 100 steps and a warmup of 0 steps,
which short CPU runs need.)
"""

from __future__ import annotations

import bisect
import math

import torch


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, warmup_factor: float, schedule: str,
              milestones: tuple[int, ...], gamma: float) -> float:
    """Multiplier of the initial learning rate at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        alpha = step / warmup_steps
        return warmup_factor * (1.0 - alpha) + alpha
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return gamma ** bisect.bisect_right(milestones, step)


def build_scheduler(optimizer: torch.optim.Optimizer, **kwargs) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `lr_factor` (its keyword arguments)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, **kwargs))
