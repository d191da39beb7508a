"""Samples/s (energy + forces) of each full-size model on ~80-atom OC20-like systems.

    python benchmarks/models.py [--device cuda] [--batch-sizes 1 8] [--seconds 3]

Prints one row per model and batch size, measured side by side in one run, with
each model's speed as a multiple of GemNet-OC's (the paper's Table 2 ordering:
SchNet and PaiNN faster than GemNet-OC).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import oc20_sized_frame, rate
from kdaug.data.batch import batch_from_frames
from kdaug.models import load_model

MODELS = ("gemnet-oc", "painn-big", "painn-small", "schnet", "chgnet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    frames = [oc20_sized_frame(seed=i) for i in range(max(args.batch_sizes))]
    torch.manual_seed(0)
    results: dict[tuple[str, int], float] = {}
    print(f"device {args.device}, {frames[0].n_atoms} atoms per system, random weights, forces included")
    print(f"{'model':<12} {'params':>10} {'batch':>6} {'samples/s':>10} {'x GemNet-OC':>12}")
    for name in args.models:
        model = load_model(name, device=args.device)
        n_params = sum(p.numel() for p in model.parameters())
        for batch_size in args.batch_sizes:
            batch = batch_from_frames(frames[:batch_size], device=args.device)
            results[name, batch_size] = rate(lambda m=model, b=batch: m(b), batch_size,
                                             min_seconds=args.seconds, device=args.device)
            reference = results.get(("gemnet-oc", batch_size))
            ratio = f"{results[name, batch_size] / reference:.2f}" if reference else "-"
            print(f"{name:<12} {n_params:>10,} {batch_size:>6} {results[name, batch_size]:>10.2f} {ratio:>12}")


if __name__ == "__main__":
    main()
