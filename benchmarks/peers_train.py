"""Training samples/s of `kdaug train` beside fairchem v1's own trainer (OCPTrainer), same model, data and batch.

    python -m benchmarks.peers_train [--student painn-small] [--systems 12] [--batch 8] [--device cpu]

One run: `kdaug generate` (EMT teacher) writes the LMDB directory both trainers read, with its metadata.npz.
Both train the student config (kdaug's `configs/models/<student>.yml`, fairchem's model section built from the
same file) for one epoch over that directory, batch `--batch`, AdamW with AMSGrad at a constant 5e-4, EMA 0.999,
gradient clipping at 10, loss 1 x energy MAE + 100 x per-atom L2 force error on free atoms, no normalizers, data loading
in the main process. kdaug's linear energy-reference fit runs before its first step and is left out, as is the
trainers' setup: samples/s is timed from the end of the second optimizer step to the end of the last (data
loading, forward, loss, backward, optimizer, EMA; fairchem also computes its training metrics per step).
fairchem's trainer is built the way `python -m fairchem.core._cli --mode train --config-yml fairchem.yml`
builds it (the YAML is written beside the data), so the lines fairchem logs about metadata.npz are printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_data(folder: Path, systems: int) -> Path:
    out = folder / "data"
    command = [sys.executable, "-m", "kdaug", "generate", "--teacher", "emt", "--n-systems", str(systems), "--out",
               str(out), "--max-miller", "1", "--optimizer", "lbfgs", "--max-steps", "30", "--frame-fraction", "0.5",
               "--num-workers", "1"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return out


def fairchem_config(student: str, data: Path, batch: int, device: str, folder: Path) -> dict:
    from kdaug.models.registry import read_model_config

    name, kwargs, _ = read_model_config(student)
    return {
        "trainer": "ocp",
        "model": {"name": name, **kwargs, "otf_graph": True},
        "outputs": {"energy": {"shape": 1, "level": "system"},
                    "forces": {"irrep_dim": 1, "level": "atom", "train_on_free_atoms": True,
                               "eval_on_free_atoms": True}},
        "loss_functions": [{"energy": {"fn": "mae", "coefficient": 1}},
                           {"forces": {"fn": "l2mae", "coefficient": 100}}],
        "evaluation_metrics": {"metrics": {"energy": ["mae"], "forces": ["mae"]}},
        "dataset": {"train": {"format": "lmdb", "src": str(data), "key_mapping": {"y": "energy", "force": "forces"}}},
        "optim": {"batch_size": batch, "eval_batch_size": batch, "num_workers": 0, "max_epochs": 1,
                  "optimizer": "AdamW", "optimizer_params": {"amsgrad": True}, "lr_initial": 5e-4,
                  "scheduler": "Null",
                  "ema_decay": 0.999, "clip_grad_norm": 10, "checkpoint_every": -1},
        "identifier": "peers", "run_dir": str(folder / "fairchem-run"), "is_debug": True, "logger": "tensorboard",
        "print_every": 10**6, "seed": 0, "local_rank": 0, "cpu": device == "cpu",
    }


def step_times(target: object, method: str) -> list[float]:
    """Wrap `target.method` so that the end time of each call is recorded (one call per optimizer step)."""
    times: list[float] = []
    original = getattr(target, method)

    def timed(*args, **kwargs):
        result = original(*args, **kwargs)
        times.append(time.perf_counter())
        return result

    setattr(target, method, timed)
    return times


def rate(times: list[float], batch: int) -> float:
    """Samples/s from the end of the second step to the end of the last (the first steps warm up)."""
    return (len(times) - 2) * batch / (times[-1] - times[1])


def run_fairchem(config: dict) -> tuple[float, int, list[str]]:
    """(samples/s, steps, fairchem's log lines about metadata)."""
    import yaml
    from fairchem.core.common.registry import registry
    from fairchem.core.common.utils import setup_imports

    setup_imports()
    (Path(config["run_dir"]).parent / "fairchem.yml").write_text(yaml.safe_dump(config))
    lines: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "metadata" in record.getMessage().lower():
                lines.append(f"{record.levelname}: {record.getMessage()}")

    handler = Catch()
    logging.getLogger().addHandler(handler)
    try:
        trainer = registry.get_trainer_class("ocp")(
            task={}, model=config["model"], outputs=config["outputs"], dataset=config["dataset"],
            optimizer=config["optim"], loss_functions=config["loss_functions"],
            evaluation_metrics=config["evaluation_metrics"], identifier="peers", run_dir=config["run_dir"],
            is_debug=True, print_every=config["print_every"], seed=0, logger="tensorboard", local_rank=0,
            cpu=config["cpu"], name="ocp")
        times = step_times(trainer, "_backward")
        trainer.train()
    finally:
        logging.getLogger().removeHandler(handler)
    return rate(times, config["optim"]["batch_size"]), len(times), lines


def run_kdaug(student: str, data: Path, batch: int, steps: int, device: str, folder: Path) -> tuple[float, int]:
    from kdaug.train.config import TrainConfig
    from kdaug.train.loop import Trainer

    config = TrainConfig(student=student, train=(str(data),), batch_size=batch, max_steps=steps, device=device,
                         out=str(folder / "kdaug-run"), seed=0)
    trainer = Trainer(config, progress=False)
    times = step_times(trainer, "train_step")
    try:
        trainer.run()
    finally:
        trainer.close()
    return rate(times, batch), len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="painn-small")
    parser.add_argument("--systems", type=int, default=12, help="EMT systems `kdaug generate` relaxes for the data")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()

    import torch

    from kdaug.data.lmdb import FrameDataset

    folder = Path(tempfile.mkdtemp(prefix="kdaug-peers-train-"))
    data = make_data(folder, args.systems)
    dataset = FrameDataset(data)
    n_frames, atoms = len(dataset), [f.n_atoms for f in dataset.iter_frames()]
    dataset.close()
    steps = math.ceil(n_frames / args.batch)
    print(f"{args.student} on {args.device} ({torch.get_num_threads()} threads), {n_frames} frames of "
          f"{min(atoms)}-{max(atoms)} atoms from `kdaug generate --teacher emt` (metadata.npz: "
          f"{(data / 'metadata.npz').exists()}), batch {args.batch}, one epoch = {steps} steps")
    torch.manual_seed(0)
    kdaug, kdaug_steps = run_kdaug(args.student, data, args.batch, steps, args.device, folder)
    torch.manual_seed(0)  # fairchem's trainer second: it keeps the LMDBs open (py-lmdb opens a file once per process)
    fairchem, fairchem_steps, lines = run_fairchem(fairchem_config(args.student, data, args.batch, args.device, folder))
    print("\n| trainer | steps | samples/s | x fairchem |\n| --- | --- | --- | --- |")
    print(f"| fairchem OCPTrainer | {fairchem_steps} | {fairchem:.2f} | 1.00 |")
    print(f"| kdaug train | {kdaug_steps} | {kdaug:.2f} | {kdaug / fairchem:.2f} |")
    print("fairchem's log lines about metadata:", json.dumps(lines) if lines else "none")


if __name__ == "__main__":
    main()
