"""S2EF metrics of a model on frame LMDBs (`kdaug evaluate`), after fairchem's `modules/evaluator.py`.

Definitions (fairchem's, with its default `eval_on_free_atoms`: forces of fixed atoms are dropped):
- energy MAE: mean over systems of |E - E_target| (reported in meV);
- force MAE: mean over the x, y and z components of all free atoms of |F - F_target| (fairchem's
  `forces_mae`, the mean of forcesx/y/z MAE; reported in meV/Angstrom);
- force cosine: mean over free atoms of the cosine similarity of the predicted and target force vectors;
- EFwT: share of systems with |E - E_target| < 0.02 eV and every free-atom force component error
  < 0.03 eV/Angstrom. Where fairchem fails on a system without free atoms, its force condition holds here.
Sums accumulate over batches, so the metrics are over the whole set (not means of batch means).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from tqdm import tqdm

from kdaug.data.batch import make_batch
from kdaug.data.run_record import check_input_paths
from kdaug.data.training_set import TrainingSet, collate
from kdaug.errors import KdaugError
from kdaug.models.protocol import AtomisticModel
from kdaug.models.registry import check_device

ENERGY_THRESHOLD_EV = 0.02
FORCE_THRESHOLD_EV_PER_ANG = 0.03


@dataclass
class MetricSums:
    """Additive totals behind the metrics (sum them over batches or DDP ranks)."""

    n_systems: int = 0
    n_free_atoms: int = 0
    n_within_threshold: int = 0
    energy_abs_error_ev: float = 0.0  # summed over systems
    force_abs_error_ev_per_ang: float = 0.0  # summed over free-atom components
    force_cosine: float = 0.0  # summed over free atoms

    def __iadd__(self, other: MetricSums) -> MetricSums:
        for field in fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
        return self

    def metrics(self) -> dict[str, float | int | None]:
        """n_samples, n_free_atoms, energy_mae_mev, force_mae_mev_per_ang, force_cos, efwt
        (force metrics None without free atoms)."""
        free = self.n_free_atoms
        return {
            "n_samples": self.n_systems,
            "n_free_atoms": free,
            "energy_mae_mev": 1000.0 * self.energy_abs_error_ev / self.n_systems,
            "force_mae_mev_per_ang": 1000.0 * self.force_abs_error_ev_per_ang / (3 * free) if free else None,
            "force_cos": self.force_cosine / free if free else None,
            "efwt": self.n_within_threshold / self.n_systems,
        }


class MetricAccumulator:
    """Per-origin `MetricSums`, updated batch by batch."""

    def __init__(self) -> None:
        self.sums: dict[str, MetricSums] = {}

    def update(
        self,
        energy: torch.Tensor,
        energy_target: torch.Tensor,
        forces: torch.Tensor,
        forces_target: torch.Tensor,
        natoms: torch.Tensor,
        fixed: torch.Tensor,
        origin: Sequence[str] | None = None,
    ) -> None:
        """Add a batch; shapes as in `metrics_from_predictions`."""
        energy_error = (energy.detach().double().cpu() - energy_target.double().cpu()).abs()
        forces, forces_target = forces.detach().double().cpu(), forces_target.double().cpu()
        natoms, free = natoms.cpu().long(), ~fixed.cpu().bool()
        n_systems = len(natoms)
        system_idx = torch.repeat_interleave(torch.arange(n_systems), natoms)[free]
        force_error = (forces - forces_target).abs()[free]
        cosine = torch.cosine_similarity(forces[free], forces_target[free], dim=1)

        def per_system(values: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
            out = torch.zeros(n_systems, dtype=values.dtype)
            return out.scatter_reduce(0, system_idx, values, reduce=reduce, include_self=True)

        n_free = per_system(torch.ones(len(system_idx), dtype=torch.long))
        abs_error = per_system(force_error.sum(dim=1))
        cosine_sum = per_system(cosine)
        max_error = per_system(force_error.amax(dim=1), "amax")
        within = (energy_error < ENERGY_THRESHOLD_EV) & (max_error < FORCE_THRESHOLD_EV_PER_ANG)
        origins = list(origin) if origin is not None else ["all"] * n_systems
        for name in dict.fromkeys(origins):
            mask = torch.tensor([o == name for o in origins])
            part = MetricSums(
                n_systems=int(mask.sum()),
                n_free_atoms=int(n_free[mask].sum()),
                n_within_threshold=int(within[mask].sum()),
                energy_abs_error_ev=float(energy_error[mask].sum()),
                force_abs_error_ev_per_ang=float(abs_error[mask].sum()),
                force_cosine=float(cosine_sum[mask].sum()),
            )
            self.sums.setdefault(name, MetricSums())
            self.sums[name] += part

    def result(self) -> dict[str, Any]:
        """The metrics over everything seen, plus `per_origin` (origin -> metrics) when origins mix."""
        if not self.sums:
            msg = "no predictions to compute metrics from"
            raise ValueError(msg)
        total = MetricSums()
        for part in self.sums.values():
            total += part
        report: dict[str, Any] = total.metrics()
        if len(self.sums) > 1:
            report["per_origin"] = {name: self.sums[name].metrics() for name in sorted(self.sums)}
        return report


def metrics_from_predictions(
    energy: torch.Tensor,
    energy_target: torch.Tensor,
    forces: torch.Tensor,
    forces_target: torch.Tensor,
    natoms: torch.Tensor,
    fixed: torch.Tensor,
    origin: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Metrics of predictions against labels (see the module docstring).

    Args:
        energy, energy_target: (S,) eV.
        forces, forces_target: (N, 3) eV/Angstrom, systems in order.
        natoms: (S,) atoms per system.
        fixed: (N,) bool; fixed atoms are left out of the force metrics.
        origin: (S,) origin name of each system; a `per_origin` breakdown is added when several occur.

    Returns:
        n_samples, n_free_atoms, energy_mae_mev, force_mae_mev_per_ang, force_cos, efwt [, per_origin].
    """
    accumulator = MetricAccumulator()
    accumulator.update(energy, energy_target, forces, forces_target, natoms, fixed, origin)
    return accumulator.result()


def evaluate(
    model: AtomisticModel,
    dataset_paths: Sequence[str | os.PathLike],
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Metrics of `model` on the frames under `dataset_paths` (`metrics_from_predictions` keys) plus
    samples_per_s (samples over the seconds spent in the model's forward, data loading excluded),
    model, data and device.

    Raises:
        KdaugError: a --data path is missing or empty, --batch-size < 1, --device cuda without a GPU.
    """
    check_input_paths([("--data", path) for path in dataset_paths])
    if batch_size < 1:
        msg = f"--batch-size {batch_size}: expected a positive number of samples"
        raise KdaugError(msg)
    device = check_device(device)
    dataset = TrainingSet(dataset_paths, flags=("--data", "--data"))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    was_training = model.training
    model = model.to(device).eval()
    try:
        accumulator, seconds = _predict(model, loader, device, progress)
    finally:
        model.train(was_training)
        dataset.close()
    return {
        "model": model.name,
        "data": [str(path) for path in dataset_paths],
        "device": str(device),
        **accumulator.result(),
        "samples_per_s": len(dataset) / seconds if seconds > 0 else None,
    }


def _predict(model: AtomisticModel, loader: torch.utils.data.DataLoader, device: torch.device,
             progress: bool) -> tuple[MetricAccumulator, float]:
    """Metric sums of `model` over `loader`, and the seconds spent in its forward passes."""
    accumulator = MetricAccumulator()
    seconds = 0.0
    for batch in tqdm(loader, desc="evaluate", unit=" batches", disable=not progress):
        inputs = make_batch(
            pos=batch.pos.to(device=device, dtype=model.dtype),
            atomic_numbers=batch.atomic_numbers,
            cell=batch.cell,
            natoms=batch.natoms,
            tags=batch.tags,
            fixed=batch.fixed,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            output = model(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        accumulator.update(output.energy, batch.y, output.forces, batch.force, batch.natoms, batch.fixed,
                           batch.origin)
    return accumulator, seconds
