"""`run_train`: train a student on DFT + synthetic data, with or without knowledge distillation.

Before the first step of a fresh run the student's output transform (per-element energy references,
energy/force normalizers; `kdaug.train.target_stats`) is fitted on the training set, unless the student
checkpoint brings its own (kept: it is part of those weights). A resumed run takes it from checkpoint.pt.

Per step: a batch drawn by `MixedBatchSampler` (alpha_target of synthetic samples per epoch),
optionally a share of it replaced by online-perturbed, teacher-labelled copies, per-system weights
from r_s/dft, then L = L0 + lambda L_KD on the student, AdamW, gradient clipping, LR schedule and EMA.

Run directory (`--out`)::

    out/
      config.json        the run's record: resolved options, fingerprints of --train/--synthetic, sha256 of the
                         teacher and student-init checkpoints (a resume must agree outside RESUMABLE_CHANGES)
      checkpoint.pt      resumable state, replaced whole every --checkpoint-every steps and at the end
      student.pt         the exported student (EMA weights; with --early-stopping those of the best validation),
                         a fairchem v1 checkpoint
      log.jsonl          one line per --log-every steps ({"step", "loss", ...}), per validation ({"step", "val",
                         "monitor"}) and one at the end ({"stopped": {"step", "reason", "best_step", "best"}})
      curves.png         learning curves, written at the end
      visits.rankR.npy   how often rank R drew each training sample (DFT first, then synthetic),
                         written at the end (checkpoint.pt holds them for resuming)
      .run.lock          flock held by the one run writing the folder (pid, host, command inside)

Inputs are checked before anything is written, damaged run state is one line, and a failed write (full
disk) keeps the last good checkpoint (`kdaug.train.run_folder`).

Under torchrun every rank trains on its own disjoint part of each epoch; the student and its KD head train
as one module under DistributedDataParallel (`kdaug.train.distributed`), checkpoints and the export hold
the unwrapped weights; rank 0 validates and writes the files.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kdaug.data.run_record import to_json
from kdaug.data.training_set import TrainingSet, collate
from kdaug.errors import KdaugError, write_error
from kdaug.evaluate import evaluate
from kdaug.models import load_model, load_teacher
from kdaug.models.fairchem_v1 import FairchemModel
from kdaug.train.checkpoint import export_student
from kdaug.train.config import TrainConfig
from kdaug.train.distributed import Distributed
from kdaug.train.early_stopping import Plateau, ValidationMonitor
from kdaug.train.kd import KDHead, TargetSource, TeacherTargets, default_kd_lambda
from kdaug.train.losses import LossWeights, energy_force_loss
from kdaug.train.mixing import MixedBatchSampler, batch_weights
from kdaug.train.online import OnlineAugmenter
from kdaug.train.report import plot_curves
from kdaug.train.run_folder import RunFolder, check_inputs
from kdaug.train.schedule import build_scheduler
from kdaug.train.strategies import LiveTeacher, build_kd_head, check_pair
from kdaug.train.student_head import StudentWithHead, unused_parameters
from kdaug.train.target_stats import fit_output_transform
from kdaug.train.teacher_cache import TeacherCache

logger = logging.getLogger(__name__)


def load_student(config: TrainConfig, device: torch.device) -> FairchemModel:
    student = load_model(config.student, config.student_checkpoint, device=device)
    if not isinstance(student, FairchemModel):
        raise KdaugError(f"--student {config.student}: expected a trainable fairchem GNN config "
                         "(painn-small, painn-big, schnet, ... or a YAML)")
    return student.train()


class Trainer:
    """One training run (see the module docstring); `run()` trains to the end and returns the summary."""

    def __init__(self, config: TrainConfig, *, progress: bool = True) -> None:
        check_inputs(config)
        self.config = config
        self.progress = progress
        self.out = Path(config.out)
        self.folder = RunFolder(self.out)
        self.dist = Distributed.from_environment(config.device)
        self.device = self.dist.device
        self.data = TrainingSet(config.train, config.synthetic)
        if config.val and self.dist.is_main:  # checked now, not after training
            TrainingSet(config.val, flags=("--val", "--val")).close()
        self.sampler = MixedBatchSampler(self.data.n_dft, self.data.n_synthetic, config.batch_size,
                                         mix_ratio=config.mix_ratio, seed=config.seed, rank=self.dist.rank,
                                         world_size=self.dist.world_size)
        if len(self.sampler) == 0:
            raise KdaugError(f"--batch-size {config.batch_size}: an epoch of {len(self.data)} samples over "
                             f"{self.dist.world_size} rank(s) gives no batch")
        self.total_steps = config.max_steps or config.epochs * len(self.sampler)
        torch.manual_seed(config.seed)
        self.strategy = config.strategy
        self.student = load_student(config, self.device)
        self.teacher, self.source = self._teacher_source()
        for model in (self.student, self.teacher):  # the same structures come back every epoch
            if model is not None:
                model.cache_graphs()
        self.head = self._kd_head()
        self.kd_lambda = self._kd_lambda()
        self.loss_weights = LossWeights(config.energy_coefficient, config.force_coefficient)
        self.online = OnlineAugmenter.from_config(config, self.student, self.teacher)
        self.parameters = [*self.student.parameters(), *self.head.parameters()]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.lr, weight_decay=config.weight_decay,
                                           amsgrad=config.amsgrad)
        self.monitor = ValidationMonitor(config.monitor, self.loss_weights, plateau=Plateau(
            patience=config.plateau_patience, gamma=config.lr_gamma) if config.schedule == "plateau" else None)
        self.scheduler = build_scheduler(self.optimizer, plateau=self.monitor.plateau, total_steps=self.total_steps,
                                         warmup_steps=config.warmup_steps, warmup_factor=config.warmup_factor,
                                         schedule=config.schedule, milestones=config.lr_milestones,
                                         gamma=config.lr_gamma)
        self.ema = _ema(self.student, config.ema_decay)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.visits = np.zeros(len(self.data), dtype=np.int32)
        self._resume_or_start()
        self.model = self._engine()  # after resume: DDP starts every rank from rank 0's state

    # -- setup --------------------------------------------------------------------------
    def _teacher_source(self) -> tuple[torch.nn.Module | None, TargetSource | None]:
        """(the live teacher, where the KD targets come from): a teacher cache, attached to the training set so
        its targets come with the samples, or the live teacher; (None, None) without a teacher."""
        config = self.config
        if config.needs_teacher and config.teacher is None:
            raise KdaugError(f"--kd {config.kd} / online augmentation: needs --teacher (and --teacher-checkpoint "
                             "for a GNN teacher)")
        if config.teacher_cache and config.online:
            raise KdaugError("--teacher-cache: online-perturbed samples need a live teacher; drop --teacher-cache")
        if not config.needs_teacher:
            return None, None
        teacher = load_teacher(config.teacher, config.teacher_checkpoint, device=self.device)
        check_pair(self.strategy, self.student, teacher)
        if not config.teacher_cache:
            return teacher, LiveTeacher(teacher, self.strategy)
        cache = TeacherCache.open(config.teacher_cache, self.data.fingerprints(), teacher.checkpoint_sha256,
                                  self.strategy, names=self.data.names(), teacher_identity=teacher.identity)
        self.data.attach(cache)
        return teacher, cache

    def _kd_head(self) -> KDHead:
        if not self.strategy.uses_teacher:
            return self.strategy.head()  # maps nothing, has no weights
        sample = collate([self.data[i] for i in range(min(2, len(self.data)))]).to(self.device)
        return build_kd_head(self.strategy, self.student, self.source, sample)

    def _engine(self) -> torch.nn.Module:
        """Student and head in one module, under DDP with more than one rank."""
        model = StudentWithHead(self.student, self.head)
        if self.dist.world_size == 1:
            return model
        sample = collate([self.data[i] for i in range(min(2, len(self.data)))]).to(self.device)
        unused = unused_parameters(model, sample, self.strategy.student_taps)
        if unused:
            logger.info("parameters without a gradient (DDP finds them each step): %s", ", ".join(unused))
        return self.dist.wrap(model, find_unused_parameters=bool(unused))

    def _kd_lambda(self) -> float:
        config = self.config
        if not self.strategy.uses_teacher:
            return 0.0
        if config.kd_lambda is not None:
            return config.kd_lambda
        value = default_kd_lambda(self.teacher.name, self.student.name, self.strategy)
        if value is None:
            raise KdaugError(f"--kd-lambda: the paper's Table 7 has no weight for teacher {self.teacher.name} -> "
                             f"student {self.student.name} with {config.kd}; pass --kd-lambda")
        return value

    def _record(self) -> dict:
        """What this run is made of: its options, its data's fingerprints and its checkpoints' sha256."""
        fingerprints = self.data.fingerprints()  # --train paths, then --synthetic (each given once)
        n_train = len(self.config.train)
        return {**to_json(self.config), "train_fingerprints": fingerprints[:n_train],
                "synthetic_fingerprints": fingerprints[n_train:],
                "teacher_checkpoint_sha256": self.teacher.checkpoint_sha256 if self.teacher is not None else None,
                "student_checkpoint_sha256": self.student.checkpoint_sha256 if self.config.student_checkpoint
                else None}

    def _resume_or_start(self) -> None:
        self.record = record = self._record()
        try:
            if self.dist.is_main:
                self.folder.claim(restart=self.config.restart)
            self.dist.barrier()
            state = self.folder.checkpoint(self.device)
            self.folder.check_resume(record, state)
        except BaseException:
            self.folder.release()
            raise
        if state is not None:
            try:
                self._load(state)
            except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:  # weights of another shape
                raise self.folder.damaged("checkpoint.pt", err) from err
            logger.info("resuming %s at step %d", self.out, self.step)
        else:
            logger.info("student output transform: %s", self._fit_output_transform())
        if self.dist.is_main:
            self.folder.cut_log(state["log_records"] if state is not None else 0)  # reads it whole first
            self.folder.write_config(record)
            if self.step < self.total_steps and state is not None:  # training continues (not only the export)
                self._log({"step": self.step, "epoch": self.epoch, "resumed": True})

    def _fit_output_transform(self) -> dict:
        """Fit the student's output transform on the training set (a student checkpoint's own is kept);
        what it holds now and where from, for the log."""
        transform = self.student.output_transform
        config = self.config
        if not transform.is_identity:
            source = f"kept from --student-checkpoint {config.student_checkpoint}"
        elif config.energy_reference == "none" and not config.normalize:
            source = "none (--energy-reference none, no --normalize)"  # nothing to fit: no pass over the data
        else:
            fitted = fit_output_transform(self.data, energy_reference=config.energy_reference,
                                          normalize=config.normalize, conservative=self.student.conservative,
                                          seed=config.seed)
            transform.set(energy=fitted.energy, forces=fitted.forces, references=fitted.references)
            source = f"fitted on {fitted.n_samples} training samples"
        references = transform.references.element_references
        return {"source": source, "energy_mean": float(transform.energy.mean),
                "energy_rmsd": float(transform.energy.rmsd), "forces_rmsd": float(transform.forces.rmsd),
                "references": {int(z): float(references[z]) for z in references.nonzero().flatten()}}

    def _state(self) -> dict:
        return {"student": self.student.state_dict(), "head": self.head.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None, "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "config": self.record, "monitor": self.monitor.state_dict(),
                "visits": self.dist.gather(torch.from_numpy(self.visits)).numpy(),
                "log_records": self.folder.log_records}

    def _load(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.monitor.load_state_dict(state["monitor"])
        if len(state["visits"]) == self.dist.world_size:  # counts per rank of this world size
            self.visits = state["visits"][self.dist.rank].copy()

    # -- one step -----------------------------------------------------------------------
    def _targets(self, batch) -> TeacherTargets:
        return self.source.targets(batch)

    def train_step(self, batch) -> dict[str, float]:
        """One optimizer step on `batch`; returns the scalars to log."""
        batch = batch.to(self.device)
        targets = None
        if self.online is not None:
            targets = self.online.augment(batch, step=self.step, seed=self.config.seed)
        elif self.strategy.uses_teacher:
            targets = self._targets(batch)
        weights = batch_weights(batch.synthetic, self.config.rs_dft)
        if self.strategy.needs_pos_grad:
            batch.pos.requires_grad_(True)
        output, mapped = self.model(batch, taps=self.strategy.student_taps)
        free = ~batch.fixed.bool()
        l0, parts = energy_force_loss(output.energy, output.forces, batch.y.to(output.energy.dtype),
                                      batch.force.to(output.forces.dtype), batch.batch, free, weights,
                                      self.loss_weights)
        loss = l0
        kd_value = torch.zeros(())
        if self.strategy.uses_teacher:
            kd_value = self.strategy.loss(self.student, batch, output, mapped, targets, weights,
                                          loss=self.config.kd_loss, l0_weights=self.loss_weights)
            loss = l0 + self.kd_lambda * kd_value
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()  # under DDP: gradients averaged over the ranks, in buckets during the backward
        if self.config.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.config.clip_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()
        return {"loss": float(loss), "l0": float(l0), "energy": float(parts["energy"]),
                "forces": float(parts["forces"]), "kd": float(kd_value),
                "synthetic_share": float(batch.synthetic.float().mean())}

    # -- the run ------------------------------------------------------------------------
    def run(self) -> dict:
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit=" steps",
                   disable=not (self.progress and self.dist.is_main))
        try:
            self._train(bar)
        finally:  # an error prints on its own line
            bar.close()
        self.save()
        return self.finish()

    def _train(self, bar: tqdm) -> None:
        config = self.config
        while self.step < self.total_steps and not self.stopped_early:
            epoch_batches = self.sampler.epoch_batches(self.epoch)
            batches = epoch_batches[self.batch_in_epoch:]
            loader = torch.utils.data.DataLoader(self.data, batch_sampler=batches, collate_fn=collate,
                                                 num_workers=config.num_workers)
            started, samples = time.perf_counter(), 0
            for indices, batch in zip(batches, loader):
                scalars = self.train_step(batch)
                np.add.at(self.visits, indices, 1)
                self.step += 1
                self.batch_in_epoch += 1
                samples += len(indices) * self.dist.world_size
                speed = samples / (time.perf_counter() - started)
                bar.update(1)
                bar.set_postfix(loss=f"{scalars['loss']:.4g}", samples_s=f"{speed:.1f}")
                if self.step % config.log_every == 0:
                    self._log({"step": self.step, "epoch": self.epoch, "lr": self.scheduler.get_last_lr()[0],
                               **scalars, "samples_per_s": speed})
                if config.val_every and self.step % config.val_every == 0:
                    self.validate()
                if self.step % config.checkpoint_every == 0:
                    self.save()
                if self.step >= self.total_steps or self.stopped_early:
                    break
            if self.batch_in_epoch == len(epoch_batches):  # an epoch ended (also on the run's last step)
                self.epoch += 1
                self.batch_in_epoch = 0
                if not config.val_every and self.step < self.total_steps:  # finish() validates the last
                    self.validate()

    @property
    def stopped_early(self) -> bool:
        return self.monitor.exhausted(self.config.early_stopping)

    def validate(self) -> dict | None:
        """Metrics of the EMA weights on --val (rank 0; logged with the monitored metric, which a repeated
        validation of the same step does not count again), None without --val (and on the other ranks, which
        receive the monitor's patience count and learning-rate reduction)."""
        if not self.config.val:
            return None
        metrics = None
        if self.dist.is_main:
            record = {"step": self.step, "epoch": self.epoch}
            with self.ema_weights():
                metrics = evaluate(self.student, self.config.val, batch_size=self.config.eval_batch_size,
                                   device=self.device)
                if self.monitor.last_step != self.step:
                    record["monitor"] = self.monitor.update(self.step, metrics, self.student.state_dict(),
                                                            in_warmup=self.step <= self.config.warmup_steps)
            self._log({**record, "val": metrics})
        self._share_monitor()
        return metrics

    def _share_monitor(self) -> None:
        """Every rank stops and reduces the learning rate with rank 0."""
        if self.dist.world_size == 1:
            return
        plateau = self.monitor.plateau
        shared = torch.tensor([self.monitor.bad, plateau.reduction if plateau else 1.0], dtype=torch.float64,
                              device=self.device)
        self.dist.broadcast(shared)
        self.monitor.bad = int(shared[0])
        if plateau is not None:
            plateau.reduction = float(shared[1])

    def save(self) -> None:
        state = self._state()  # a collective call: every rank takes part
        if self.dist.is_main:
            self.folder.save(state)
        self.dist.barrier()

    def finish(self) -> dict:
        """Validate, log why the run stopped, export the EMA student (with --early-stopping: the best
        validation's), plot; the summary of the run ("val": the exported weights' metrics)."""
        metrics = self.validate()
        monitor = self.monitor
        stopped = {"step": self.step, "reason": "early_stopping" if self.step < self.total_steps else "max_steps",
                   "best_step": monitor.best_step, "best": monitor.best}
        summary = {"steps": self.step, "epochs": self.epoch, "out": str(self.out), "stopped": stopped}
        if self.dist.is_main:
            self._log({"stopped": stopped})
            best = self.config.early_stopping is not None and monitor.best_weights is not None
            with _BestWeights(self.student, monitor.best_weights) if best else self.ema_weights():
                export_student(self.student, self.out / "student.pt", batch_size=self.config.batch_size,
                               seed=self.config.seed, loss_weights=self.loss_weights)
            if metrics is not None:
                summary["val"] = monitor.best_metrics if best else metrics
            plot_curves(self.out / "log.jsonl", self.out / "curves.png")
        visits = self.out / f"visits.rank{self.dist.rank}.npy"
        try:
            np.save(visits, self.visits)
        except OSError as err:
            raise write_error(visits, err) from err
        self.dist.barrier()
        return summary

    def close(self) -> None:
        """Release the data files (a teacher cache's too: the training set holds it) and the process group."""
        self.data.close()
        self.folder.release()
        self.dist.close()

    def ema_weights(self):
        return _EmaWeights(self.ema, self.student)

    def _log(self, record: dict) -> None:
        if self.dist.is_main:
            self.folder.log(record)


class _EmaWeights:
    """Context: the student holds its EMA weights inside, its training weights again after."""

    def __init__(self, ema, student) -> None:
        self.ema, self.student = ema, student

    def __enter__(self) -> None:
        if self.ema is not None:
            self.ema.store()
            self.ema.copy_to()

    def __exit__(self, *exc: object) -> None:
        if self.ema is not None:
            self.ema.restore()


class _BestWeights:
    """Context: the student holds the best validation's (EMA) weights inside, its training weights again after."""

    def __init__(self, student: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        self.student, self.weights = student, weights

    def __enter__(self) -> None:
        self.saved = {key: tensor.detach().clone() for key, tensor in self.student.state_dict().items()}
        self.student.load_state_dict(self.weights)

    def __exit__(self, *exc: object) -> None:
        self.student.load_state_dict(self.saved)


def _ema(student: torch.nn.Module, decay: float):
    if decay == 0:
        return None
    from fairchem.core.modules.exponential_moving_average import ExponentialMovingAverage

    return ExponentialMovingAverage(student.parameters(), decay)


def run_train(config: TrainConfig, *, progress: bool = True) -> dict:
    """Train (or resume) the run `config.out`; returns {"steps", "epochs", "out", "val"?}."""
    trainer = Trainer(config, progress=progress)
    try:
        return trainer.run()
    finally:
        trainer.close()
