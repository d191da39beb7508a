"""Cost of Hessian distillation: the live teacher's H v and the student's step with the Hessian loss.

    python -m benchmarks.hessian [--teacher emt] [--student painn-tiny] [--batch 8] [--k 2] [--seconds 5]

Seconds per batch of 82-atom slabs (34 free atoms, so the 32-atom budget applies): the teacher targets of
`HessianKD` (central differences for EMT: 2k + 1 forwards), a plain student step (forward, L0, backward,
AdamW) and the same step with L0 + the Hessian loss (k double backwards through the student's forces).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.common import oc20_sized_frame, rate
from kdaug.data.lmdb import LmdbWriter
from kdaug.data.training_set import TrainingSet, collate
from kdaug.models import load_model, load_teacher
from kdaug.train.hessian import HessianKD
from kdaug.train.losses import LossWeights, energy_force_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="emt")
    parser.add_argument("--student", default="painn-tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--max-atoms", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        with LmdbWriter(Path(tmp) / "data") as writer:
            writer.write_batch([oc20_sized_frame(seed) for seed in range(args.batch)])
        data = TrainingSet([Path(tmp) / "data"])
        batch = collate([data[i] for i in range(args.batch)])
        data.close()
    teacher = load_teacher(args.teacher)
    student = load_model(args.student)
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    strategy = HessianKD(k=args.k, max_atoms=args.max_atoms)
    targets = strategy.teacher_targets(teacher, batch)
    weights = LossWeights()

    def step(hessian: bool) -> None:
        step_batch = batch.clone()
        step_batch.pos.requires_grad_(hessian)
        output = student(step_batch)
        loss, _ = energy_force_loss(output.energy, output.forces, step_batch.y, step_batch.force, step_batch.batch,
                                    ~step_batch.fixed, None, weights)
        if hessian:
            loss = loss + strategy.loss(student, step_batch, output, None, targets, None, loss="mse",
                                        l0_weights=weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    rows = {
        f"teacher H v ({args.teacher}, k={args.k})": lambda: strategy.teacher_targets(teacher, batch),
        f"plain step ({args.student})": lambda: step(False),
        f"hessian step ({args.student}, k={args.k})": lambda: step(True),
    }
    print(f"{args.batch} slabs of 82 atoms per batch, {torch.get_num_threads()} threads")
    for label, fn in rows.items():
        seconds = 1 / rate(fn, 1, min_seconds=args.seconds)
        print(f"{label:<36} {seconds:8.4f} s/batch")


if __name__ == "__main__":
    main()
