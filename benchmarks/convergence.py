"""How many sampled systems a teacher relaxes to convergence, and how many the anomaly checks drop, by the
bulks they are cut from.

    python -m benchmarks.convergence [--teacher chgnet|emt] [--systems 24] [--max-miller 1] [--optimizer lbfgs]
                                     [--max-steps 150] [--batch 1] [--bulks shipped teacher-relaxed elemental]

Systems 0..n-1 (seed 0, all adsorbates the teacher supports) are relaxed to 0.05 eV/A, `--batch` at a time,
once for each bulk choice:
- shipped: `data/bulks.pkl` as it is (generators/build_bulks.py: dcdft elements and prototype binaries within
  0.1 eV/atom of CHGNet's hull, all CHGNet-relaxed);
- teacher-relaxed: the same list, with each bulk these systems draw first relaxed by the teacher (cell and
  positions, ASE FrechetCellFilter + FIRE to 0.02 eV/A); a changed lattice can change the slab drawn;
- elemental: the single-element bulks only (other systems: the draws follow the list).
Prints per choice: converged, dropped by the anomaly checks (by reason), kept and converged, the relaxer's
seconds, and the volume change of the relaxed bulks.
"""

from __future__ import annotations

import argparse
import collections
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np

BULK_CHOICES = ("shipped", "teacher-relaxed", "elemental")


def stress_calculator(teacher_name: str, teacher):
    """An ASE calculator with stress for the chgnet or emt `teacher` (cell relaxation needs stress, which the
    OC20 GNNs lack: hence `--teacher`'s two choices)."""
    if teacher_name == "chgnet":
        from chgnet.model.dynamics import CHGNetCalculator

        return CHGNetCalculator(model=teacher.model)
    from ase.calculators.emt import EMT

    return EMT()


def relaxed_bulk(atoms, calculator):
    """`atoms` with cell and positions relaxed by `calculator` (FIRE to 0.02 eV/A, at most 300 steps)."""
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    atoms = atoms.copy()
    atoms.calc = calculator
    FIRE(FrechetCellFilter(atoms), logfile=None).run(fmax=0.02, steps=300)
    atoms.calc = None
    return atoms


def bulk_list(choice: str, args, teacher, shipped: list[dict]) -> tuple[list[dict], list[float]]:
    """(bulk entries for `choice`, percent volume changes of the bulks relaxed for it)."""
    from kdaug.sampling.oc import SamplerConfig, SystemSampler

    if choice == "shipped":
        return shipped, []
    if choice == "elemental":
        return [b for b in shipped if len(set(b["atoms"].numbers)) == 1], []
    sampler = SystemSampler(SamplerConfig(max_miller=args.max_miller, seed=0,
                                          supported_elements=teacher.supported_elements))
    drawn = {sampler.sample(sid).details["bulk_src_id"] for sid in range(args.systems)}
    calculator = stress_calculator(args.teacher, teacher)
    bulks, changes = [], []
    for entry in shipped:
        if entry["src_id"] in drawn:
            relaxed = relaxed_bulk(entry["atoms"], calculator)
            changes.append(100 * (relaxed.get_volume() / entry["atoms"].get_volume() - 1))
            entry = {**entry, "atoms": relaxed}
        bulks.append(entry)
    return bulks, changes


def relax_all(teacher, bulk_db: str, args) -> dict:
    """Relax systems 0..n-1 cut from `bulk_db`; counts and seconds."""
    from kdaug.generate import anomaly
    from kdaug.relax.runner import BatchedRelaxer, RelaxTask
    from kdaug.sampling.oc import SamplerConfig, SystemSampler

    sampler = SystemSampler(SamplerConfig(bulk_db=bulk_db, max_miller=args.max_miller, seed=0,
                                          supported_elements=teacher.supported_elements))
    tasks = [RelaxTask.from_atoms(sampler.sample(sid).atoms, sid=sid) for sid in range(args.systems)]
    relaxer = BatchedRelaxer(teacher, optimizer=args.optimizer, fmax=0.05, max_steps=args.max_steps,
                             max_systems=args.batch, device="cpu")
    start = time.perf_counter()
    results = list(relaxer.run(tasks, lambda task, step: False))
    seconds = time.perf_counter() - start
    verdicts = [anomaly(result) for result in results]
    return {"converged": sum(r.converged for r in results),
            "dropped": collections.Counter(v for v in verdicts if v),
            "kept_converged": sum(r.converged and not v for r, v in zip(results, verdicts)),
            "steps": int(np.median([r.n_steps for r in results])),
            "atoms": int(np.median([t.n_atoms for t in tasks])),
            "seconds": seconds}


def main() -> None:
    import torch

    from kdaug.models import load_teacher
    from kdaug.sampling.oc import load_bulk_db

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="chgnet", choices=["chgnet", "emt"])
    parser.add_argument("--systems", type=int, default=24)
    parser.add_argument("--max-miller", type=int, default=1)
    parser.add_argument("--optimizer", default="lbfgs")
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--bulks", nargs="+", default=list(BULK_CHOICES), choices=BULK_CHOICES)
    args = parser.parse_args()

    teacher = load_teacher(args.teacher, device="cpu")
    shipped = load_bulk_db(None)
    folder = Path(tempfile.mkdtemp(prefix="kdaug-bench-"))
    print(f"teacher {args.teacher}, {args.systems} systems (seed 0, max_miller {args.max_miller}), {args.optimizer} "
          f"to 0.05 eV/A in at most {args.max_steps} steps, batch {args.batch}, {torch.get_num_threads()} threads")
    print()
    print("| bulks | converged | dropped | kept and converged | median steps | median atoms | seconds | "
          "bulk volume change |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for choice in args.bulks:
        bulks, changes = bulk_list(choice, args, teacher, shipped)
        path = folder / f"{choice}.pkl"
        path.write_bytes(pickle.dumps(bulks))
        row = relax_all(teacher, str(path), args)
        dropped = sum(row["dropped"].values())
        reasons = ", ".join(f"{reason} {n}" for reason, n in row["dropped"].most_common())
        volume = f"{min(changes):+.0f} % to {max(changes):+.0f} % ({len(changes)} bulks)" if changes else ""
        print(f"| {choice} | {row['converged']} / {args.systems} | {dropped}{f' ({reasons})' if reasons else ''} | "
              f"{row['kept_converged']} | {row['steps']} | {row['atoms']} | {row['seconds']:.0f} | {volume} |",
              flush=True)


if __name__ == "__main__":
    main()
