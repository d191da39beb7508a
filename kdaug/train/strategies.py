"""The KD strategies of the paper (Sec. 3), one object per `--kd` value: L = L0 + lambda L_KD.

| --kd     | teacher tap  | teacher target (per atom)                          | student tap | M_s                     |
| none     | -            | - (no teacher)                                     | -           | -                       |
| vanilla1 | -            | energy (S,) and forces (N,3): L0 against them      | -           | -                       |
| vanilla2 | atom_energy  | E_i (N,) eV; L_E (absolute error) per atom, eq. 8  | atom_energy | -                       |
| n2n      | node         | H_node (N,Dt)                                      | node        | Linear(Ds, Dt)          |
| e2n      | edge         | sum over edges into atom i of H_edge (N,Dt), eq. 5 | node        | Linear(Ds, Dt)          |
| v2v      | edge         | sum_j u_ij H_edge,ij per channel (N,3,Dt), eq. 6   | vector      | Linear(Ds, Dt, no bias) |
| hessian  | -            | H v for k random unit vectors v (N,k,3) eV/A^2     | -           | -                       |

hessian matches the student's H v (double backward through its forces) to the teacher's (`kdaug.train.hessian`).
M_t is the identity. M_s (`KDHead`) is trained with the student and dropped at export. The feature strategies
average `--kd-loss` (mse|mae) over each atom's feature entries, then over atoms, each atom carrying its
system's weight (the r_s/dft weights). `STRATEGIES` is the one list the CLI, `TrainConfig`, the study and
the teacher cache read.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch_geometric.data import Batch

from kdaug.errors import KdaugError
from kdaug.models.protocol import AtomisticModel, ModelOutput
from kdaug.train.hessian import HessianKD
from kdaug.train.kd import (
    FEATURE_LOSSES,
    KDHead,
    KDStrategy,
    TargetSource,
    TeacherTargets,
    edge_to_node,
    edge_to_vector,
)
from kdaug.train.losses import energy_force_loss

__all__ = ["STRATEGIES", "KDStrategy", "KdName", "LiveTeacher", "build_kd_head", "check_pair", "get_strategy",
           "possible_strategies"]


class NoKD(KDStrategy):
    """`--kd none`: no teacher, L_KD = 0."""

    name = "none"
    uses_teacher = False

    def loss(self, student, batch, student_output, mapped, targets, system_weights, *, loss, l0_weights):
        return student_output.energy.new_zeros(())


class Vanilla1(KDStrategy):
    """`--kd vanilla1`: L0 (energy and forces of free atoms, `l0_weights`) against the teacher's outputs."""

    name = "vanilla1"

    def loss(self, student, batch, student_output, mapped, targets, system_weights, *, loss, l0_weights):
        energy = student_output.energy
        total, _ = energy_force_loss(energy, student_output.forces, targets.energy.to(energy.dtype),
                                     targets.forces.to(energy.dtype), batch.batch, batch.fixed == 0,
                                     system_weights, l0_weights)
        return total


class FeatureKD(KDStrategy):
    """A per-atom teacher feature target (the first teacher tap) matched by the student's mapped tap."""

    def target_features(self, teacher_output: ModelOutput, n_atoms: int) -> torch.Tensor:
        return teacher_output.taps[self.teacher_taps[0]]

    def cache_fields(self) -> tuple[str, ...]:
        return ("features",)

    def per_atom_error(self, error: torch.Tensor, loss: str) -> torch.Tensor:
        return error.abs() if loss == "mae" else error.square()

    def loss(self, student, batch, student_output, mapped, targets, system_weights, *, loss, l0_weights):
        if loss not in FEATURE_LOSSES:
            msg = f"--kd-loss {loss}: expected one of {', '.join(FEATURE_LOSSES)}"
            raise KdaugError(msg)
        target = targets.features.to(device=mapped.device, dtype=mapped.dtype)
        if mapped.shape != target.shape:
            msg = (f"--kd {self.name}: student features {tuple(mapped.shape)} do not match teacher targets "
                   f"{tuple(target.shape)}")
            raise KdaugError(msg)
        error = self.per_atom_error(mapped - target, loss)
        per_atom = error.reshape(error.shape[0], -1).mean(dim=1)
        if system_weights is not None:
            per_atom = per_atom * system_weights[batch.batch]
        return per_atom.mean()


class Vanilla2(FeatureKD):
    """`--kd vanilla2`: per-atom energies, the energy loss L_E (absolute error) per atom (eq. 8)."""

    name = "vanilla2"
    teacher_taps = ("atom_energy",)
    student_taps = ("atom_energy",)

    def per_atom_error(self, error: torch.Tensor, loss: str) -> torch.Tensor:
        return error.abs()


class NodeToNode(FeatureKD):
    """`--kd n2n`: teacher node features from a learned map of the student's."""

    name = "n2n"
    teacher_taps = ("node",)
    student_taps = ("node",)
    needs_head = True


class EdgeToNode(FeatureKD):
    """`--kd e2n`: the teacher's edge features summed onto their target atoms (eq. 5) from student node features."""

    name = "e2n"
    teacher_taps = ("edge",)
    student_taps = ("node",)
    needs_head = True

    def target_features(self, teacher_output: ModelOutput, n_atoms: int) -> torch.Tensor:
        return edge_to_node(teacher_output.taps["edge"], n_atoms)


class VectorToVector(FeatureKD):
    """`--kd v2v`: sum_j u_ij H_edge,ij of the teacher (eq. 6) from the student's vector features (bias-free map)."""

    name = "v2v"
    teacher_taps = ("edge",)
    student_taps = ("vector",)
    needs_head = True
    head_bias = False

    def target_features(self, teacher_output: ModelOutput, n_atoms: int) -> torch.Tensor:
        return edge_to_vector(teacher_output.taps["edge"], n_atoms)


STRATEGIES: dict[str, KDStrategy] = {s.name: s for s in (NoKD(), Vanilla1(), Vanilla2(), NodeToNode(), EdgeToNode(),
                                                         VectorToVector(), HessianKD())}

KdName = Literal[tuple(STRATEGIES)]  # the --kd values, for config fields


def get_strategy(name: str) -> KDStrategy:
    """The strategy of `--kd name`; a one-line `KdaugError` naming --kd and the choices otherwise."""
    if name not in STRATEGIES:
        msg = f"--kd {name}: expected one of {', '.join(STRATEGIES)}"
        raise KdaugError(msg)
    return STRATEGIES[name]


def possible_strategies(student: AtomisticModel | None, teacher: AtomisticModel | None) -> list[str]:
    """Names of the strategies a pair can do (a side given as None is not checked)."""
    return [name for name, strategy in STRATEGIES.items() if strategy.missing_tap(student, teacher) is None]


def check_pair(strategy: KDStrategy, student: AtomisticModel | None, teacher: AtomisticModel | None) -> None:
    """One-line `KdaugError` naming --kd when the pair cannot do `strategy`, listing what it can do.

    Pass teacher=None when the targets come from a teacher cache (made for this strategy), and
    student=None to check only the teacher (`kdaug teacher-cache`).
    """
    missing = strategy.missing_tap(student, teacher)
    if missing is not None:
        possible = ", ".join(possible_strategies(student, teacher))
        msg = f"--kd {strategy.name}: {missing}; this pair can do --kd {possible}"
        raise KdaugError(msg)


class LiveTeacher:
    """The `TargetSource` of a live teacher: `strategy.teacher_targets(teacher, batch)` every batch."""

    def __init__(self, teacher: AtomisticModel, strategy: KDStrategy) -> None:
        self.teacher, self.strategy = teacher, strategy

    def targets(self, batch: Batch) -> TeacherTargets:
        return self.strategy.teacher_targets(self.teacher, batch)


def build_kd_head(strategy: KDStrategy, student: AtomisticModel, source: TargetSource, sample_batch: Batch) -> KDHead:
    """`strategy`'s `KDHead`, its projection sized from one forward of `student` and the targets of `source` on
    `sample_batch` (a training batch, whose samples carry a teacher cache's targets where one is attached)."""
    if not strategy.needs_head:
        return strategy.head()
    targets = source.targets(sample_batch)
    with torch.no_grad():
        student_features = student(sample_batch, taps=strategy.student_taps).taps[strategy.student_taps[0]]
    head = strategy.head(student_features.shape[-1], targets.features.shape[-1])
    return head.to(device=student.device, dtype=student.dtype)
