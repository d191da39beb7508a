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
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from ase import Atoms

from kdaug.data.convert import fixed_mask
from kdaug.models.protocol import AtomisticModel, new_trajectories
from kdaug.relax.optimizers import OPTIMIZERS, Optimizer
from kdaug.state import BatchState, segment_max, split_atoms

logger = logging.getLogger(__name__)
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass
class RelaxTask:
    """A system to relax, a label-less frame: positions (n,3) A, atomic_numbers (n,), cell (3,3) A, tags (n,),
    fixed (n,) bool; `payload` rides along untouched. Build it with `RelaxTask.from_atoms`."""

    sid: int
    positions: np.ndarray
    atomic_numbers: np.ndarray
    cell: np.ndarray
    tags: np.ndarray
    fixed: np.ndarray
    payload: Any = None

    @classmethod
    def from_atoms(cls, atoms: Atoms, *, sid: int, payload: Any = None) -> RelaxTask:
        """The structure of `atoms` (copied): tags from `atoms`, fixed atoms from its FixAtoms constraints."""
        return cls(sid=int(sid), positions=np.array(atoms.positions, dtype=np.float64),
                   atomic_numbers=np.array(atoms.numbers, dtype=np.int64), cell=np.array(atoms.cell, dtype=np.float64),
                   tags=np.array(atoms.get_tags(), dtype=np.int64), fixed=fixed_mask(atoms), payload=payload)

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
    """One finished relaxation: the evaluations `keep` chose and the last one; energies (eV) and largest
    free-atom forces (eV/A) of every evaluation, in order."""

    task: RelaxTask
    kept: list[StepRecord]
    final: StepRecord
    energies: list[float]
    fmaxes: list[float]
    n_steps: int
    converged: bool
    finite: bool


@dataclass
class _Active:
    """Host bookkeeping of one system in the batch; `trajectory` names it to the model."""

    task: RelaxTask
    trajectory: int
    energies: list[float] = field(default_factory=list)
    fmaxes: list[float] = field(default_factory=list)
    kept: list[StepRecord] = field(default_factory=list)
    n_steps: int = 0


@dataclass
class _Flight:
    """The systems in the batch: `entries[k]` is system k of `state` (the optimizer's; None before the first)."""

    entries: list[_Active] = field(default_factory=list)
    state: BatchState | None = None


class ReadyTasks:
    """Tasks from `source` made ahead by a background thread (e.g. systems coming from sampling workers), at
    most `ahead` waiting; the relaxer takes the ready ones and waits only when it has nothing to step.

    Use as a context manager: leaving stops the thread after the item it is making. An exception raised by
    `source` is raised again by `take` in the consumer's thread.
    """

    _END = object()

    def __init__(self, source: Iterable[RelaxTask], *, ahead: int = 64) -> None:
        self._items: queue.Queue = queue.Queue(maxsize=max(1, ahead))
        self._stop = threading.Event()
        self._exhausted = False
        self._thread = threading.Thread(target=self._fill, args=(source,), name="kdaug-ready-tasks", daemon=True)
        self._thread.start()

    def _fill(self, source: Iterable[RelaxTask]) -> None:
        items = iter(source)
        try:
            for task in items:
                if not self._put(task):
                    return
            self._put(self._END)
        except BaseException as err:  # handed to the consumer, raised there
            self._put(err)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def take(self, block: bool) -> RelaxTask | None:
        """The next ready task; None when none is ready yet (`block=False`) or when `source` is exhausted."""
        if self._exhausted:
            return None
        try:
            item = self._items.get(block=block)
        except queue.Empty:
            return None
        if item is self._END or isinstance(item, BaseException):
            self._exhausted = True
            if item is not self._END:
                raise item
            return None
        return item

    def __enter__(self) -> ReadyTasks:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class _Queue:
    """The tasks not yet in the batch, with a look at the next one (without waiting for one, if asked)."""

    def __init__(self, tasks: Iterable[RelaxTask] | ReadyTasks) -> None:
        if isinstance(tasks, ReadyTasks):
            self._take = tasks.take
        else:
            iterator = iter(tasks)
            self._take = lambda block: next(iterator, None)
        self._next: RelaxTask | None = None

    def peek(self, block: bool = True) -> RelaxTask | None:
        if self._next is None:
            self._next = self._take(block)
        return self._next

    def pop(self) -> RelaxTask:
        task, self._next = self.peek(), None
        return task


def _keep_all(task: RelaxTask, step: int) -> bool:
    return True


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

    def run(self, tasks: Iterable[RelaxTask] | ReadyTasks, keep: Callable[[RelaxTask, int], bool] = _keep_all,
            ) -> Iterator[RelaxResult]:
        """Yield each system's result as soon as it finishes (completion order, not input order).

        From `ReadyTasks`, the batch takes the tasks that are ready and waits only when it is empty.
        `keep(task, step)` says which evaluations go into `RelaxResult.kept`.
        """
        waiting, flight = _Queue(tasks), _Flight()
        try:
            while self._refill(flight, waiting):
                trajectories = torch.tensor([entry.trajectory for entry in flight.entries])
                energy, forces = self._evaluate(flight.state.structure(), trajectories)
                if self.on_step is not None:
                    self.on_step(flight.state.n_systems, len(flight.state.positions))
                free_forces = forces.masked_fill(flight.state.fixed[:, None], 0.0)
                fmax = segment_max(free_forces.norm(dim=1), flight.state.system_idx, flight.state.n_systems)
                summary = torch.stack([energy, fmax]).cpu().numpy()  # the one host read per step
                results, forces = self._retire(flight, summary, forces, keep)
                yield from results
                if flight.entries:
                    forces = forces.masked_fill(flight.state.fixed[:, None], 0.0)
                    flight.state = self.optimizer.step(flight.state, forces)
                    for entry in flight.entries:
                        entry.n_steps += 1
        finally:  # also when the consumer stops early or a step raises
            self.model.end_trajectories(entry.trajectory for entry in flight.entries)

    # -- the steps of `run` ----------------------------------------------------------------
    def _refill(self, flight: _Flight, waiting: _Queue) -> bool:
        """Move waiting tasks into the batch while it has room; False when no work is left."""
        joined: list[RelaxTask] = []
        n_atoms = sum(entry.task.n_atoms for entry in flight.entries)
        while (len(flight.entries) + len(joined) < self.max_systems
               and (task := waiting.peek(block=not (flight.entries or joined))) is not None):
            if self.max_atoms is not None and (flight.entries or joined) and n_atoms + task.n_atoms > self.max_atoms:
                break
            joined.append(waiting.pop())
            n_atoms += task.n_atoms
        if joined:
            self.model.check_elements(np.unique(np.concatenate([t.atomic_numbers for t in joined])))
            fresh = self.optimizer.init(BatchState.from_frames(joined, device=self.device))
            flight.state = fresh if flight.state is None else type(fresh).concat([flight.state, fresh])
            flight.entries += [_Active(t, int(k)) for t, k in zip(joined, new_trajectories(len(joined)))]
        return bool(flight.entries)

    def _retire(self, flight: _Flight, summary: np.ndarray, forces: torch.Tensor,
                keep: Callable[[RelaxTask, int], bool]) -> tuple[list[RelaxResult], torch.Tensor]:
        """Record this evaluation (summary: (2, S) energy, fmax on the host; raw forces (N,3)) and take
        finished systems out of the batch; returns their results and the forces of the systems that stay."""
        finished = np.zeros(len(flight.entries), dtype=bool)
        kept = np.zeros(len(flight.entries), dtype=bool)
        for k, entry in enumerate(flight.entries):
            energy, fmax = float(summary[0, k]), float(summary[1, k])
            entry.energies.append(energy)
            entry.fmaxes.append(fmax)
            finite = np.isfinite(energy) and np.isfinite(fmax)
            finished[k] = not finite or fmax < self.fmax or entry.n_steps >= self.max_steps
            kept[k] = keep(entry.task, entry.n_steps)
        results = []
        for k, record in self._records(flight, forces, finished | kept).items():
            entry = flight.entries[k]
            if kept[k]:
                entry.kept.append(record)
            if finished[k]:
                results.append(RelaxResult(
                    task=entry.task, kept=entry.kept, final=record, energies=entry.energies, fmaxes=entry.fmaxes,
                    n_steps=entry.n_steps, converged=bool(summary[1, k] < self.fmax),
                    finite=bool(np.isfinite(summary[:, k]).all())))
        if finished.any():
            stay = torch.as_tensor(~finished, device=self.device)
            forces = forces[stay[flight.state.system_idx]]
            flight.state = flight.state.select(stay)
            self.model.end_trajectories(entry.trajectory for entry, done in zip(flight.entries, finished) if done)
            flight.entries = [entry for entry, done in zip(flight.entries, finished) if not done]
        return results, forces

    def _records(self, flight: _Flight, forces: torch.Tensor, wanted: np.ndarray) -> dict[int, StepRecord]:
        """StepRecords of the `wanted` systems at this evaluation, copied to the host in one transfer."""
        if not wanted.any():
            return {}
        atom_mask = torch.as_tensor(wanted, device=self.device)[flight.state.system_idx]
        host = torch.cat([flight.state.positions[atom_mask], forces[atom_mask]], dim=1).cpu().numpy()
        indices = np.flatnonzero(wanted)
        parts = split_atoms(host, [flight.entries[k].task.n_atoms for k in indices])
        return {int(k): StepRecord(flight.entries[k].n_steps, part[:, :3], flight.entries[k].energies[-1], part[:, 3:])
                for k, part in zip(indices, parts)}

    # -- model evaluation with OOM back-off ----------------------------------------------
    def _evaluate(self, structure: BatchState, trajectories: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Energy (S,) eV and forces (N,3) eV/A in float64 of the systems of `structure`, the trajectories (S,)
        (on the host) named to the model; on out-of-memory, halve `max_systems` and retry."""
        n_systems = structure.n_systems
        if n_systems > self.max_systems:
            return self._evaluate_in_chunks(structure, trajectories)
        try:
            batch = structure.to_batch(dtype=self.dtype)
            batch.trajectory = trajectories
            with torch.no_grad():
                out = self.model(batch)
            return out.energy.detach().double(), out.forces.detach().double()
        except OutOfMemoryError:
            if n_systems == 1:
                raise
            self.max_systems = n_systems // 2
            logger.warning("out of memory with %d systems; batch limit now %d", n_systems, self.max_systems)
            return self._evaluate_in_chunks(structure, trajectories)

    def _evaluate_in_chunks(self, structure: BatchState, trajectories: torch.Tensor,
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.max_systems
        chunk = torch.arange(structure.n_systems) // size
        parts = [self._evaluate(structure.select((chunk == c).to(self.device)), trajectories[chunk == c])
                 for c in range(-(-structure.n_systems // size))]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
