"""Cost of adversarial generation per frame, as a multiple of one teacher forward.

    python -m benchmarks.adversarial [--teacher painn-big] [--student painn-small] [--device cuda] [--batch 4]

Both models have random weights (cost does not depend on them). One generated
frame costs steps + 1 student and teacher forwards with gradients w.r.t. the
positions, plus the final teacher labelling.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import oc20_sized_frame, rate
from kdaug.data.batch import batch_from_frames
from kdaug.models import load_model
from kdaug.perturb.adversarial import AttackParams, adversarial_perturb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="painn-big")
    parser.add_argument("--student", default="painn-small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = load_model(args.teacher, device=args.device)
    student = load_model(args.student, device=args.device)
    batch = batch_from_frames([oc20_sized_frame(seed=i) for i in range(args.batch)], device=args.device)

    def forward():
        with torch.no_grad():
            teacher(batch)

    forward_rate = rate(forward, args.batch, device=args.device)
    params = AttackParams(steps=args.steps, alpha=0.01, step_rule="normalized")

    def generate():
        positions, _ = adversarial_perturb(batch, student, teacher, params)
        batch_after = batch.clone()
        batch_after.pos = positions
        with torch.no_grad():
            teacher(batch_after)  # the label

    generate_rate = rate(generate, args.batch, device=args.device, min_seconds=3.0)
    print(f"teacher {args.teacher}, student {args.student}, {args.device}, batch {args.batch}, {args.steps} steps")
    print(f"teacher forward          {forward_rate:8.2f} frames/s")
    print(f"adversarial generation   {generate_rate:8.2f} frames/s = {forward_rate / generate_rate:.1f} teacher forwards"
          " per frame")


if __name__ == "__main__":
    main()
