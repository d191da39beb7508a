"""Which budget sizes a teacher's batches: peak memory of one forward per system, against its atoms and
against the edges of each graph the teacher builds.

    python -m benchmarks.batch_memory [--teacher gemnet-oc] [--device cuda] [--systems 24] [--max-miller 2]

For each of `--systems` sampled systems (seed 0; their sizes vary with the bulk and the Miller index) it
measures the peak memory of one forward with forces, as the relaxer runs it (no autograd graph kept), above
what was held before it: CUDA `max_memory_allocated`; on the CPU the process's peak resident set, reset before
each system, with glibc returning large blocks at once (`MALLOC_MMAP_THRESHOLD_`, so memory one system freed
does not hide the next one's). It prints each system's atoms, edges per graph (cutoff and neighbour cap) and
memory, then fits memory = a + b x for x = atoms and x = each graph's edges: the quantity with the smallest
residual is the one a batch budget must count. GNN configs run with random weights (memory does not depend on
them).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.generate import UNCAPPED, edges_per_atom, teacher_and_checkpoint, teacher_graphs

_MMAP_THRESHOLD = "65536"  # bytes: larger blocks are mmap-ed and go back to the system when freed


def _resident_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith(field + ":"))


def peak_forward_mb(teacher, task, device: str) -> float:
    """MB above the memory held before one forward (energy and forces) of `task`."""
    import torch

    from kdaug.data.batch import batch_from_frames

    batch = batch_from_frames([task], device=device, dtype=teacher.dtype)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        with torch.no_grad():
            teacher(batch)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - held) / 2**20
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # peak resident set := the current one
    held = _resident_mb("VmRSS")
    with torch.no_grad():
        teacher(batch)
    return _resident_mb("VmHWM") - held


def fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(a, b, rms residual) of y = a + b x by least squares."""
    design = np.c_[np.ones_like(x), x]
    coef = np.linalg.lstsq(design, y, rcond=None)[0]
    return float(coef[0]), float(coef[1]), float(np.sqrt(np.mean((design @ coef - y) ** 2)))


def main() -> None:
    import torch
    from ase.build import fcc111

    from kdaug.relax.runner import RelaxTask
    from kdaug.sampling.oc import SamplerConfig, SystemSampler

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="gemnet-oc")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--systems", type=int, default=24)
    parser.add_argument("--max-miller", type=int, default=2)
    args = parser.parse_args()
    if args.device == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != _MMAP_THRESHOLD:
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.batch_memory", *sys.argv[1:]],
                  {**os.environ, "MALLOC_MMAP_THRESHOLD_": _MMAP_THRESHOLD})

    teacher, _ = teacher_and_checkpoint(args.teacher, args.device, Path(tempfile.mkdtemp(prefix="kdaug-bench-")))
    graphs = teacher_graphs(teacher)
    sampler = SystemSampler(SamplerConfig(max_miller=args.max_miller, seed=0,
                                          supported_elements=teacher.supported_elements))
    warmup = fcc111("Cu", (2, 2, 3), vacuum=8.0)
    warmup.set_tags([1] * len(warmup))
    peak_forward_mb(teacher, RelaxTask.from_atoms(warmup, sid=-1), args.device)  # one-time allocations

    rows = []
    for sid in range(args.systems):
        atoms = sampler.sample(sid).atoms
        edges = [edges_per_atom(atoms, cutoff, cap) * len(atoms) for cutoff, cap in graphs.values()]
        rows.append((len(atoms), edges, peak_forward_mb(teacher, RelaxTask.from_atoms(atoms, sid=sid), args.device)))
    rows.sort(key=lambda row: row[0])

    print(f"teacher {args.teacher} on {args.device} ({torch.__version__}), {args.systems} systems at max_miller "
          f"{args.max_miller}, one system per forward, no autograd graph kept")
    print()
    print("| atoms | " + " | ".join(f"{name} edges ({cutoff:g} A, cap {'none' if cap == UNCAPPED else cap})" for name, (cutoff, cap) in graphs.items())
          + " | peak MB | MB/atom |")
    print("| --- " * (len(graphs) + 3) + "|")
    for n_atoms, edges, peak in rows:
        print(f"| {n_atoms} | " + " | ".join(f"{e:.0f}" for e in edges) + f" | {peak:.1f} | {peak / n_atoms:.2f} |")
    peaks = np.array([peak for _, _, peak in rows])
    print()
    print("| budget counts | fit: MB = a + b x | rms residual MB | MB per unit, min-max over systems |")
    print("| --- | --- | --- | --- |")
    counts = {"atoms": np.array([float(n) for n, _, _ in rows])}
    counts.update({f"{name} edges": np.array([e[k] for _, e, _ in rows]) for k, name in enumerate(graphs)})
    for name, x in counts.items():
        a, b, residual = fit(x, peaks)
        per_unit = peaks / x
        print(f"| {name} | {a:.1f} + {b:.4g} x | {residual:.1f} | {per_unit.min():.4g}-{per_unit.max():.4g} "
              f"({per_unit.max() / per_unit.min():.1f}x) |")


if __name__ == "__main__":
    main()
