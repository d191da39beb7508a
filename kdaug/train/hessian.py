"""Hessian distillation, `--kd hessian` (Amin, Raja, Krishnapriyan, ICLR 2025, arXiv 2501.09009).

The student's Hessian-vector products H v (H = d2E/dx2 = -dF/dx, eV/A^2) are matched to the teacher's for
k random unit vectors v per sample over its free atoms, at most `max_atoms` of them (the budget on cost).
H v is -d(F . v)/dx: by double backward for differentiable teachers (`AtomisticModel.differentiable`) and
the student (through the graph of its forces, gradient or direct, so the loss trains it), by central
differences of the forces for label-only teachers (EMT, CHGNet through ASE).
"""

from __future__ import annotations

import numpy as np
import torch
from torch_geometric.data import Batch

from kdaug.errors import KdaugError
from kdaug.models.protocol import AtomisticModel, ModelOutput
from kdaug.train.kd import FEATURE_LOSSES, KDStrategy, TeacherTargets
from kdaug.train.losses import LossWeights


def probe_vectors(batch: Batch, k: int, seed: int, max_atoms: int) -> torch.Tensor:
    """(N, k, 3): per sample, k random vectors of unit length over the sample, zero on fixed atoms.

    A sample with more than `max_atoms` free atoms gets vectors on `max_atoms` of them, chosen at random.
    Each sample's draw is seeded by (seed, batch.dataset_idx[s], batch.local_idx[s]) alone, so it is the
    same in any batch, on any rank, live or cached.
    """
    if "dataset_idx" not in batch or "local_idx" not in batch:
        msg = "--kd hessian: batch has no dataset_idx/local_idx (expected a training batch of kdaug.data.training_set)"
        raise KdaugError(msg)
    free = (batch.fixed == 0).cpu().numpy()
    bounds = batch.ptr.tolist()
    vectors = np.zeros((len(free), k, 3))
    for start, stop, dataset_idx, local_idx in zip(bounds[:-1], bounds[1:], batch.dataset_idx.tolist(),
                                                   batch.local_idx.tolist()):
        rng = np.random.default_rng([seed, dataset_idx, local_idx])
        atoms = np.flatnonzero(free[start:stop])
        if len(atoms) > max_atoms:
            atoms = np.sort(rng.choice(atoms, size=max_atoms, replace=False))
        if len(atoms) == 0:
            continue
        draw = rng.standard_normal((len(atoms), k, 3))
        vectors[start + atoms] = draw / np.linalg.norm(draw, axis=(0, 2), keepdims=True)
    return torch.from_numpy(vectors).to(device=batch.pos.device, dtype=batch.pos.dtype)


def student_hvp(batch: Batch, forces: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """(N, k, 3) H v = -d(F . v)/dx of `forces` (N, 3) w.r.t. `batch.pos`, with the graph kept (trainable)."""
    if not batch.pos.requires_grad:
        msg = "--kd hessian: batch.pos does not require grad; call batch.pos.requires_grad_(True) before the forward"
        raise KdaugError(msg)
    columns = [torch.autograd.grad((forces * vectors[:, j]).sum(), batch.pos, create_graph=True)[0]
               for j in range(vectors.shape[1])]
    return -torch.stack(columns, dim=1)


def _autograd(model: AtomisticModel, batch: Batch, vectors: torch.Tensor) -> tuple[torch.Tensor, ModelOutput]:
    batch = batch.clone()  # the caller's positions keep requires_grad as they were
    batch.pos = batch.pos.detach().requires_grad_(True)
    with torch.enable_grad():
        output = model(batch)
        columns = [torch.autograd.grad((output.forces * vectors[:, j]).sum(), batch.pos, retain_graph=True)[0]
                   for j in range(vectors.shape[1])]
    return -torch.stack(columns, dim=1), output


def hvp_autograd(model: AtomisticModel, batch: Batch, vectors: torch.Tensor) -> torch.Tensor:
    """(N, k, 3) H v = -d(F . v)/dx by double backward, for a model whose forces carry a graph to pos."""
    return _autograd(model, batch, vectors)[0]


def hvp_finite_difference(model: AtomisticModel, batch: Batch, vectors: torch.Tensor,
                          eps: float = 1e-3) -> torch.Tensor:
    """(N, k, 3) H v ~ -(F(x + eps v) - F(x - eps v)) / (2 eps), eps in Angstrom.

    One forward per sign and vector, all samples of the batch displaced at once; positions are displaced in
    the model's precision (float64 for calculators), so float32 batches lose nothing to rounding.
    """
    dtype = model.dtype
    displaced = batch.clone()
    displaced.cell = batch.cell.to(dtype)
    pos = batch.pos.detach().to(dtype)
    columns = []
    with torch.no_grad():
        for j in range(vectors.shape[1]):
            step = eps * vectors[:, j].to(dtype)
            displaced.pos = pos + step
            plus = model(displaced).forces.to(dtype)
            displaced.pos = pos - step
            minus = model(displaced).forces.to(dtype)
            columns.append(-(plus - minus) / (2 * eps))
    return torch.stack(columns, dim=1).to(batch.pos.dtype)


class HessianKD(KDStrategy):
    """`--kd hessian`: weighted MSE (or MAE, --kd-loss mae) between the student's and the teacher's H v.

    Each free atom's error is averaged over its (k, 3) entries and carries its system's weight; the loss is
    the mean over the free atoms of the batch (fixed atoms never move, so their rows do not count).

    Args:
        k: probe vectors per sample.
        max_atoms: free atoms per sample a vector is supported on, at most.
        eps: central-difference step (Angstrom) for label-only teachers.
        seed: seeds the vectors, with each sample's dataset and frame index.
    """

    name = "hessian"
    needs_pos_grad = True

    def __init__(self, k: int = 2, max_atoms: int = 32, eps: float = 1e-3, seed: int = 0) -> None:
        for label, value, least in (("k", k, 1), ("max_atoms", max_atoms, 1), ("seed", seed, 0)):
            if not isinstance(value, int) or value < least:
                msg = f"--kd hessian: {label} {value!r}: expected an integer >= {least}"
                raise KdaugError(msg)
        if not eps > 0:
            msg = f"--kd hessian: eps {eps!r}: expected a step > 0 Angstrom"
            raise KdaugError(msg)
        self.k, self.max_atoms, self.eps, self.seed = k, max_atoms, float(eps), seed

    def cache_fields(self) -> tuple[str, ...]:
        return ("hessian_vectors", "hessian_hv")

    def teacher_targets(self, teacher: AtomisticModel, batch: Batch) -> TeacherTargets:
        """The teacher's energy, forces and H v on this batch's probe vectors (all detached)."""
        vectors = probe_vectors(batch, self.k, self.seed, self.max_atoms)
        if teacher.differentiable:
            hv, output = _autograd(teacher, batch, vectors)
        else:
            hv = hvp_finite_difference(teacher, batch, vectors, self.eps)
            with torch.no_grad():
                output = teacher(batch)
        return TeacherTargets(energy=output.energy.detach(), forces=output.forces.detach(),
                              extras={"hessian_vectors": vectors, "hessian_hv": hv.detach()})

    def loss(self, student: AtomisticModel, batch: Batch, student_output: ModelOutput,
             mapped: torch.Tensor | None, targets: TeacherTargets, system_weights: torch.Tensor | None,
             *, loss: str, l0_weights: LossWeights) -> torch.Tensor:
        if loss not in FEATURE_LOSSES:
            msg = f"--kd-loss {loss}: expected one of {', '.join(FEATURE_LOSSES)}"
            raise KdaugError(msg)
        missing = [name for name in self.cache_fields() if name not in targets.extras]
        if missing:
            msg = f"--kd hessian: the teacher targets have no {missing[0]} (a teacher cache made for another --kd?)"
            raise KdaugError(msg)
        forces = student_output.forces
        vectors = targets.extras["hessian_vectors"].to(forces)
        target = targets.extras["hessian_hv"].to(forces)
        if vectors.shape != (forces.shape[0], vectors.shape[1], 3) or target.shape != vectors.shape:
            msg = (f"--kd hessian: teacher vectors {tuple(vectors.shape)} and H v {tuple(target.shape)} do not fit "
                   f"the batch's {forces.shape[0]} atoms as (N, k, 3)")
            raise KdaugError(msg)
        error = student_hvp(batch, forces, vectors) - target
        per_atom = (error.abs() if loss == "mae" else error.square()).reshape(error.shape[0], -1).mean(dim=1)
        if system_weights is not None:
            per_atom = per_atom * system_weights[batch.batch]
        free = batch.fixed == 0
        return per_atom[free].sum() / free.sum().clamp_min(1)
