"""Adversarial perturbations: climb the teacher-student disagreement (paper, Appendix D.1).

Per batch, delta starts at 0 (or small noise) and, `steps` times,

    delta <- delta + step_rule(grad_delta  L0(f_s(X + delta), f_t(X + delta)) [* exp(-(E_t(X+delta) - E_t(X)) / kT)])

with L0 = alpha_E |E_s - E_t| + alpha_F mean_atoms |F_s - F_t|_2 per system. Only
free atoms move; each atom's displacement is clipped to `max_displacement`.
`adversarial_perturb` works on a batch (usable from a training loop);
`run_adversarial` reads frames, filters and labels the results, and writes them.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch_geometric.data import Batch
from tqdm import tqdm

from kdaug.config import check_values, option
from kdaug.data.batch import batch_from_frames, make_batch
from kdaug.data.lmdb import FrameDataset, LmdbWriter
from kdaug.errors import KdaugError
from kdaug.models import AtomisticModel, load_model, load_teacher
from kdaug.perturb.common import (
    PerturbOptions,
    check_inputs,
    check_output_not_input,
    data_options,
    derived_frame,
    label,
    pending_chunks,
    select_indices,
    too_close,
)
from kdaug.relax.optimizers import segment_sum

logger = logging.getLogger(__name__)
STEP_RULES = ("gradient", "normalized")


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


def discrepancy(student_out, teacher_out, batch: Batch, params: AttackParams) -> torch.Tensor:
    """(S,) L0 between student and teacher predictions per system."""
    n_systems = len(batch.natoms)
    energy_term = (student_out.energy - teacher_out.energy).abs()
    force_error = (student_out.forces - teacher_out.forces).norm(dim=1)
    force_term = segment_sum(force_error, batch.batch, n_systems) / batch.natoms
    return params.energy_weight * energy_term + params.force_weight * force_term


def adversarial_perturb(batch: Batch, student: AtomisticModel, teacher: AtomisticModel, params: AttackParams,
                        *, generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[float]]:
    """Adversarial positions (N,3) for `batch` and the mean discrepancy before each step and after the last."""
    check_attack(student, teacher, params)
    base = batch.pos.detach()
    free = (~batch.fixed.bool())[:, None].to(base.dtype)
    n_systems = len(batch.natoms)
    system_idx = batch.batch
    delta = torch.zeros_like(base)
    if params.random_start > 0:
        noise = torch.randn(base.shape, generator=generator, dtype=base.dtype, device="cpu").to(base.device)
        delta = params.random_start * noise * free
    with torch.no_grad():
        start_energy = teacher(batch).energy.detach() if params.kT else None
    history = []
    for _ in range(params.steps + 1):
        delta = delta.detach().requires_grad_(True)
        moved = make_batch(base + delta, batch.atomic_numbers, batch.cell, batch.natoms, batch.tags, batch.fixed)
        teacher_out = teacher(moved)
        loss = discrepancy(student(moved), teacher_out, moved, params)
        history.append(float(loss.detach().mean()))
        if len(history) > params.steps:
            break
        objective = loss
        if params.kT:
            objective = loss * torch.exp(-(teacher_out.energy - start_energy) / params.kT)
        (grad,) = torch.autograd.grad(objective.sum(), delta)
        grad = grad * free
        if params.orthogonal_to_force:
            force = teacher_out.forces.detach() * free
            along = segment_sum((grad * force).sum(1), system_idx, n_systems)
            norm2 = segment_sum((force * force).sum(1), system_idx, n_systems).clamp_min(1e-12)
            grad = grad - (along / norm2)[system_idx, None] * force
        if params.step_rule == "normalized":
            step = params.alpha * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
        else:
            step = params.alpha * grad
        delta = delta.detach() + step * free
        length = delta.norm(dim=1, keepdim=True)
        delta = delta * (params.max_displacement / length.clamp_min(1e-12)).clamp_max(1.0)
    return (base + delta).detach(), history


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
    """Perturb, filter (min distance, min RMSD), label with the teacher and write; returns counts and the
    mean discrepancy per step over all batches."""
    if not Path(config.student).is_file():
        raise KdaugError(f"--student {config.student}: no such checkpoint (a student saved by kdaug or fairchem)")
    dataset = FrameDataset(config.input)
    check_output_not_input(config.input, config.out)
    teacher = load_teacher(config.teacher, config.checkpoint, device=config.device)
    student = load_model(None, checkpoint=config.student, device=config.device)
    params = config.params()
    check_attack(student, teacher, params)
    indices = select_indices(len(dataset), config.fraction, config.seed)
    check_inputs(dataset, indices, [teacher, student])
    options = data_options(config, teacher, dataset, student_sha256=student.checkpoint_sha256)
    counts = {"inputs": 0, "written": 0, "rejected_min_distance": 0, "rejected_near_duplicate": 0}
    step_sums = np.zeros(params.steps + 1)
    n_batches = 0
    with LmdbWriter(config.out, creation_args=dataclasses.asdict(config), data_options=options) as writer, \
            tqdm(total=len(indices), desc="adversarial", unit=" frames", disable=not progress) as bar:
        for chunk in pending_chunks(dataset, indices, writer, config.batch_size):
            frames = [frame for _, frame in chunk]
            batch = batch_from_frames(frames, device=config.device, dtype=teacher.dtype)
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + chunk[0][0])
            positions, history = adversarial_perturb(batch, student, teacher, params, generator=generator)
            step_sums += np.array(history)
            n_batches += 1
            positions = positions.double().cpu().numpy()
            bounds = np.cumsum([0, *(f.n_atoms for f in frames)])
            kept, reasons = [], {"rejected:min_distance": 0, "rejected:near_duplicate": 0}
            for k, frame in enumerate(frames):
                moved = positions[bounds[k]:bounds[k + 1]]
                free = ~frame.fixed
                rmsd = float(np.sqrt(((moved[free] - frame.positions[free]) ** 2).sum(1).mean())) if free.any() else 0.0
                if rmsd < config.min_rmsd:
                    reasons["rejected:near_duplicate"] += 1
                elif too_close(frame, moved, config.min_distance_factor):
                    reasons["rejected:min_distance"] += 1
                else:
                    kept.append((frame, moved, rmsd))
            labels = label([dataclasses.replace(f, positions=p) for f, p, _ in kept], teacher,
                           device=config.device) if kept else []
            details = {"step_rule": params.step_rule, "steps": params.steps, "alpha": params.alpha,
                       "orthogonal_to_force": params.orthogonal_to_force, "kT": params.kT,
                       "final_discrepancy": history[-1], "student": student.name}
            out_frames = [derived_frame(parent, moved, energy, forces, copy=0, copies=1, origin="adversarial",
                                        teacher=teacher, details={**details, "rmsd": rmsd})
                          for (parent, moved, rmsd), (energy, forces) in zip(kept, labels)]
            writer.write_batch(out_frames, done=[str(i) for i, _ in chunk],
                               counters={k: v for k, v in reasons.items() if v})
            counts["inputs"] += len(chunk)
            counts["written"] += len(out_frames)
            counts["rejected_min_distance"] += reasons["rejected:min_distance"]
            counts["rejected_near_duplicate"] += reasons["rejected:near_duplicate"]
            bar.update(len(chunk))
            bar.set_postfix(discrepancy=f"{history[0]:.3g}->{history[-1]:.3g}")
    dataset.close()
    counts["mean_discrepancy_per_step"] = (step_sums / max(n_batches, 1)).round(6).tolist()
    logger.info("adversarial: %s -> %s", counts, config.out)
    return counts
