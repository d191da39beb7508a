"""`BatchedRelaxer`: relax many systems in shared model forwards, refilling the batch as systems finish.

Unlike fairchem's `ml_relax`, which masks converged systems and runs on half
empty, a system that converges (fmax over free atoms below `fmax`) or runs out
of steps leaves the batch and the next waiting system takes its place, so the
batch stays full while work remains. Each step reads one small per-system
tensor (energy, fmax) back to the host to decide who leaves; positions and forces
are copied back only for frames that are kept and for finished systems.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kdaug.data.batch import make_batch
from kdaug.models.protocol import AtomisticModel
from kdaug.relax.optimizers import OPTIMIZERS, Optimizer, OptimizerState, segment_max

logger = logging.getLogger(__name__)
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass
class RelaxTask:
    """A system to relax: positions (n,3) A, atomic_numbers (n,), cell (3,3) A, tags (n,), fixed (n,) bool."""

    sid: int
    positions: np.ndarray
    atomic_numbers: np.ndarray
    cell: np.ndarray
    tags: np.ndarray
    fixed: np.ndarray
    payload: Any = None

    @property
    def n_atoms(self) -> int:
        return len(self.atomic_numbers)


@dataclass
class StepRecord:
    """One teacher evaluation: positions (n,3) A, energy eV, raw forces (n,3) eV/A (fixed atoms too)."""

    step: int
    positions: np.ndarray
    energy: float
    forces: np.ndarray


@dataclass
class RelaxResult:
    task: RelaxTask
    kept: list[StepRecord]
    final: StepRecord
    energies: list[float]
    n_steps: int
    converged: bool
    finite: bool


@dataclass
class _Active:
    task: RelaxTask
    energies: list[float] = field(default_factory=list)
    kept: list[StepRecord] = field(default_factory=list)
    n_steps: int = 0


class BatchedRelaxer:
    """Relax systems with `model` as the energy/force source.

    Args:
        model: any `AtomisticModel` (GNN teachers batched; label-only ones loop inside).
        optimizer: "fire" or "lbfgs" (ASE's algorithms and defaults), or an `Optimizer`.
        fmax: convergence threshold on the largest free-atom force, eV/A.
        max_steps: optimizer steps per system at most (evaluations: max_steps + 1).
        max_systems: systems per forward at most.
        max_atoms: atoms per forward at most (None: no limit); a larger system runs alone.
        device: where the state and the model live.
        on_step: called after each forward with (n_systems, n_atoms) of that batch.
    """

    def __init__(self, model: AtomisticModel, *, optimizer: str | Optimizer = "fire", fmax: float = 0.05,
                 max_steps: int = 200, max_systems: int = 32, max_atoms: int | None = None,
                 device: str | torch.device = "cpu", on_step: Callable[[int, int], None] | None = None) -> None:
        self.model = model
        self.optimizer = OPTIMIZERS[optimizer]() if isinstance(optimizer, str) else optimizer
        self.fmax = fmax
        self.max_steps = max_steps
        self.max_systems = max_systems
        self.max_atoms = max_atoms
        self.device = torch.device(device)
        self.dtype = model.dtype
        self.on_step = on_step

    # -- model evaluation with OOM back-off ----------------------------------------------
    def _evaluate(self, pos, numbers, cell, natoms, tags, fixed) -> tuple[torch.Tensor, torch.Tensor]:
        n_systems = len(natoms)
        if n_systems > self.max_systems:
            return self._evaluate_in_chunks(pos, numbers, cell, natoms, tags, fixed)
        batch = make_batch(pos.to(self.dtype), numbers, cell, natoms, tags, fixed)
        try:
            with torch.no_grad():
                out = self.model(batch)
            return out.energy.detach().double(), out.forces.detach().double()
        except OutOfMemoryError:
            if n_systems == 1:
                raise
            self.max_systems = n_systems // 2
            logger.warning("out of memory with %d systems; batch limit now %d", n_systems, self.max_systems)
            return self._evaluate_in_chunks(pos, numbers, cell, natoms, tags, fixed)

    def _evaluate_in_chunks(self, pos, numbers, cell, natoms, tags, fixed) -> tuple[torch.Tensor, torch.Tensor]:
        bounds = [0, *torch.cumsum(natoms, 0).tolist()]
        parts = []
        for first in range(0, len(natoms), self.max_systems):
            last = min(first + self.max_systems, len(natoms))
            atoms = slice(bounds[first], bounds[last])
            parts.append(self._evaluate(pos[atoms], numbers[atoms], cell[first:last], natoms[first:last],
                                        tags[atoms], fixed[atoms]))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    # -- main loop ------------------------------------------------------------------------
    def run(self, tasks: Iterable[RelaxTask], keep: Callable[[RelaxTask, int], bool] = lambda task, step: True,
            ) -> Iterator[RelaxResult]:
        """Yield each system's result as soon as it finishes (completion order, not input order).

        `keep(task, step)` says which evaluations go into `RelaxResult.kept`.
        """
        pending = iter(tasks)
        waiting: RelaxTask | None = None
        exhausted = False
        active: list[_Active] = []
        dev = self.device
        pos = torch.zeros(0, 3, dtype=torch.float64, device=dev)
        numbers = torch.zeros(0, dtype=torch.long, device=dev)
        tags = torch.zeros(0, dtype=torch.long, device=dev)
        fixed = torch.zeros(0, dtype=torch.bool, device=dev)
        cell = torch.zeros(0, 3, 3, dtype=torch.float64, device=dev)
        natoms = torch.zeros(0, dtype=torch.long, device=dev)
        opt_state = OptimizerState()

        while True:
            # Refill: take waiting systems while the batch has room.
            joined = []
            n_atoms = int(sum(a.task.n_atoms for a in active))
            while not exhausted and len(active) + len(joined) < self.max_systems:
                if waiting is None:
                    waiting = next(pending, None)
                    if waiting is None:
                        exhausted = True
                        break
                if (self.max_atoms is not None and active + joined and
                        n_atoms + waiting.n_atoms > self.max_atoms):
                    break
                joined.append(waiting)
                n_atoms += waiting.n_atoms
                waiting = None
            if joined:
                self.model.check_elements(np.unique(np.concatenate([t.atomic_numbers for t in joined])))
                active += [_Active(t) for t in joined]
                pos = torch.cat([pos, *(torch.as_tensor(t.positions, dtype=torch.float64, device=dev) for t in joined)])
                numbers = torch.cat([numbers, *(torch.as_tensor(t.atomic_numbers, device=dev).long() for t in joined)])
                tags = torch.cat([tags, *(torch.as_tensor(t.tags, device=dev).long() for t in joined)])
                fixed = torch.cat([fixed, *(torch.as_tensor(t.fixed, device=dev).bool() for t in joined)])
                cell = torch.cat([cell, *(torch.as_tensor(t.cell, dtype=torch.float64, device=dev)[None]
                                          for t in joined)])
                natoms = torch.cat([natoms, torch.tensor([t.n_atoms for t in joined], device=dev)])
                opt_state = OptimizerState.concat([opt_state, *(self.optimizer.init(t.n_atoms, device=dev)
                                                                for t in joined)])
            if not active:
                return

            n_systems = len(active)
            system_idx = torch.repeat_interleave(torch.arange(n_systems, device=dev), natoms)
            energy, forces = self._evaluate(pos, numbers, cell, natoms, tags, fixed)
            if self.on_step is not None:
                self.on_step(n_systems, int(pos.shape[0]))
            free_forces = forces.masked_fill(fixed[:, None], 0.0)
            fmax = segment_max(free_forces.norm(dim=1), system_idx, n_systems)
            summary = torch.stack([energy, fmax]).cpu().numpy()  # the one host read per step

            finished = np.zeros(n_systems, dtype=bool)
            wanted = np.zeros(n_systems, dtype=bool)
            for k, entry in enumerate(active):
                e_k, fmax_k = float(summary[0, k]), float(summary[1, k])
                entry.energies.append(e_k)
                finite = np.isfinite(e_k) and np.isfinite(fmax_k)
                finished[k] = (not finite) or fmax_k < self.fmax or entry.n_steps >= self.max_steps
                wanted[k] = finished[k] or keep(entry.task, entry.n_steps)
            if wanted.any():
                bounds = np.concatenate([[0], np.cumsum([a.task.n_atoms for a in active])])
                rows = torch.as_tensor(np.concatenate([np.arange(bounds[k], bounds[k + 1])
                                                       for k in np.flatnonzero(wanted)]), device=dev)
                host = torch.cat([pos[rows], forces[rows]], dim=1).cpu().numpy()
                offset = 0
                for k in np.flatnonzero(wanted):
                    entry = active[k]
                    n = entry.task.n_atoms
                    record = StepRecord(entry.n_steps, host[offset:offset + n, :3], entry.energies[-1],
                                        host[offset:offset + n, 3:])
                    offset += n
                    if keep(entry.task, entry.n_steps):
                        entry.kept.append(record)
                    if finished[k]:
                        yield RelaxResult(
                            task=entry.task, kept=entry.kept, final=record, energies=entry.energies,
                            n_steps=entry.n_steps, converged=bool(summary[1, k] < self.fmax),
                            finite=bool(np.isfinite(summary[:, k]).all()),
                        )
            if finished.any():
                stay = torch.as_tensor(~finished, device=dev)
                atom_stay = stay[system_idx]
                active = [a for a, done in zip(active, finished) if not done]
                pos, numbers, tags, fixed = pos[atom_stay], numbers[atom_stay], tags[atom_stay], fixed[atom_stay]
                cell, natoms = cell[stay], natoms[stay]
                free_forces = free_forces[atom_stay]
                opt_state = opt_state.select(atom_stay, stay)
                n_systems = len(active)
                system_idx = torch.repeat_interleave(torch.arange(n_systems, device=dev), natoms)
            if not active:
                continue
            new_pos, opt_state = self.optimizer.step(pos, free_forces, system_idx, n_systems, opt_state)
            pos = torch.where(fixed[:, None], pos, new_pos)
            for entry in active:
                entry.n_steps += 1
