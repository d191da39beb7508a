"""Cost of a KD training step, live teacher and teacher cache, as a ratio to the plain student step.

    python -m benchmarks.train [--teacher painn-big] [--student painn-small] [--batch 16] [--device cuda]
        [--modes vanilla1 vanilla2 n2n v2v] [--seconds 5]

Both models have random weights (cost does not depend on them). Every step is
`Trainer.train_step` of `kdaug train` on the same batch of 82-atom slabs: forward and
backward of the student, the KD loss and its maps, AdamW, clipping and EMA. "live" runs the
teacher forward in the step; "cached" reads its targets from a `kdaug teacher-cache` store.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.common import oc20_sized_frame, rate
from kdaug.data.lmdb import LmdbWriter
from kdaug.data.training_set import collate
from kdaug.models import load_model, load_teacher
from kdaug.train.config import TrainConfig
from kdaug.train.loop import Trainer
from kdaug.train.strategies import STRATEGIES, get_strategy
from kdaug.train.teacher_cache import build_teacher_cache


def step_rate(config: TrainConfig, seconds: float) -> float:
    """Training samples per second of `Trainer.train_step` on the run's first batch."""
    trainer = Trainer(config, progress=False)
    batch = collate([trainer.data[i] for i in range(config.batch_size)])
    return rate(lambda: trainer.train_step(batch), config.batch_size, min_seconds=seconds, device=config.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="painn-big")
    parser.add_argument("--student", default="painn-small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--modes", nargs="+", choices=list(STRATEGIES),
                        default=[name for name, strategy in STRATEGIES.items() if strategy.uses_teacher])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="kdaug-bench-train-"))
    with LmdbWriter(work / "data") as writer:
        writer.write_batch([oc20_sized_frame(seed=i) for i in range(args.batch)])
    teacher = load_model(args.teacher)
    teacher.save(work / "teacher.pt")
    modes = [m for m in args.modes if get_strategy(m).missing_tap(None, teacher) is None]  # the teacher's taps
    base = {"student": args.student, "train": (str(work / "data"),), "batch_size": args.batch, "max_steps": 1,
            "device": args.device, "kd_lambda": 1.0}
    plain = step_rate(TrainConfig(**base, out=str(work / "plain")), args.seconds)
    rows = []
    for mode in modes:
        teacher_options = {"teacher": args.teacher, "teacher_checkpoint": str(work / "teacher.pt"), "kd": mode}
        live = step_rate(TrainConfig(**base, **teacher_options, out=str(work / f"live-{mode}")), args.seconds)
        cache = work / f"cache-{mode}"
        labeller = load_teacher(args.teacher, work / "teacher.pt", device=args.device)
        build_teacher_cache(labeller, [work / "data"], get_strategy(mode), cache, progress=False)
        cached = step_rate(TrainConfig(**base, **teacher_options, teacher_cache=str(cache),
                                       out=str(work / f"cached-{mode}")), args.seconds)
        rows.append((mode, live, cached))
    # The plain step is timed before and after the KD modes; their mean is the reference (drift shows as spread).
    plain_after = step_rate(TrainConfig(**base, out=str(work / "plain-after")), args.seconds)
    reference = (plain + plain_after) / 2
    print(f"student {args.student}, teacher {args.teacher}, {args.device}, batch {args.batch} (82-atom slabs)")
    print(f"plain student step: {plain:.2f} then {plain_after:.2f} samples/s")
    print(f"{'mode':10} {'live (x plain step time)':>30} {'cached (x plain step time)':>30}")
    for mode, live, cached in rows:
        print(f"{mode:10} {reference / live:9.2f}x ({live:8.2f} samples/s) {reference / cached:9.2f}x "
              f"({cached:8.2f} samples/s)")


if __name__ == "__main__":
    main()
