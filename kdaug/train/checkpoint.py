"""The files of a training run: the resumable `checkpoint.pt` and the exported `student.pt`.

`checkpoint.pt` holds everything a resumed run needs to continue on the same data order and
loss curve (student, KD maps, optimizer, scheduler, EMA, step, epoch, batch within the epoch,
the resolved config). `student.pt` is a fairchem v1 checkpoint of the student alone, with the
EMA weights and its output transform as fairchem's "normalizers" and "elementrefs", which fairchem's
`OCPCalculator(checkpoint_path=...)` loads and applies as kdaug does; the KD maps are dropped.
Both are written to a temporary file and renamed, so a kill never leaves a half-written file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kdaug.data.run_record import atomic_write
from kdaug.models.fairchem_v1 import FairchemModel
from kdaug.train.losses import LossWeights


def fairchem_config(student: FairchemModel, *, batch_size: int, seed: int,
                    loss_weights: LossWeights = LossWeights()) -> dict[str, Any]:
    """A fairchem v1 (OCP 2.x layout) config that its `OCPCalculator` and trainers accept; its loss functions
    carry the coefficients the student was trained with."""
    return {
        "trainer": "ocp",
        "model": {"name": student.model_name, **student.model_kwargs},
        "kdaug_name": student.name,
        "outputs": {
            "energy": {"level": "system"},
            "forces": {"level": "atom", "train_on_free_atoms": True, "eval_on_free_atoms": True},
        },
        "loss_functions": [{"energy": {"fn": "mae", "coefficient": loss_weights.energy}},
                           {"forces": {"fn": "l2mae", "coefficient": loss_weights.forces}}],
        "evaluation_metrics": {"metrics": {"energy": ["mae"], "forces": ["mae", "cosine_similarity"]}},
        "optim": {"batch_size": batch_size, "eval_batch_size": batch_size},
        "dataset": {"format": "lmdb", "src": ""},
        "task": {},
        "cmd": {"seed": seed},
    }


def export_student(student: FairchemModel, path: Path, *, batch_size: int, seed: int,
                   loss_weights: LossWeights = LossWeights()) -> None:
    """Write the student's current weights and output transform as a fairchem v1 checkpoint."""
    state = {f"module.{key}": value.detach().cpu() for key, value in student.module.state_dict().items()}
    config = fairchem_config(student, batch_size=batch_size, seed=seed, loss_weights=loss_weights)
    checkpoint = {"state_dict": state, "config": config,
                  **student.output_transform.checkpoint_entries(), "amp": None}
    atomic_write(path, lambda handle: torch.save(checkpoint, handle))
