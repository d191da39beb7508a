"""Knowledge-distillation losses of the paper (Sec. 3): L = L0 + lambda L_KD with `--kd MODE`.

| mode     | teacher tap  | teacher target (per atom)                          | student tap | M_s                     |
| vanilla1 | -            | energy (S,) and forces (N,3): L0 against them      | -           | -                       |
| vanilla2 | atom_energy  | E_i (N,) eV; L_E (absolute error) per atom, eq. 8  | atom_energy | -                       |
| n2n      | node         | H_node (N,Dt)                                      | node        | Linear(Ds, Dt)          |
| e2n      | edge         | sum over edges into atom i of H_edge (N,Dt), eq. 5 | node        | Linear(Ds, Dt)          |
| v2v      | edge         | sum_j u_ij H_edge,ij per channel (N,3,Dt), eq. 6   | vector      | Linear(Ds, Dt, no bias) |

M_t is the identity. M_s (`KDHead`) is trained with the student and dropped at export. The feature modes
average `--kd-loss` (mse|mae) over each atom's feature entries, then over atoms, each atom carrying its
system's weight (the r_s/dft weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import yaml
from torch import nn
from torch_geometric.data import Batch

from kdaug.errors import KdaugError
from kdaug.models.protocol import AtomisticModel, EdgeFeatures, ModelOutput
from kdaug.resources import resource_path
from kdaug.train.losses import LossWeights, energy_force_loss

KD_MODES: tuple[str, ...] = ("none", "vanilla1", "vanilla2", "n2n", "e2n", "v2v")
FEATURE_LOSSES: tuple[str, ...] = ("mse", "mae")

# mode -> (teacher taps, student taps)
_TAPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "none": ((), ()),
    "vanilla1": ((), ()),
    "vanilla2": (("atom_energy",), ("atom_energy",)),
    "n2n": (("node",), ("node",)),
    "e2n": (("edge",), ("node",)),
    "v2v": (("edge",), ("vector",)),
}
_TAP_WORDS = {
    "atom_energy": "per-atom energies",
    "node": "scalar node features",
    "edge": "edge features (GemNet-OC has them)",
    "vector": "vector features (PaiNN with direct_forces has them)",
}


def check_mode(mode: str) -> str:
    if mode not in KD_MODES:
        msg = f"--kd {mode}: expected one of {', '.join(KD_MODES)}"
        raise KdaugError(msg)
    return mode


def required_taps(mode: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(teacher taps, student taps) a forward must ask for in `mode`."""
    return _TAPS[check_mode(mode)]


def possible_modes(student: AtomisticModel | None, teacher: AtomisticModel | None) -> list[str]:
    """The modes a pair can do (a side given as None is not checked)."""
    return [mode for mode, (teacher_taps, student_taps) in _TAPS.items()
            if (teacher is None or set(teacher_taps) <= teacher.implemented_taps)
            and (student is None or set(student_taps) <= student.implemented_taps)]


def check_kd_pair(mode: str, student: AtomisticModel | None, teacher: AtomisticModel | None) -> None:
    """One-line `KdaugError` naming --kd when the pair cannot do `mode`.

    Pass teacher=None when the targets come from a teacher cache (made for its mode), and
    student=None to check only the teacher (`kdaug teacher-cache`).
    """
    teacher_taps, student_taps = required_taps(mode)
    for role, model, taps in (("student", student, student_taps), ("teacher", teacher, teacher_taps)):
        missing = [tap for tap in taps if model is not None and tap not in model.implemented_taps]
        if missing:
            possible = ", ".join(possible_modes(student, teacher))
            msg = (f"--kd {mode}: {role} {model.name} has no {_TAP_WORDS[missing[0]]}; "
                   f"this pair can do --kd {possible}")
            raise KdaugError(msg)


@dataclass
class TeacherTargets:
    """What the student is distilled towards, for one batch.

    energy (S,) eV; forces (N, 3) eV/A; features: the mode's per-atom target -- vanilla2 atom
    energies (N,) eV, n2n node features (N, D), e2n edge features summed onto their target atoms
    (N, D), v2v sum_j u_ij H_edge,ij (N, 3, D) -- or None (none, vanilla1). extras: further per-atom
    arrays by name (first dim N), e.g. hessian's "hessian_vectors" and "hessian_hv" (N, k, 3).
    """

    energy: torch.Tensor
    forces: torch.Tensor
    features: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> TeacherTargets:
        features = None if self.features is None else self.features.to(device=device, dtype=dtype)
        extras = {name: value.to(device=device, dtype=dtype) for name, value in self.extras.items()}
        return TeacherTargets(self.energy.to(device=device, dtype=dtype), self.forces.to(device=device, dtype=dtype),
                              features, extras)


class TargetSource(Protocol):
    """Precomputed targets looked up by batch (e.g. `kdaug.train.teacher_cache.TeacherCache`)."""

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


def teacher_targets(mode: str, teacher_output: ModelOutput, n_atoms: int) -> TeacherTargets:
    """The (detached) targets of `mode` from a teacher forward that asked for `required_taps(mode)[0]`."""
    check_mode(mode)
    taps = teacher_output.taps
    if mode in ("vanilla2", "n2n"):
        features = taps[required_taps(mode)[0][0]]
    elif mode == "e2n":
        features = edge_to_node(taps["edge"], n_atoms)
    elif mode == "v2v":
        features = edge_to_vector(taps["edge"], n_atoms)
    else:
        features = None
    return TeacherTargets(
        energy=teacher_output.energy.detach(),
        forces=teacher_output.forces.detach(),
        features=None if features is None else features.detach(),
    )


def live_teacher_targets(mode: str, teacher: AtomisticModel, batch: Batch) -> TeacherTargets:
    """Teacher forward on `batch` (no graph kept) and its targets for `mode`."""
    with torch.no_grad():  # fairchem turns grad back on where its forces need it
        output = teacher(batch, taps=required_taps(mode)[0])
    return teacher_targets(mode, output, batch.pos.shape[0])


class KDHead(nn.Module):
    """M_s: maps the student's tap into the teacher target's space.

    n2n/e2n: a learned Linear(Ds, Dt); v2v: Linear(Ds, Dt) without bias on the channel (last) axis
    of (N, 3, Ds), which mixes channels only and so keeps the vectors equivariant; vanilla: identity.
    """

    def __init__(self, mode: str, student_dim: int | None = None, teacher_dim: int | None = None) -> None:
        super().__init__()
        self.mode = check_mode(mode)
        if mode in ("n2n", "e2n", "v2v"):
            self.projection: nn.Linear | None = nn.Linear(student_dim, teacher_dim, bias=mode != "v2v")
        else:
            self.projection = None

    def forward(self, student_output: ModelOutput) -> torch.Tensor | None:
        """The student's mapped features (N, ...) for the mode's loss, None for none/vanilla1."""
        student_taps = required_taps(self.mode)[1]
        if not student_taps:
            return None
        features = student_output.taps[student_taps[0]]
        return features if self.projection is None else self.projection(features)


def build_kd_head(mode: str, student: AtomisticModel, teacher: AtomisticModel | TargetSource,
                  sample_batch: Batch) -> KDHead:
    """A `KDHead` sized from one forward of `student` and of `teacher` on `sample_batch`.

    `teacher` is the live teacher or a `TargetSource` such as a teacher cache (the batch then needs
    dataset_idx/local_idx).
    """
    if mode not in ("n2n", "e2n", "v2v"):
        return KDHead(check_mode(mode))
    if isinstance(teacher, AtomisticModel):
        targets = live_teacher_targets(mode, teacher, sample_batch)
    else:
        targets = teacher.targets(sample_batch)
    with torch.no_grad():
        student_features = student(sample_batch, taps=required_taps(mode)[1]).taps[required_taps(mode)[1][0]]
    head = KDHead(mode, student_features.shape[-1], targets.features.shape[-1])
    return head.to(device=student.device, dtype=student.dtype)


def kd_loss(
    mode: str,
    head: KDHead,
    student_output: ModelOutput,
    targets: TeacherTargets,
    batch: Batch,
    system_weights: torch.Tensor | None,
    *,
    loss: str = "mse",
    l0_weights: LossWeights = LossWeights(),
) -> torch.Tensor:
    """L_KD of `mode` for one batch (a scalar; 0 for "none").

    Args:
        student_output: the student's forward with `required_taps(mode)[1]`.
        targets: from `teacher_targets` / `TeacherCache.targets` for the same batch.
        batch: the model input (batch (N,) system index, fixed (N,)).
        system_weights: (S,) per-system weights, None for all 1.
        loss: feature loss of n2n/e2n/v2v, "mse" or "mae". vanilla1 is L0 (`energy_force_loss`, with
            `l0_weights`) and vanilla2 the energy loss L_E (absolute error) per atom, as in the paper.
    """
    check_mode(mode)
    if loss not in FEATURE_LOSSES:
        msg = f"--kd-loss {loss}: expected one of {', '.join(FEATURE_LOSSES)}"
        raise KdaugError(msg)
    energy = student_output.energy
    if mode == "none":
        return energy.new_zeros(())
    if mode == "vanilla1":
        total, _ = energy_force_loss(energy, student_output.forces, targets.energy.to(energy.dtype),
                                     targets.forces.to(energy.dtype), batch.batch, batch.fixed == 0,
                                     system_weights, l0_weights)
        return total
    prediction = head(student_output)
    target = targets.features.to(device=prediction.device, dtype=prediction.dtype)
    if prediction.shape != target.shape:
        msg = (f"--kd {mode}: student features {tuple(prediction.shape)} do not match teacher targets "
               f"{tuple(target.shape)}")
        raise KdaugError(msg)
    error = prediction - target
    if mode == "vanilla2" or loss == "mae":
        per_atom = error.abs()
    else:
        per_atom = error.square()
    per_atom = per_atom.reshape(error.shape[0], -1).mean(dim=1)
    if system_weights is not None:
        per_atom = per_atom * system_weights[batch.batch]
    return per_atom.mean()


def default_kd_lambda(teacher_name: str, student_name: str, mode: str, *, dataset: str = "oc20") -> float | None:
    """lambda of the paper's Table 7 for the pair and mode (configs/kd-lambda.yml, shipped as the resource kd-lambda.yml), None if it has none.

    Names are model names ("gemnet-oc", "painn-big", "painn-small", "schnet"; "_" counts as "-").
    """
    table = yaml.safe_load(resource_path("kd-lambda.yml").read_text())

    def key(name: str) -> str:
        return name.lower().replace("_", "-")

    value = table.get(dataset, {}).get(key(teacher_name), {}).get(key(student_name), {}).get(check_mode(mode))
    return None if value is None else float(value)
