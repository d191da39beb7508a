"""The monitored validation metric of a run: best value and weights, patience, and the plateau schedule's
learning-rate reductions.

An improvement is a value strictly below `best * (1 - MIN_DELTA)` (relative: 0.1 %, so noise at the last
digit of a flat curve does not reset the patience). `--early-stopping N` stops a run after N validations
in a row without one; the exported student then holds the EMA weights of the best validation. The
`plateau` schedule multiplies the learning rate by --lr-gamma after --plateau-patience validations in a
row without an improvement (validations during warmup do not count), as torch's ReduceLROnPlateau does.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch

from kdaug.train.losses import LossWeights

MIN_DELTA = 1e-3  # relative improvement that counts
MONITORS = ("energy", "forces", "l0")


def monitored_value(metrics: Mapping[str, Any], monitor: str, weights: LossWeights) -> float:
    """The value of `monitor` in a validation's metrics: energy MAE (meV), force MAE (meV/A) or
    l0 = alpha_E energy MAE (eV) + alpha_F force MAE (eV/A), the validation analogue of L0."""
    energy, forces = metrics["energy_mae_mev"], metrics["force_mae_mev_per_ang"]
    if monitor == "energy":
        return float(energy)
    if monitor == "forces":
        return float(forces) if forces is not None else math.inf
    return weights.energy * energy / 1000.0 + weights.forces * (forces or 0.0) / 1000.0


def improves(value: float, best: float | None) -> bool:
    return best is None or value < best * (1.0 - MIN_DELTA)


class Plateau:
    """The plateau schedule's state: the factor on the learning rate and validations since the last improvement
    or reduction."""

    def __init__(self, *, patience: int, gamma: float) -> None:
        self.patience, self.gamma = patience, gamma
        self.reduction, self.bad = 1.0, 0

    def observe(self, improved: bool) -> None:
        self.bad = 0 if improved else self.bad + 1
        if self.bad >= self.patience:
            self.reduction *= self.gamma
            self.bad = 0

    def state_dict(self) -> dict[str, float]:
        return {"reduction": self.reduction, "bad": self.bad}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.reduction, self.bad = float(state["reduction"]), int(state["bad"])


class ValidationMonitor:
    """Tracks the monitored metric over a run's validations: the best value, its step, metrics and weights,
    and the validations since it (`bad`)."""

    def __init__(self, monitor: str, weights: LossWeights, *, plateau: Plateau | None = None) -> None:
        self.monitor, self.weights, self.plateau = monitor, weights, plateau
        self.best: float | None = None
        self.best_step: int | None = None
        self.best_metrics: dict | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.bad = 0
        self.last_step: int | None = None  # of the last validation counted

    def update(self, step: int, metrics: Mapping[str, Any], weights: dict[str, torch.Tensor], *,
               in_warmup: bool = False) -> dict[str, Any]:
        """Record a validation at `step` of the model whose state dict is `weights` (copied if it is the best);
        returns the log entry {"name", "value", "best", "best_step", "bad"}."""
        self.last_step = step
        value = monitored_value(metrics, self.monitor, self.weights)
        improved = improves(value, self.best)
        if improved:
            self.best, self.best_step, self.bad = value, step, 0
            self.best_metrics = dict(metrics)
            self.best_weights = {key: tensor.detach().clone() for key, tensor in weights.items()}
        else:
            self.bad += 1
        if self.plateau is not None and not in_warmup:
            self.plateau.observe(improved)
        return {"name": self.monitor, "value": value, "best": self.best, "best_step": self.best_step,
                "bad": self.bad}

    def exhausted(self, patience: int | None) -> bool:
        """True when `patience` validations in a row brought no improvement (never without a patience)."""
        return patience is not None and self.bad >= patience

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "best": self.best, "best_step": self.best_step, "bad": self.bad,
                "last_step": self.last_step,
                "best_metrics": copy.deepcopy(self.best_metrics), "best_weights": self.best_weights,
                "plateau": self.plateau.state_dict() if self.plateau is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.best_step, self.bad = state["best"], state["best_step"], int(state["bad"])
        self.last_step = state["last_step"]
        self.best_metrics, self.best_weights = state["best_metrics"], state["best_weights"]
        if self.plateau is not None and state["plateau"] is not None:
            self.plateau.load_state_dict(state["plateau"])
