"""End-to-end `kdaug generate` versus the relaxer alone versus a bare teacher forward, for one teacher and batch.

    python -m benchmarks.generate [--teacher emt|chgnet|painn-small|gemnet-oc] [--device cuda] [--batch 32]
                                  [--systems 64] [--max-steps 100] [--workers 8] [--sampler-workers 0 1 2]

Prints a markdown table from one run on one machine:
- bare forward samples/s at the batch size on pre-sampled systems;
- relaxer-only evaluations/s (teacher evaluations that advance a system, with in-flight refill) on the same
  pre-sampled systems, and its ratio to the bare forward;
- end-to-end evaluations/s of `kdaug generate` run as a command in a fresh process (sampling workers, relaxer,
  writer thread) on the same systems, from the start of `run_generate` (teacher load included; the rate and
  first-step time are the ones the command prints), its ratio to the relaxer alone (target >= 0.9), the same
  from its first teacher step on (start-up left out, as it is in a long run), the time to the first teacher
  step, and the command's wall time;
- the sampler's systems/s per worker count (worker start-up included);
- the d1M estimate: 100k systems x 100 evaluations at the end-to-end rate, in device-hours;
- the edges per atom of each of the teacher's graphs (its cutoff and neighbour cap): where they vary, an atom
  budget mis-sizes that graph.
The workload is real relaxations to `--fmax`: systems finish at different steps (their spread is printed).
A GNN config runs with random weights (saved as a checkpoint so `generate` can load it as a teacher); their
forces have no physical scale, so pass `--fmax-of-start` (e.g. 0.5) to stop at a fraction of the start.

The GPU runs (one H100/H200, ~8 minutes in all; random-weight GNN forces shrink slowly (painn-tiny on CPU: none
below 0.3x its start in 20 steps), so the stop is half the starting fmax; the steps line shows whether
systems finished at different times):

    python -m benchmarks.generate --teacher gemnet-oc --device cuda --batch 64 --systems 96 --optimizer fire \
        --max-steps 100 --fmax-of-start 0.5 --workers 8 --sampler-workers 8 --sampled-systems 48
    python -m benchmarks.generate --teacher gemnet-oc --device cuda --precision tf32 --batch 64 --systems 96 \
        --optimizer fire --max-steps 100 --fmax-of-start 0.5 --workers 8 --sampler-workers
    python -m benchmarks.generate --teacher chgnet --device cuda --batch 32 --systems 96 --max-steps 50 \
        --workers 8 --graph-workers 8 --sampler-workers
"""

from __future__ import annotations

# Heavy modules are imported inside the functions: sampling workers are spawned processes that import this
# module again as their `__main__`, and a kdaug command's workers import nothing heavy either.
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

D1M_EVALUATIONS = 100_000 * 100
UNCAPPED = 10**9


def teacher_graphs(teacher) -> dict[str, tuple[float, int]]:
    """(cutoff in A, neighbour cap) of each graph a fairchem teacher builds, read from its module's cutoff and
    max_neighbors attributes (GemNet-OC: main, qint, aeaint, aint); other teachers: every neighbour within 6 A."""
    module = getattr(teacher, "module", None)
    graphs = {suffix.lstrip("_") or "main": (getattr(module, f"cutoff{suffix}"),
                                             getattr(module, f"max_neighbors{suffix}"))
              for suffix in ("", "_qint", "_aeaint", "_aint") if getattr(module, f"cutoff{suffix}", None) is not None}
    return graphs or {"all": (6.0, UNCAPPED)}


def edges_per_atom(atoms, cutoff: float, cap: int) -> float:
    """Directed edges per atom of a radius graph keeping at most `cap` neighbours of each atom (as fairchem's)."""
    from ase.neighborlist import neighbor_list

    degrees = np.bincount(neighbor_list("i", atoms, cutoff), minlength=len(atoms))
    return float(np.minimum(degrees, cap).sum() / len(atoms))


def teacher_and_checkpoint(name: str, device: str, folder: Path) -> tuple[object, str | None]:
    import torch

    from kdaug.models import load_model, load_teacher

    if name in ("emt", "chgnet") or name.startswith("ase:"):
        return load_teacher(name, device=device), None
    torch.manual_seed(0)
    checkpoint = folder / f"{name}-random.pt"
    load_model(name).save(checkpoint)
    return load_teacher(name, checkpoint, device=device), str(checkpoint)


def sampler_rate(config: SamplerConfig, workers: int, n_systems: int) -> tuple[float, float]:
    """(systems/s after the first, seconds to the first system, worker start-up included)."""
    from kdaug.sampling.oc import SystemSampler, iter_systems

    sampler = SystemSampler(config)
    start = time.perf_counter()
    first = None
    for _ in iter_systems(sampler, range(1000, 1000 + n_systems), num_workers=workers):
        first = first or time.perf_counter()
    return (n_systems - 1) / (time.perf_counter() - first), first - start


def initial_fmax(teacher, tasks: list[RelaxTask], batch: int, device: str) -> np.ndarray:
    """Largest free-atom force (eV/A) of each system at its start."""
    from kdaug.data.batch import batch_from_frames

    values = []
    for k in range(0, len(tasks), batch):
        part = tasks[k : k + batch]
        forces = teacher(batch_from_frames(part, device=device, dtype=teacher.dtype)).forces.detach().cpu().numpy()
        for task, f in zip(part, np.split(forces, np.cumsum([t.n_atoms for t in part])[:-1])):
            values.append(np.linalg.norm(f[~task.fixed], axis=1).max())
    return np.array(values)


def label_difference(teacher, tasks: list[RelaxTask], device: str) -> tuple[float, float]:
    """(max |dE| per atom in eV, max |dF| in eV/A) of the teacher's labels with TF32 against full fp32."""
    import torch

    from kdaug.data.batch import batch_from_frames

    outputs = []
    for precision in ("highest", "high"):
        torch.set_float32_matmul_precision(precision)
        outputs.append(teacher(batch_from_frames(tasks, device=device, dtype=teacher.dtype)))
    torch.set_float32_matmul_precision("highest")
    natoms = torch.tensor([t.n_atoms for t in tasks], device=outputs[0].energy.device)
    energy = ((outputs[1].energy - outputs[0].energy).abs() / natoms).max().item()
    return energy, (outputs[1].forces - outputs[0].forces).abs().max().item()


def generate_command(args: argparse.Namespace, checkpoint: str | None, out: Path) -> list[str]:
    """The `kdaug generate` command line of the end-to-end run (a fresh process, as a user runs it)."""
    flags = {"--n-systems": args.systems, "--out": out, "--teacher": args.teacher, "--checkpoint": checkpoint,
             "--device": args.device, "--precision": args.precision, "--seed": 0, "--max-miller": args.max_miller,
             "--optimizer": args.optimizer, "--fmax": args.fmax, "--max-steps": args.max_steps,
             "--max-systems-per-batch": args.batch, "--num-workers": args.workers,
             "--graph-workers": args.graph_workers, "--frame-fraction": 0.1}
    return [sys.executable, "-m", "kdaug", "generate",
            *(str(part) for flag, value in flags.items() if value is not None for part in (flag, value))]


def run_command(command: list[str]) -> tuple[dict, float]:
    """(the summary `kdaug generate` prints, the command's wall time in s, Python start and imports included)."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), wall


def main() -> None:
    import torch

    from benchmarks.common import rate
    from kdaug.data.batch import batch_from_frames
    from kdaug.generate import TeacherPace
    from kdaug.relax.runner import BatchedRelaxer, RelaxTask
    from kdaug.sampling.oc import SamplerConfig, SystemSampler

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="emt")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--systems", type=int, default=16)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--fmax-of-start", type=float, default=None,
                        help="instead of --fmax: this fraction of the median starting fmax (random-weight teachers, "
                             "whose forces have no physical scale)")
    parser.add_argument("--optimizer", default="fire")
    parser.add_argument("--max-miller", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="sampling workers of the end-to-end run")
    parser.add_argument("--graph-workers", type=int, default=0, help="CHGNet graph processes (chgnet only)")
    parser.add_argument("--sampler-workers", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--sampled-systems", type=int, default=8)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="kdaug-bench-"))
    teacher, checkpoint = teacher_and_checkpoint(args.teacher, args.device, folder)
    if args.graph_workers:
        teacher.build_graphs_in(args.graph_workers)
    sampler_config = SamplerConfig(max_miller=args.max_miller, seed=0, supported_elements=teacher.supported_elements)
    sampler = SystemSampler(sampler_config)
    systems = [sampler.sample(sid) for sid in range(args.systems)]
    tasks = [RelaxTask.from_atoms(s.atoms, sid=s.sid, payload=s.details) for s in systems]
    n_atoms = [t.n_atoms for t in tasks]
    graph_sizes = {name: [edges_per_atom(s.atoms, cutoff, cap) for s in systems]
                   for name, (cutoff, cap) in teacher_graphs(teacher).items()}
    if args.fmax_of_start is not None:
        args.fmax = float(args.fmax_of_start * np.median(initial_fmax(teacher, tasks, args.batch, args.device)))
    batch_tasks = tasks[: args.batch]
    tf32_error = None
    if args.precision == "tf32":
        tf32_error = label_difference(teacher, batch_tasks, args.device)
        torch.set_float32_matmul_precision("high")
    forward = rate(lambda: teacher(batch_from_frames(batch_tasks, device=args.device, dtype=teacher.dtype)),
                   len(batch_tasks), device=args.device)

    relax_count = TeacherPace(time.perf_counter())
    relaxer = BatchedRelaxer(teacher, optimizer=args.optimizer, fmax=args.fmax, max_steps=args.max_steps,
                             max_systems=args.batch, device=args.device, on_step=relax_count)
    start = time.perf_counter()
    steps = [r.n_steps for r in relaxer.run(tasks)]
    relax = relax_count.evaluations / (time.perf_counter() - start)

    if args.graph_workers:
        teacher.close_graph_workers()  # the end-to-end run starts its own
    summary, wall = run_command(generate_command(args, checkpoint, folder / "out"))
    end_to_end, first_step = summary["evaluations_per_s"], summary["first_evaluation_s"]
    steady = summary["evaluations"] / (summary["seconds"] - first_step)

    unit = "GPU" if args.device.startswith("cuda") else "CPU"
    print(f"teacher {args.teacher} ({'random weights' if checkpoint else 'pretrained/analytic'}) on {args.device}, "
          f"precision {args.precision}, batch {args.batch}, {args.systems} systems at max_miller {args.max_miller} "
          f"({int(np.median(n_atoms))} atoms median, {min(n_atoms)}-{max(n_atoms)}), {args.optimizer} to fmax "
          f"{args.fmax:.3g} in at most {args.max_steps} steps: steps per system min/median/max "
          f"{min(steps)}/{int(np.median(steps))}/{max(steps)}, {summary['converged']} converged")
    print("edges per atom of the teacher's graphs (an atom budget sizes a graph only as far as these are equal): "
          + "; ".join(f"{name} ({cutoff:g} A, cap {'none' if cap == UNCAPPED else cap}) min/median/max "
                      f"{min(sizes):.0f}/{np.median(sizes):.0f}/{max(sizes):.0f}"
                      for (name, sizes), (cutoff, cap) in zip(graph_sizes.items(), teacher_graphs(teacher).values())))
    if tf32_error is not None:
        print(f"TF32 vs fp32 labels on the first batch: max |dE| {tf32_error[0] * 1000:.3f} meV/atom, "
              f"max |dF| {tf32_error[1]:.4f} eV/A")
    print()
    print("| measure | value | ratio |")
    print("| --- | --- | --- |")
    print(f"| bare forward | {forward:.2f} samples/s | |")
    print(f"| relaxer only (pre-sampled systems) | {relax:.2f} evaluations/s | {relax / forward:.2f}x forward |")
    print(f"| end-to-end `kdaug generate` ({args.workers} sampling workers), from its start | {end_to_end:.2f} "
          f"evaluations/s | {end_to_end / relax:.2f}x relaxer (target >= 0.9) |")
    print(f"| end-to-end after its first teacher step | {steady:.2f} evaluations/s | {steady / relax:.2f}x relaxer |")
    print(f"| time to first teacher step (`generate`) | {first_step:.1f} s | |")
    print(f"| the command's wall time (Python start, imports and teacher load included) | {wall:.1f} s "
          f"({summary['seconds']:.1f} s in `run_generate`) | |")
    for workers in args.sampler_workers:
        per_s, first = sampler_rate(sampler_config, workers, args.sampled_systems)
        print(f"| sampler, {workers} worker(s), max_miller {args.max_miller} | {per_s:.2f} systems/s after the "
              f"first | first after {first:.1f} s |")
    print(f"| d1M estimate (100k systems x 100 steps) at the end-to-end rate | "
          f"{D1M_EVALUATIONS / end_to_end / 3600:.1f} {unit}-hours | |")


if __name__ == "__main__":
    main()
