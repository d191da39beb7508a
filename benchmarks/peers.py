"""kdaug's relaxer side by side with the tools users would pick instead, on the same systems and model.

    python -m benchmarks.peers [--model emt|chgnet|painn-small] [--systems 6] [--max-atoms 200] [--fmax 0.05]
                               [--max-steps 40] [--max-miller 1] [--device cpu] [--workers 1]

One run relaxes the same systems (kdaug's sampler on the embedded bulks restricted to EMT's elements: slabs with
an adsorbate, subsurface atoms fixed) with the same model, fmax and step cap, and prints per tool: teacher
evaluations/s (system evaluations the model computed, over the wall time), the wall time to relax all, steps
per system, converged systems, the largest differences of final energies (eV) and positions (A) from ASE's,
and the wall time as a multiple of kdaug's relaxer. Every tool batches by atoms (`--max-atoms` per forward):
- ASE, one system at a time (`ase.optimize.FIRE` / `LBFGS`, `FixAtoms`): the reference;
- kdaug `BatchedRelaxer` (in-flight refill) and `kdaug generate` end to end (a fresh process, sampling
  workers and LMDB writes included, all frames kept; its systems are the same ones, drawn from the same bulks);
- torch-sim 0.3.0 `optimize` with its ASE-flavour FIRE and `InFlightAutoBatcher` (atom budget, convergence
  checked every step); it has no LBFGS and no fixed atoms: its adapter holds them by zeroing their forces
  (exact for FIRE, which then never moves them), and the FIRE table is repeated with nothing fixed for all;
- fairchem v1 `ml_relax` (its batched LBFGS over `OptimizableBatch`, given ASE's LBFGS parameters instead of
  its own defaults maxstep 0.02, damping 1.2, alpha 100) on consecutive batches within the atom budget; it
  has no FIRE, and converged systems stay in the batch (masked) until the whole batch is done.
Each peer evaluates the kdaug model adapter (`kdaug.models.load_model`) through a thin wrapper: torch-sim's
`ModelInterface`, fairchem's trainer `predict`, ASE's calculator. ASE takes EMT natively; torch-sim and
`ml_relax` have no EMT and get it only through that wrapper. kdaug's relaxer and ASE's calculator name each
trajectory to the adapter, so EMT keeps one calculator (and neighbour list) per system; the torch-sim and
`ml_relax` wrappers cannot (their batches carry no identity of a system across swaps), so EMT builds a fresh
calculator and neighbour list at each of their evaluations. torch-sim is not a kdaug dependency: install it
into its own environment that sees kdaug's packages (README, Benchmarks) and run this module with that python.
"""

from __future__ import annotations

# Heavy modules are imported inside the functions: `kdaug generate`'s sampling workers spawn and import their
# parent's main module again.
import argparse
import json
import pickle
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np


@dataclass
class Run:
    """One tool's relaxation of all systems: final energies (eV) and positions per system, steps per system."""
    tool: str
    wall: float
    evaluations: int
    energies: list[float]
    positions: list[np.ndarray]
    steps: list[int]
    converged: int
    note: str = ""


class Counter:
    """Counts the systems `model` evaluates (a forward hook: one per system of each batch)."""

    def __init__(self, model) -> None:
        self.n = 0
        model.register_forward_hook(lambda module, inputs, output: self.add(len(inputs[0].natoms)))

    def add(self, n: int) -> None:
        self.n += n


def timed(counter: Counter, fn, *args) -> Run:
    """`fn(*args)`, with its wall time and the model evaluations it made."""
    counter.n = 0
    start = time.perf_counter()
    run = fn(*args)
    run.wall, run.evaluations = time.perf_counter() - start, counter.n
    return run


# -- systems -----------------------------------------------------------------------------------------
def restricted_bulks(elements: frozenset[int], folder: Path) -> Path:
    """The embedded bulks made only of `elements`, as an OC20-format bulks.pkl (for `kdaug generate`)."""
    from kdaug.sampling.oc import load_bulk_db

    bulks = [b for b in load_bulk_db(None) if set(b["atoms"].numbers) <= elements]
    path = folder / "bulks.pkl"
    path.write_bytes(pickle.dumps(bulks))
    return path


def sample_tasks(n: int, max_miller: int, bulk_db: Path) -> list:
    from kdaug.relax.runner import RelaxTask
    from kdaug.sampling.oc import SamplerConfig, SystemSampler

    sampler = SystemSampler(SamplerConfig(bulk_db=str(bulk_db), max_miller=max_miller, seed=0))
    return [RelaxTask.from_atoms(sampler.sample(sid).atoms, sid=sid) for sid in range(n)]


def atom_batches(tasks: list, max_atoms: int) -> list[list]:
    """Consecutive tasks packed up to `max_atoms` (a larger one alone), the way the in-flight batchers fill."""
    batches, current = [], []
    for task in tasks:
        if current and sum(t.n_atoms for t in current) + task.n_atoms > max_atoms:
            batches.append(current)
            current = []
        current.append(task)
    return [*batches, current] if current else batches


# -- tools -------------------------------------------------------------------------------------------
def run_ase(model, tasks, optimizer: str, fmax: float, max_steps: int) -> Run:
    from ase import Atoms
    from ase.constraints import FixAtoms
    from ase.optimize import FIRE, LBFGS

    from kdaug.models.ase_calc import ModelCalculator

    energies, positions, steps, converged = [], [], [], 0
    for task in tasks:
        atoms = Atoms(numbers=task.atomic_numbers, positions=task.positions, cell=task.cell, pbc=True,
                      tags=task.tags, constraint=FixAtoms(mask=task.fixed))
        atoms.calc = ModelCalculator(model)
        opt = {"fire": FIRE, "lbfgs": LBFGS}[optimizer](atoms, logfile=None)
        converged += bool(opt.run(fmax=fmax, steps=max_steps))
        energies.append(atoms.get_potential_energy())
        positions.append(atoms.positions.copy())
        steps.append(opt.nsteps)
    return Run("ASE, one system at a time", 0, 0, energies, positions, steps, converged)


def run_kdaug(model, tasks, optimizer: str, fmax: float, max_steps: int, max_atoms: int, device: str) -> Run:
    from kdaug.relax.runner import BatchedRelaxer

    relaxer = BatchedRelaxer(model, optimizer=optimizer, fmax=fmax, max_steps=max_steps, max_systems=len(tasks),
                             max_atoms=max_atoms, device=device)
    results = {r.task.sid: r for r in relaxer.run(tasks, keep=lambda task, step: False)}
    ordered = [results[t.sid] for t in tasks]
    return Run("kdaug BatchedRelaxer", 0, 0, [r.final.energy for r in ordered], [r.final.positions for r in ordered],
               [r.n_steps for r in ordered], sum(r.converged for r in ordered))


def run_generate(args, tasks, optimizer: str, checkpoint: str | None, bulk_db: Path, folder: Path) -> Run:
    """`kdaug generate` in a fresh process on the same systems, every frame kept; the last frame of each system
    is its final state (systems dropped by the anomaly checks have none)."""
    from kdaug.data.lmdb import FrameDataset

    out = folder / f"generate-{optimizer}"
    flags = {"--n-systems": len(tasks), "--out": out, "--teacher": args.model, "--checkpoint": checkpoint,
             "--device": args.device, "--seed": 0, "--bulk-db": bulk_db, "--max-miller": args.max_miller,
             "--optimizer": optimizer, "--fmax": args.fmax, "--max-steps": args.max_steps,
             "--max-systems-per-batch": len(tasks), "--max-atoms-per-batch": args.max_atoms,
             "--num-workers": args.workers, "--frame-fraction": 1.0}
    command = [sys.executable, "-m", "kdaug", "generate",
               *(str(part) for flag, value in flags.items() if value is not None for part in (flag, value))]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    last: dict[int, object] = {}
    for frame in FrameDataset(out).iter_frames():
        if frame.sid not in last or frame.fid > last[frame.sid].fid:
            last[frame.sid] = frame
    nan = float("nan")
    return Run("kdaug generate end to end", summary["seconds"], summary["evaluations"],
               [last[t.sid].energy if t.sid in last else nan for t in tasks],
               [last[t.sid].positions if t.sid in last else t.positions * nan for t in tasks],
               [int(last[t.sid].fid) if t.sid in last else -1 for t in tasks], summary["converged"],
               note=f"wall in `run_generate` (teacher load, sampling workers, writes); the command took {wall:.1f} s "
                    f"with Python start and imports; {summary['dropped']} systems dropped by the anomaly checks")


def torch_sim_adapter(model):
    """kdaug's model as a torch-sim `ModelInterface` in float64 (the optimizer's precision; the model runs in its
    own). torch-sim 0.3.0 carries no fixed-atom flags, so fixed atoms travel as negative masses (its ASE-flavour
    FIRE never reads masses) and get zero forces."""
    import torch
    from torch_sim.models.interface import ModelInterface

    from kdaug.state import BatchState

    class KdaugModel(ModelInterface):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self._device, self._dtype = model.device, torch.float64
            self._compute_stress, self._compute_forces, self._memory_scales_with = False, True, "n_atoms"

        def forward(self, state, **kwargs) -> dict:
            fixed = state.masses < 0
            n_systems = state.n_systems
            structure = BatchState(
                positions=state.positions, atomic_numbers=state.atomic_numbers.long(),
                tags=torch.zeros_like(state.atomic_numbers, dtype=torch.long), fixed=fixed,
                system_idx=state.system_idx, cell=state.row_vector_cell,
                sid=torch.arange(n_systems, device=state.positions.device))
            with torch.no_grad():
                out = self.model(structure.to_batch(dtype=self.model.dtype))
            return {"energy": out.energy.double(), "forces": out.forces.double().masked_fill(fixed[:, None], 0.0)}

    return KdaugModel()


def run_torch_sim(model, tasks, fmax: float, max_steps: int, max_atoms: int) -> Run:
    import torch
    import torch_sim as ts
    from ase.data import atomic_masses

    adapter = torch_sim_adapter(model)
    device = adapter.device
    states = [ts.SimState(
        positions=torch.tensor(t.positions, dtype=torch.float64, device=device),
        masses=torch.tensor(np.where(t.fixed, -1, 1) * atomic_masses[t.atomic_numbers], dtype=torch.float64,
                            device=device),
        cell=torch.tensor(t.cell.T[None], dtype=torch.float64, device=device), pbc=True,
        atomic_numbers=torch.tensor(t.atomic_numbers, dtype=torch.int, device=device)) for t in tasks]
    batcher = ts.autobatching.InFlightAutoBatcher(model=adapter, memory_scales_with="n_atoms",
                                                  max_memory_scaler=max(max_atoms, max(t.n_atoms for t in tasks)))
    final = ts.optimize(ts.concatenate_states(states), adapter, optimizer=ts.optimizers.fire,
                        convergence_fn=ts.runners.generate_force_convergence_fn(fmax, include_cell_forces=False),
                        autobatcher=batcher, max_steps=max_steps, steps_between_swaps=1, md_flavor="ase_fire")
    counts = final.n_atoms_per_system.tolist()
    positions = np.split(final.positions.cpu().numpy(), np.cumsum(counts)[:-1])
    fmaxes = ts.quantities.systemwise_max_force(final).cpu().numpy()
    return Run("torch-sim FIRE + InFlightAutoBatcher", 0, 0, final.energy.tolist(), positions,
               list(batcher.swap_attempts), int((fmaxes < fmax).sum()),
               note="fixed atoms held by zeroed forces (no constraints in torch-sim 0.3.0); every system takes "
                    "at least one step")


def run_ml_relax(model, tasks, fmax: float, max_steps: int, max_atoms: int) -> Run:
    import torch
    from fairchem.core.common.relaxation.ml_relaxation import ml_relax
    from fairchem.core.common.relaxation.optimizable import OptimizableBatch
    from fairchem.core.datasets.lmdb_dataset import data_list_collater
    from torch_geometric.data import Data

    from kdaug.state import BatchState

    class Trainer:
        """What `ml_relax` asks of a fairchem trainer: `device` and `predict(batch)` -> energy, forces."""

        device = model.device

        def __init__(self) -> None:
            self.previous: torch.Tensor | None = None
            self.steps: torch.Tensor | None = None

        def predict(self, batch, per_image=False, disable_tqdm=True) -> dict:
            if self.previous is not None:  # a system whose atoms moved since the last call took a step
                moved = (batch.pos != self.previous).any(dim=1)
                self.steps += torch.zeros_like(self.steps).index_add_(0, batch.batch, moved.long()) > 0
            self.previous = batch.pos.clone()
            with torch.no_grad():
                out = model(BatchState.from_batch(batch).to_batch(dtype=model.dtype))
            return {"energy": out.energy.float(), "forces": out.forces.float()}

    # ASE >= 3.24 made its Optimizable abstract (get_x, set_x, get_gradient, get_value, ndofs); fairchem 1.10's
    # OptimizableBatch defines none of them, so ml_relax fails to instantiate it. Its own LBFGS never calls them.
    OptimizableBatch.__abstractmethods__ = frozenset()
    energies, positions, steps, converged = [], [], [], 0
    opt = {"maxstep": 0.2, "memory": 100, "damping": 1.0, "alpha": 70.0}  # ASE's LBFGS defaults
    for part in atom_batches(tasks, max_atoms):
        trainer = Trainer()
        trainer.steps = torch.zeros(len(part), dtype=torch.long, device=model.device)
        batch = data_list_collater([Data(
            pos=torch.tensor(t.positions, dtype=torch.float32), atomic_numbers=torch.tensor(t.atomic_numbers),
            cell=torch.tensor(t.cell, dtype=torch.float32)[None], natoms=t.n_atoms, tags=torch.tensor(t.tags),
            fixed=torch.tensor(t.fixed, dtype=torch.long), sid=t.sid) for t in part], otf_graph=True)
        relaxed = ml_relax(batch, trainer, steps=max_steps, fmax=fmax, relax_opt=dict(opt), save_full_traj=False)
        free = relaxed.fixed == 0
        fmaxes = [float(relaxed.forces[(relaxed.batch == k) & free].norm(dim=1).max()) for k in range(len(part))]
        energies += relaxed.energy.tolist()
        positions += np.split(relaxed.pos.double().cpu().numpy(), np.cumsum([t.n_atoms for t in part])[:-1])
        steps += trainer.steps.tolist()
        converged += sum(f < fmax for f in fmaxes)
    return Run("fairchem ml_relax (LBFGS, OptimizableBatch)", 0, 0, energies, positions, steps, converged,
               note="converged systems stay in their batch, masked, until it is done; needs a patch to run with "
                    "ASE >= 3.24 (OptimizableBatch's abstract methods)")


# -- report ------------------------------------------------------------------------------------------
def table(title: str, runs: list[Run], reference: Run, kdaug: Run) -> str:
    header = ("| tool | evaluations/s | wall (s) | x kdaug relaxer wall | steps per system (min-median-max) | converged"
              " | max abs dE vs ASE (eV) | max abs dpos vs ASE (A) |")
    lines = [f"\n{title}\n", header, "|" + " --- |" * 8]
    for run in runs:
        d_e = np.nanmax(np.abs(np.subtract(run.energies, reference.energies)))  # NaN: a system generate dropped
        d_pos = np.nanmax([np.abs(a - b).max() for a, b in zip(run.positions, reference.positions)])
        steps = np.array([n for n in run.steps if n >= 0])  # -1: a system generate dropped
        lines.append(f"| {run.tool} | {run.evaluations / run.wall:.1f} | {run.wall:.2f} | {run.wall / kdaug.wall:.2f} "
                     f"| {steps.min()}-{int(np.median(steps))}-{steps.max()} | {run.converged}/{len(run.steps)} "
                     f"| {d_e:.2e} | {d_pos:.2e} |")
    notes = [f"- {run.tool}: {run.note}" for run in runs if run.note]
    return "\n".join(lines + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="emt", help="emt, chgnet, or a model config (random weights, seed 0)")
    parser.add_argument("--systems", type=int, default=6)
    parser.add_argument("--max-atoms", type=int, default=200, help="atoms per forward at most, for every tool")
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--max-miller", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--optimizers", nargs="+", default=["fire", "lbfgs"], choices=["fire", "lbfgs"])
    parser.add_argument("--no-generate", action="store_true", help="leave out the `kdaug generate` rows")
    parser.add_argument("--workers", type=int, default=1, help="sampling workers of `kdaug generate`")
    args = parser.parse_args()

    import torch

    from benchmarks.generate import teacher_and_checkpoint
    from kdaug.models import load_teacher

    try:
        import torch_sim
    except ImportError:
        torch_sim = None
    folder = Path(tempfile.mkdtemp(prefix="kdaug-peers-"))
    model, checkpoint = teacher_and_checkpoint(args.model, args.device, folder)
    elements = load_teacher("emt").supported_elements & model.supported_elements
    bulk_db = restricted_bulks(elements, folder)
    tasks = sample_tasks(args.systems, args.max_miller, bulk_db)
    counter = Counter(model)
    atoms = [t.n_atoms for t in tasks]
    print(f"model {args.model} on {args.device} ({torch.get_num_threads()} threads), {len(tasks)} systems of "
          f"{min(atoms)}-{max(atoms)} atoms ({sum(t.fixed.sum() for t in tasks)} of {sum(atoms)} fixed), "
          f"fmax {args.fmax} eV/A, at most {args.max_steps} steps, {args.max_atoms} atoms per forward; "
          f"torch {torch.__version__}, torch-sim {version('torch-sim-atomistic') if torch_sim else 'not installed'}")
    run_kdaug(model, tasks[:1], "fire", args.fmax, 2, args.max_atoms, args.device)  # warm-up
    free_tasks = [type(t)(**{**vars(t), "fixed": np.zeros_like(t.fixed)}) for t in tasks]
    for optimizer in args.optimizers:
        modes = [("subsurface atoms fixed", tasks)] + ([("nothing fixed", free_tasks)] if optimizer == "fire" else [])
        for mode, systems in modes:
            ase = timed(counter, run_ase, model, systems, optimizer, args.fmax, args.max_steps)
            kdaug = timed(counter, run_kdaug, model, systems, optimizer, args.fmax, args.max_steps, args.max_atoms,
                          args.device)
            runs = [kdaug, ase]
            if not args.no_generate and systems is tasks:
                runs.append(run_generate(args, tasks, optimizer, checkpoint, bulk_db, folder))
            if optimizer == "fire" and torch_sim is not None:
                runs.append(timed(counter, run_torch_sim, model, systems, args.fmax, args.max_steps, args.max_atoms))
            if optimizer == "lbfgs":
                runs.append(timed(counter, run_ml_relax, model, systems, args.fmax, args.max_steps, args.max_atoms))
            print(table(f"{optimizer.upper()}, {mode}:", runs, ase, kdaug))


if __name__ == "__main__":
    main()
