"""Batched relaxation throughput versus a bare teacher forward and versus ASE one system at a time.

    python -m benchmarks.relax [--model painn-small] [--device cuda] [--batch 16] [--steps 30]

Prints, from one run on one machine:
- bare forward samples/s at the batch size, and relaxation steps/s (teacher
  evaluations that advance a system, with in-flight refill) -> target >= 0.9x;
- ASE FIRE relaxing the same systems one at a time with the same model as its
  calculator -> target >= 5x for a GNN teacher on a GPU (on CPU, batching does not
  speed these models up, so the target there is only not to lose);
- fairchem-data-oc sampling systems/s per worker count.
"""

from __future__ import annotations

import argparse
import time

import torch
from ase.optimize import FIRE

from benchmarks.common import oc20_sized_frame, rate
from kdaug.data.batch import batch_from_frames
from kdaug.data.convert import frame_to_atoms
from kdaug.models import load_model
from kdaug.models.ase_calc import ModelCalculator
from kdaug.relax.runner import BatchedRelaxer, RelaxTask
from kdaug.sampling.oc import SamplerConfig, SystemSampler, iter_systems


def relaxation_rate(model, frames, *, batch: int, steps: int, device: str) -> float:
    evaluations = [0]
    tasks = [RelaxTask.from_atoms(frame_to_atoms(f), sid=f.sid) for f in frames]
    relaxer = BatchedRelaxer(model, optimizer="fire", fmax=1e-6, max_steps=steps, max_systems=batch, device=device,
                             on_step=lambda n_systems, n_atoms: evaluations.__setitem__(0, evaluations[0] + n_systems))
    list(relaxer.run(tasks[:batch]))  # warm-up
    evaluations[0] = 0
    start = time.perf_counter()
    list(relaxer.run(tasks))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return evaluations[0] / (time.perf_counter() - start)


def ase_rate(model, frames, *, steps: int) -> float:
    evaluations, start = 0, time.perf_counter()
    for frame in frames:
        atoms = frame_to_atoms(frame)
        atoms.calc = ModelCalculator(model)
        optimizer = FIRE(atoms, logfile=None)
        optimizer.run(fmax=1e-6, steps=steps)
        evaluations += optimizer.nsteps + 1
    return evaluations / (time.perf_counter() - start)


def sampling_rate(workers: int, n_systems: int) -> float:
    sampler = SystemSampler(SamplerConfig(max_miller=1, seed=0))
    start = time.perf_counter()
    for _ in iter_systems(sampler, range(n_systems), num_workers=workers):
        pass
    return n_systems / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="painn-small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per system")
    parser.add_argument("--ase-systems", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--sampled-systems", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model(args.model, device=args.device)
    frames = [oc20_sized_frame(seed=i, metal="Cu" if i % 2 else "Pt") for i in range(2 * args.batch)]
    forward = rate(lambda: model(batch_from_frames(frames[:args.batch], device=args.device)), args.batch,
                   device=args.device)
    relax = relaxation_rate(model, frames, batch=args.batch, steps=args.steps, device=args.device)
    ase = ase_rate(model, frames[:args.ase_systems], steps=args.steps)
    print(f"model {args.model} on {args.device}, {frames[0].n_atoms} atoms/system, batch {args.batch}")
    print(f"bare forward          {forward:9.2f} samples/s")
    print(f"batched relaxation    {relax:9.2f} steps/s   {relax / forward:5.2f}x forward (target >= 0.9)")
    print(f"ASE FIRE one by one   {ase:9.2f} steps/s   batched is {relax / ase:5.2f}x ASE")
    for workers in args.workers:
        print(f"sampling, {workers} worker(s) {sampling_rate(workers, args.sampled_systems):7.2f} systems/s")


if __name__ == "__main__":
    main()
