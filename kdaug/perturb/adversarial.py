"""Adversarial perturbations: climb the teacher-student disagreement (paper, Appendix D.1).

Per system, delta starts at 0 (or small noise) and, `steps` times,

    delta <- delta + step_rule(grad_delta  L0(f_s(X + delta), f_t(X + delta)) [* exp(-(E_t(X+delta) - E_t(X)) / kT)])

with L0 = alpha_E |E_s - E_t| + alpha_F mean_atoms |F_s - F_t|_2 per system. Only
free atoms move; each atom's displacement is clipped to `max_displacement`.
`attack` works on a `BatchState` (`adversarial_perturb` on a model input `Batch`, for
a training loop); `run_adversarial` reads frames, filters and labels the results, and
writes them with per-frame provenance. Systems do not interact, and each input frame's
random start comes from its own generator seeded by (seed, input index), so the output
does not depend on `--batch-size`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch_geometric.data import Batch

from kdaug.config import check_values, option
from kdaug.data.lmdb import FrameDataset
from kdaug.errors import KdaugError
from kdaug.models import AtomisticModel, load_model, load_teacher
from kdaug.perturb.common import (
    PerturbOptions,
    check_paths,
    data_options,
    derived_frame,
    label,
    perturb_dataset,
    too_close,
)
from kdaug.state import BatchState, segment_sum, split_atoms
from kdaug.types import Frame

logger = logging.getLogger(__name__)
STEP_RULES = ("gradient", "normalized")
# The run's tally: the manifest's counters and the returned summary.
COUNTS = ("inputs", "written", "rejected_min_distance", "rejected_near_duplicate")


@dataclass(frozen=True)
class AttackParams:
    """How to climb the teacher-student disagreement (paper, Appendix D.1)."""

    steps: int = option(5, help="gradient-ascent steps")
    alpha: float = option(0.01, help="step size: Angstrom per unit gradient (gradient rule) or Angstrom per atom "
                                     "(normalized rule)")
    step_rule: str = option("gradient", help="gradient (alpha * g) or normalized (per-atom step of length alpha "
                                             "along g)")
    orthogonal_to_force: bool = option(False, help="remove the component of the step along the teacher force")
    random_start: float = option(0.0, help="standard deviation of a random initial displacement "
                                           "(0: start at delta = 0)", unit="Angstrom")
    max_displacement: float = option(0.2, help="clip each atom's total displacement to this norm", unit="Angstrom")
    kT: float | None = option(None, help="weight the objective by exp(-(E_t(X+delta) - E_t(X)) / kT) "
                                         "(unset: no weighting)", unit="eV")
    energy_weight: float = option(1.0, help="alpha_E of L0", unit="1/eV")
    force_weight: float = option(100.0, help="alpha_F of L0", unit="A/eV")

    def __post_init__(self) -> None:
        check_values(self, [
            (self.steps >= 0, "steps", "non-negative"),
            (self.alpha > 0, "alpha", "positive"),
            (self.max_displacement > 0, "max_displacement", "positive (Angstrom)"),
            (self.random_start >= 0, "random_start", "non-negative (Angstrom)"),
            (self.kT is None or self.kT > 0, "kT", "positive (eV)"),
            (self.step_rule in STEP_RULES, "step_rule", f"one of {', '.join(STEP_RULES)}"),
            (self.energy_weight >= 0, "energy_weight", "non-negative"),
            (self.force_weight >= 0, "force_weight", "non-negative"),
        ])


def check_attack(student: AtomisticModel, teacher: AtomisticModel, params: AttackParams) -> None:
    """Refuse label-only models and unknown step rules before any work is done."""
    for model in (student, teacher):
        if not model.differentiable:
            msg = (f"model {model.name} is label-only (no gradients w.r.t. positions); the adversarial search "
                   "needs differentiable student and teacher (e.g. chgnet or a GNN config with --checkpoint)")
            raise KdaugError(msg)
    if params.step_rule not in STEP_RULES:
        raise KdaugError(f"--step-rule {params.step_rule}: expected one of {', '.join(STEP_RULES)}")


def discrepancy(student_out, teacher_out, state: BatchState, params: AttackParams) -> torch.Tensor:
    """(S,) L0 between student and teacher predictions per system."""
    energy_term = (student_out.energy - teacher_out.energy).abs()
    force_error = (student_out.forces - teacher_out.forces).norm(dim=1)
    force_term = segment_sum(force_error, state.system_idx, state.n_systems) / state.n_atoms
    return params.energy_weight * energy_term + params.force_weight * force_term


@dataclass
class AttackResult:
    """positions (N,3) A after the search; discrepancy (steps + 1, S): each system's L0 before each step
    and after the last (detached)."""

    positions: torch.Tensor
    discrepancy: torch.Tensor


def attack(state: BatchState, student: AtomisticModel, teacher: AtomisticModel, params: AttackParams,
           *, noise: torch.Tensor | None = None) -> AttackResult:
    """Climb L0 from the positions of `state`; `noise` (N,3) standard-normal draws for the random start
    (needed when `params.random_start` > 0)."""
    check_attack(student, teacher, params)
    base = state.positions.detach()
    free = (~state.fixed)[:, None].to(base.dtype)
    delta = torch.zeros_like(base)
    if params.random_start > 0:
        if noise is None:
            raise ValueError("attack: random_start > 0 needs the noise (N, 3) to start from")
        delta = params.random_start * noise.to(base) * free
    with torch.no_grad():
        start_energy = teacher(state.to_batch()).energy.detach() if params.kT else None
    history = []
    for _ in range(params.steps + 1):
        delta = delta.detach().requires_grad_(True)
        moved = state.replace(positions=base + delta)
        inputs = moved.to_batch()
        teacher_out = teacher(inputs)
        loss = discrepancy(student(inputs), teacher_out, moved, params)
        history.append(loss.detach())
        if len(history) > params.steps:
            break
        objective = loss
        if params.kT:
            objective = loss * torch.exp(-(teacher_out.energy - start_energy) / params.kT)
        (grad,) = torch.autograd.grad(objective.sum(), delta)
        delta = delta.detach() + _ascent_step(grad * free, teacher_out.forces.detach() * free, state, params) * free
        length = delta.norm(dim=1, keepdim=True)
        delta = delta * (params.max_displacement / length.clamp_min(1e-12)).clamp_max(1.0)
    return AttackResult((base + delta).detach(), torch.stack(history))


def _ascent_step(grad: torch.Tensor, force: torch.Tensor, state: BatchState, params: AttackParams) -> torch.Tensor:
    """(N,3) step along `grad` (free atoms only), optionally without its part along the teacher `force`."""
    if params.orthogonal_to_force:
        along = segment_sum((grad * force).sum(1), state.system_idx, state.n_systems)
        norm2 = segment_sum((force * force).sum(1), state.system_idx, state.n_systems).clamp_min(1e-12)
        grad = grad - (along / norm2)[state.system_idx, None] * force
    if params.step_rule == "normalized":
        return params.alpha * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return params.alpha * grad


def adversarial_perturb(batch: Batch, student: AtomisticModel, teacher: AtomisticModel, params: AttackParams,
                        *, generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[float]]:
    """`attack` on a model input `batch`, the random start drawn from `generator` for the whole batch:
    adversarial positions (N,3) and the mean discrepancy before each step and after the last."""
    state = BatchState.from_batch(batch)
    noise = None
    if params.random_start > 0:
        noise = torch.randn(state.positions.shape, generator=generator, dtype=state.positions.dtype)
    result = attack(state, student, teacher, params, noise=noise)
    return result.positions, result.discrepancy.mean(dim=1).tolist()


def start_noise(sizes: Sequence[int], indices: Sequence[int], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """(N,3) standard-normal draws, frame by frame, from a generator seeded by (seed, input index)."""
    draws = []
    for n_atoms, index in zip(sizes, indices):
        child = int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])
        draws.append(torch.randn((n_atoms, 3), generator=torch.Generator().manual_seed(child), dtype=dtype))
    return torch.cat(draws)


@dataclass(frozen=True, kw_only=True)
class AdversarialConfig(AttackParams, PerturbOptions):
    """Options of `kdaug adversarial`: the attack's parameters, the shared perturbation options,
    the student and the near-duplicate filter."""

    # Options that shape the output, besides the teacher and student hashes and the input fingerprint.
    DATA_KEYS: ClassVar[tuple[str, ...]] = (
        *PerturbOptions.DATA_KEYS, *(f.name for f in dataclasses.fields(AttackParams)), "min_rmsd")

    student: str = option(help="student checkpoint (saved by kdaug or fairchem; its config is read from it)")
    teacher: str = option("chgnet", help="chgnet or a model config with --checkpoint (must be differentiable)")
    min_rmsd: float = option(0.005, help="drop frames within this RMSD of their parent (free atoms)",
                             unit="Angstrom")
    batch_size: int = option(4, help="frames per forward")

    def __post_init__(self) -> None:
        AttackParams.__post_init__(self)
        PerturbOptions.__post_init__(self)
        check_values(self, [(self.min_rmsd >= 0, "min_rmsd", "non-negative (Angstrom)")])

    def params(self) -> AttackParams:
        return AttackParams(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AttackParams)})


def run_adversarial(config: AdversarialConfig, *, progress: bool = True) -> dict:
    """Perturb, filter (min distance, min RMSD), label with the teacher and write; returns the counts of
    this run (as added to the manifest's counters) and the mean discrepancy per step over its frames."""
    check_paths(config, student=config.student)
    if not Path(config.student).is_file():
        raise KdaugError(f"--student {config.student}: no such checkpoint (a student saved by kdaug or fairchem)")
    dataset = FrameDataset(config.input)
    teacher = load_teacher(config.teacher, config.checkpoint, device=config.device)
    student = load_model(None, checkpoint=config.student, device=config.device)
    check_attack(student, teacher, config.params())
    step_sums = np.zeros(config.steps + 1)

    def work(chunk: list[tuple[int, Frame]]) -> tuple[list[Frame], dict[str, int]]:
        frames, tally, history = attack_chunk(chunk, student, teacher, config)
        step_sums[:] += history.sum(axis=1)
        return frames, tally

    options = data_options(config, teacher, dataset, student_sha256=student.checkpoint_sha256)
    counts = perturb_dataset(dataset, config, work, desc="adversarial", models=[teacher, student], options=options,
                             progress=progress)
    summary = {key: counts[key] for key in COUNTS}
    summary["mean_discrepancy_per_step"] = (step_sums / max(counts["inputs"], 1)).round(6).tolist()
    logger.info("adversarial: %s -> %s", summary, config.out)
    return summary


def attack_chunk(chunk: Sequence[tuple[int, Frame]], student: AtomisticModel, teacher: AtomisticModel,
                 config: AdversarialConfig) -> tuple[list[Frame], dict[str, int], np.ndarray]:
    """Attack the (input index, frame) pairs of `chunk` together; the labelled frames that pass the filters,
    the counts they add, and each frame's discrepancy per step ((steps + 1, len(chunk)))."""
    indices, parents = [i for i, _ in chunk], [frame for _, frame in chunk]
    params = config.params()
    state = BatchState.from_frames(parents, device=config.device, dtype=teacher.dtype)
    sizes = [frame.n_atoms for frame in parents]
    noise = start_noise(sizes, indices, config.seed, teacher.dtype) if params.random_start > 0 else None
    result = attack(state, student, teacher, params, noise=noise)
    history = result.discrepancy.double().cpu().numpy()
    tally = dict.fromkeys(COUNTS, 0) | {"inputs": len(chunk)}
    kept = []
    for k, moved in enumerate(split_atoms(result.positions.double().cpu().numpy(), sizes)):
        reason, rmsd = rejection(parents[k], moved, config)
        if reason:
            tally[reason] += 1
            continue
        details = {**dataclasses.asdict(params), "seed": config.seed, "input_index": indices[k],
                   "student": student.name, "rmsd": rmsd, "final_discrepancy": float(history[-1, k]),
                   "discrepancy_per_step": history[:, k].tolist()}
        kept.append((parents[k], moved, details))
    labels = label([dataclasses.replace(f, positions=p) for f, p, _ in kept], teacher, device=config.device)
    frames = [derived_frame(parent, moved, energy, forces, copy=0, copies=1, origin="adversarial", teacher=teacher,
                            details=details) for (parent, moved, details), (energy, forces) in zip(kept, labels)]
    tally["written"] = len(frames)
    return frames, tally, history


def rejection(parent: Frame, moved: np.ndarray, config: AdversarialConfig) -> tuple[str | None, float]:
    """Why the perturbed positions (n,3) are dropped (None: kept), and their RMSD over free atoms (A)."""
    free = ~parent.fixed
    rmsd = float(np.sqrt(((moved[free] - parent.positions[free]) ** 2).sum(1).mean())) if free.any() else 0.0
    if rmsd < config.min_rmsd:
        return "rejected_near_duplicate", rmsd
    if too_close(parent, moved, config.min_distance_factor):
        return "rejected_min_distance", rmsd
    return None, rmsd
