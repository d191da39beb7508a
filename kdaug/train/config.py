"""`TrainConfig`: every option of `kdaug train` (defaults <- --config YAML <- flags), with units.

Defaults follow the paper's PaiNN/SchNet OC20 setup (App. D, Tables 5-6) where it gives one:
AdamW with AMSGrad, energy/force coefficients 1/100, EMA 0.999, gradient clipping at 10.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kdaug.config import check_values, option
from kdaug.train.strategies import STRATEGIES, KdName, KDStrategy

# Options that may change when a run is resumed: they do not change what the run computes (out: a run folder
# may be moved), or, like max_steps, only how long it trains: early_stopping (the best value, its weights and the
# validations since it are tracked whether or not it is set, so a larger patience continues a stopped run and a
# smaller one stops it at its next validation). monitor and schedule may not change.
RESUMABLE_CHANGES = frozenset({"out", "device", "num_workers", "epochs", "max_steps", "checkpoint_every",
                               "log_every", "val_every", "val", "eval_batch_size", "restart", "early_stopping"})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Options of `kdaug train`; see `kdaug train --help`."""

    student: str = option(help="student model: a config name (painn-small, schnet, ...) or YAML")
    train: tuple[str, ...] = option(help="ground-truth (DFT) LMDB files or directories")
    out: str = option(help="run directory: checkpoint.pt, student.pt, log.jsonl, curves.png (one run at a time)")
    student_checkpoint: str | None = option(None, help="start the student from these weights (fairchem checkpoint)")
    teacher: str | None = option(None, help="teacher model for KD and online labels: name or YAML")
    teacher_checkpoint: str | None = option(None, help="teacher weights (fairchem checkpoint)")
    teacher_cache: str | None = option(
        None, help="directory written by `kdaug teacher-cache` (instead of a live teacher)")
    synthetic: tuple[str, ...] = option((), help="synthetic LMDBs (generate, rattle, adversarial or any LMDB)")
    val: tuple[str, ...] = option((), help="validation LMDBs, evaluated with the EMA weights")
    mix_ratio: float | None = option(
        None, help="alpha_target: share of synthetic samples per epoch (unset: plain concatenation)")
    rs_dft: float | None = option(None, help="r = w_s / w_dft, loss weight of synthetic relative to DFT samples")
    kd: KdName = option("none", help=f"KD strategy: {', '.join(STRATEGIES)}")
    kd_lambda: float | None = option(None, help="weight of the KD loss (default: the paper's Table 7 for the pair)")
    kd_loss: Literal["mse", "mae"] = option("mse", help="KD feature loss: mse or mae")
    energy_reference: Literal["linear", "none"] = option(
        "linear", help="per-element energy references fitted on --train/--synthetic by least squares (linear) or none")
    normalize: bool = option(
        False, help="scale the student's outputs by the energy/force spread of the training set (mean/rms), as "
                    "fairchem's normalize_labels; off by default: on the mini-emt study it doubled the energy MAE")
    energy_coefficient: float = option(1.0, help="alpha_E, weight of the energy loss")
    force_coefficient: float = option(100.0, help="alpha_F, weight of the force loss")
    online_rattle: float | None = option(
        None, help="online augmentation: Gaussian noise sigma on free atoms", unit="Angstrom")
    online_adversarial: int | None = option(None, help="online augmentation: adversarial steps against the student")
    online_share: float = option(0.25, help="share of each batch replaced by perturbed, teacher-labelled copies")
    batch_size: int = option(8, help="systems per batch (per rank under torchrun)")
    eval_batch_size: int = option(16, help="systems per batch for validation")
    epochs: int | None = option(None, help="epochs to train (an epoch has |DFT| + |synthetic| samples)")
    max_steps: int | None = option(None, help="optimizer steps to train (instead of --epochs)")
    lr: float = option(5e-4, help="initial learning rate")
    weight_decay: float = option(0.0, help="AdamW weight decay")
    amsgrad: bool = option(True, help="AdamW with AMSGrad")
    schedule: Literal["step", "cosine", "plateau"] = option(
        "step", help="learning-rate schedule after warmup: step (x lr_gamma at milestones), cosine (to the step "
                     "cap) or plateau (x lr_gamma after --plateau-patience validations without improvement of "
                     "--monitor; needs --val)")
    plateau_patience: int = option(2, help="plateau schedule: validations without improvement before the "
                                           "learning rate is multiplied by lr_gamma")
    early_stopping: int | None = option(
        None, help="stop after this many validations in a row without improvement of --monitor (below 0.1 % "
                   "under the best) and export the best validation's EMA weights; needs --val")
    monitor: Literal["energy", "forces", "l0"] = option(
        "forces", help="validation metric for --early-stopping and the plateau schedule: energy MAE, force MAE "
                       "or l0 (alpha_E energy MAE + alpha_F force MAE)")
    warmup_steps: int = option(0, help="linear warmup from warmup_factor x lr", unit="steps")
    warmup_factor: float = option(0.2, help="learning-rate factor at step 0 of the warmup")
    lr_milestones: tuple[int, ...] = option(
        (), help="step schedule: multiply the learning rate by lr_gamma at these steps", unit="steps")
    lr_gamma: float = option(0.1, help="step schedule: decay factor at each milestone")
    ema_decay: float = option(0.999, help="exponential moving average of the weights (0: off)")
    clip_grad_norm: float = option(10.0, help="gradient norm clipping threshold (0: off)")
    checkpoint_every: int = option(
        500, help="write checkpoint.pt every this many steps (and at the end)", unit="steps")
    log_every: int = option(1, help="write a log.jsonl line every this many steps", unit="steps")
    val_every: int | None = option(
        None, help="validate every this many steps (default: at the end of each epoch)", unit="steps")
    num_workers: int = option(0, help="DataLoader worker processes")
    restart: bool = option(False, help="start over in --out: remove the run files it holds (checkpoint.pt, "
                                       "config.json, log.jsonl, ...) instead of resuming them")
    seed: int = option(0, help="seeds data order, initialisation of the KD maps and online augmentation")
    device: str = option("cpu", help="cpu or cuda")

    def __post_init__(self) -> None:
        check_values(self, [
            (bool(self.train), "train", "at least one LMDB path"),
            (self.max_steps is None or self.max_steps > 0, "max_steps", "a positive number of steps"),
            (self.epochs is None or self.epochs > 0, "epochs", "a positive number"),
            ((self.epochs is None) != (self.max_steps is None), "epochs", "exactly one of --epochs, --max-steps"),
            (self.batch_size > 0, "batch_size", "a positive number"),
            (self.eval_batch_size > 0, "eval_batch_size", "a positive number"),
            (self.mix_ratio is None or 0 <= self.mix_ratio <= 1, "mix_ratio", "a value in [0, 1]"),
            (self.mix_ratio is None or self.mix_ratio == 0 or bool(self.synthetic), "mix_ratio",
             "--synthetic data when above 0"),
            (self.rs_dft is None or self.rs_dft > 0, "rs_dft", "a positive ratio w_s / w_dft"),
            (self.kd_lambda is None or self.kd_lambda >= 0, "kd_lambda", "a non-negative weight"),
            (self.energy_coefficient >= 0, "energy_coefficient", "a non-negative weight"),
            (self.force_coefficient >= 0, "force_coefficient", "a non-negative weight"),
            (self.energy_coefficient + self.force_coefficient > 0, "force_coefficient",
             "a positive weight when --energy-coefficient is 0 (nothing to learn otherwise)"),
            (self.lr > 0, "lr", "a positive learning rate"),
            (0 <= self.ema_decay < 1, "ema_decay", "a value in [0, 1)"),
            (self.online_rattle is None or self.online_rattle > 0, "online_rattle", "a positive sigma (Angstrom)"),
            (self.online_adversarial is None or self.online_adversarial > 0, "online_adversarial",
             "a positive number of steps"),
            (self.online_rattle is None or self.online_adversarial is None, "online_adversarial",
             "to be unset when --online-rattle is given"),
            (0 < self.online_share <= 1, "online_share", "a value in (0, 1]"),
            (self.teacher_cache is None or self.strategy.uses_teacher, "teacher_cache",
             "a --kd strategy to use it for"),
            (self.checkpoint_every > 0, "checkpoint_every", "a positive number of steps"),
            (self.log_every > 0, "log_every", "a positive number of steps"),
            (self.val_every is None or self.val_every > 0, "val_every", "a positive number of steps"),
            (self.early_stopping is None or self.early_stopping > 0, "early_stopping",
             "a positive number of validations"),
            (self.early_stopping is None or bool(self.val), "early_stopping", "--val data to monitor"),
            (self.schedule != "plateau" or bool(self.val), "schedule", "--val data to monitor for plateau"),
            (self.plateau_patience > 0, "plateau_patience", "a positive number of validations"),
            (self.num_workers >= 0, "num_workers", "0 (load in this process) or more worker processes"),
            (self.device.split(":")[0] in ("cpu", "cuda"), "device", "cpu or cuda"),
        ])

    @property
    def online(self) -> bool:
        return self.online_rattle is not None or self.online_adversarial is not None

    @property
    def strategy(self) -> KDStrategy:
        """The `KDStrategy` of --kd."""
        return STRATEGIES[self.kd]

    @property
    def needs_teacher(self) -> bool:
        return self.strategy.uses_teacher or self.online
