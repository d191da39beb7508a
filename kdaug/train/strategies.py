"""KD strategies: one object per `--kd` value, declaring its taps, what a teacher cache stores and its loss."""

from __future__ import annotations

import abc

import torch
from torch_geometric.data import Batch

from kdaug.models.protocol import AtomisticModel, ModelOutput
from kdaug.train.kd import TeacherTargets
from kdaug.train.losses import LossWeights


class KDStrategy(abc.ABC):
    """One `--kd` value.

    Attributes:
        name: the --kd value.
        teacher_taps, student_taps: the taps the live teacher and the student forwards ask for.
        uses_teacher: False only for `none`.
        needs_head: a learned `KDHead` maps the student's tap (n2n, e2n, v2v).
        needs_pos_grad: the loss differentiates the student's forces w.r.t. `batch.pos`, so the engine
            calls `batch.pos.requires_grad_(True)` before the student forward.
    """

    name: str
    teacher_taps: tuple[str, ...] = ()
    student_taps: tuple[str, ...] = ()
    uses_teacher: bool = True
    needs_head: bool = False
    needs_pos_grad: bool = False

    @abc.abstractmethod
    def teacher_targets(self, teacher: AtomisticModel, batch: Batch) -> TeacherTargets:
        """The live teacher's (detached) targets for `batch`."""

    def cache_fields(self) -> tuple[str, ...]:
        """Names of the per-atom `TeacherTargets.extras` arrays (first dim N) a teacher cache stores."""
        return ()

    @abc.abstractmethod
    def loss(self, student: AtomisticModel, batch: Batch, student_output: ModelOutput,
             mapped: torch.Tensor | None, targets: TeacherTargets, system_weights: torch.Tensor | None,
             *, loss: str, l0_weights: LossWeights) -> torch.Tensor:
        """L_KD for one batch (a scalar); `mapped` is the KD head's output on the student's taps."""
