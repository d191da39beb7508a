"""The pieces every KD strategy shares: `KDStrategy` (the interface), `TeacherTargets`, `TargetSource`, `KDHead`,
the edge-to-atom maps of the paper (eqs. 5-6) and the Table 7 default lambda.

The strategies themselves (one per `--kd` value) and their list are in `kdaug.train.strategies`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import yaml
from torch import nn
from torch_geometric.data import Batch

from kdaug.models.protocol import AtomisticModel, EdgeFeatures, ModelOutput
from kdaug.resources import resource_path
from kdaug.train.losses import LossWeights

FEATURE_LOSSES: tuple[str, ...] = ("mse", "mae")
_TAP_WORDS = {
    "atom_energy": "per-atom energies",
    "node": "scalar node features",
    "edge": "edge features (GemNet-OC has them)",
    "vector": "vector features (PaiNN with direct_forces has them)",
}


@dataclass
class TeacherTargets:
    """What the student is distilled towards, for one batch.

    energy (S,) eV; forces (N, 3) eV/A; features: the strategy's per-atom target (first dim N) or None;
    extras: further per-atom arrays by name (first dim N), e.g. "hessian_vectors" (N, k, 3).
    """

    energy: torch.Tensor
    forces: torch.Tensor
    features: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def field(self, name: str) -> torch.Tensor:
        """The per-atom array `name`: "forces", "features" or an extra."""
        if name in ("forces", "features"):
            return getattr(self, name)
        return self.extras[name]

    @classmethod
    def from_fields(cls, energy: torch.Tensor, fields: dict[str, torch.Tensor]) -> TeacherTargets:
        """The inverse of `field`: targets from the energy and per-atom arrays by name."""
        fields = dict(fields)
        return cls(energy, fields.pop("forces"), fields.pop("features", None), fields)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> TeacherTargets:
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device=device, dtype=dtype)

        return TeacherTargets(move(self.energy), move(self.forces), move(self.features),
                              {name: move(value) for name, value in self.extras.items()})


class TargetSource(Protocol):
    """Where a batch's teacher targets come from: the live teacher (`kdaug.train.strategies.LiveTeacher`) or a
    teacher cache (`kdaug.train.teacher_cache.TeacherCache`)."""

    def targets(self, batch: Batch) -> TeacherTargets: ...


def edge_to_node(edge: EdgeFeatures, n_atoms: int) -> torch.Tensor:
    """(N, D): each edge's features added onto its target atom (edge_index[1]), eq. 5."""
    out = edge.features.new_zeros((n_atoms, edge.features.shape[1]))
    return out.index_add_(0, edge.edge_index[1], edge.features)


def edge_to_vector(edge: EdgeFeatures, n_atoms: int) -> torch.Tensor:
    """(N, 3, D): H_vec,i = sum_j u_ij H_edge,ij per channel, eq. 6, i the target atom of the edge.

    The tap's vectors point from the source (neighbour j) to the target i (GemNet-OC's convention),
    the paper's u_ij from i to j, hence the minus sign.
    """
    features = edge.features
    vectors = -edge.vectors.to(features.dtype)
    out = features.new_zeros((n_atoms, 3, features.shape[1]))
    return out.index_add_(0, edge.edge_index[1], vectors[:, :, None] * features[:, None, :])


class KDHead(nn.Module):
    """M_s: the student's tap `tap` mapped into the teacher target's space (dropped at export).

    `projection` is a learned Linear(Ds, Dt) on the channel (last) axis -- for (N, 3, Ds) vector features
    one without bias, which mixes channels only and so keeps the vectors equivariant -- or None (identity).
    """

    def __init__(self, tap: str | None = None, projection: nn.Linear | None = None) -> None:
        super().__init__()
        self.tap = tap
        self.projection = projection

    def forward(self, student_output: ModelOutput) -> torch.Tensor | None:
        """The student's mapped features (N, ...), None for a strategy without a student tap."""
        if self.tap is None:
            return None
        features = student_output.taps[self.tap]
        return features if self.projection is None else self.projection(features)


class KDStrategy:
    """One `--kd` value: the taps it reads, the targets it distils towards, what a cache stores and its loss.

    Attributes:
        name: the --kd value.
        teacher_taps / student_taps: the taps the teacher / student forward asks for.
        uses_teacher: False only for `none`.
        needs_head: a learned `KDHead` projection maps the student's tap (n2n, e2n, v2v).
        head_bias: that projection has a bias.
        needs_pos_grad: the loss differentiates the student's forces w.r.t. batch.pos (the engine makes
            batch.pos require grad before the student forward).
    """

    name: str = ""
    teacher_taps: tuple[str, ...] = ()
    student_taps: tuple[str, ...] = ()
    uses_teacher: bool = True
    needs_head: bool = False
    head_bias: bool = True
    needs_pos_grad: bool = False

    def __repr__(self) -> str:
        return f"<KD strategy {self.name}>"

    def teacher_targets(self, teacher: AtomisticModel, batch: Batch) -> TeacherTargets:
        """The live teacher's (detached) targets on `batch`; no graph is kept."""
        with torch.no_grad():  # fairchem turns grad back on where its forces need it
            output = teacher(batch, taps=self.teacher_taps)
        features = self.target_features(output, batch.pos.shape[0])
        return TeacherTargets(output.energy.detach(), output.forces.detach(),
                              None if features is None else features.detach())

    def target_features(self, teacher_output: ModelOutput, n_atoms: int) -> torch.Tensor | None:
        """The per-atom feature target from a teacher forward with `teacher_taps` (None: no feature target)."""
        return None

    def settings(self) -> dict[str, object]:
        """The strategy's own settings (its constructor's arguments, e.g. hessian's k and seed), which shape what
        a teacher cache stores."""
        return {name: value for name, value in vars(self).items() if not callable(value)}

    def cache_fields(self) -> tuple[str, ...]:
        """Per-atom arrays of `TeacherTargets` (first dim N) a teacher cache stores besides energy and forces."""
        return ()

    def head(self, student_dim: int | None = None, teacher_dim: int | None = None) -> KDHead:
        """This strategy's `KDHead` for student/teacher feature widths (used only when `needs_head`)."""
        tap = self.student_taps[0] if self.student_taps else None
        projection = nn.Linear(student_dim, teacher_dim, bias=self.head_bias) if self.needs_head else None
        return KDHead(tap, projection)

    def loss(self, student: AtomisticModel, batch: Batch, student_output: ModelOutput, mapped: torch.Tensor | None,
             targets: TeacherTargets, system_weights: torch.Tensor | None, *, loss: str,
             l0_weights: LossWeights) -> torch.Tensor:
        """L_KD for one batch (a scalar).

        Args:
            student: the student whose forward gave `student_output` (with `student_taps`) on `batch`.
            mapped: the `KDHead`'s output on `student_output`, computed by the caller.
            targets: from a `TargetSource` for the same batch.
            system_weights: (S,) per-system weights, None for all 1.
            loss: feature loss, "mse" or "mae"; l0_weights: energy/force weights of L0-like losses.
        """
        raise NotImplementedError

    def missing_tap(self, student: AtomisticModel | None, teacher: AtomisticModel | None) -> str | None:
        """"ROLE MODEL has no TAP-WORDS" for the first tap the pair lacks, None if it has them all (a side given
        as None is not checked)."""
        for role, model, taps in (("student", student, self.student_taps), ("teacher", teacher, self.teacher_taps)):
            missing = [tap for tap in taps if model is not None and tap not in model.implemented_taps]
            if missing:
                return f"{role} {model.name} has no {_TAP_WORDS[missing[0]]}"
        return None


def default_kd_lambda(teacher_name: str, student_name: str, strategy: KDStrategy, *,
                      dataset: str = "oc20") -> float | None:
    """lambda of the paper's Table 7 for the pair and strategy (configs/kd-lambda.yml, shipped as the resource
    kd-lambda.yml), None if it has none.

    Names are model names ("gemnet-oc", "painn-big", "painn-small", "schnet"; "_" counts as "-").
    """
    table = yaml.safe_load(resource_path("kd-lambda.yml").read_text())

    def key(name: str) -> str:
        return name.lower().replace("_", "-")

    value = table.get(dataset, {}).get(key(teacher_name), {}).get(key(student_name), {}).get(strategy.name)
    return None if value is None else float(value)
