"""`StudyConfig`: one YAML in configs/studies/ describing a whole `kdaug study` (see kdaug/study/__init__.py).

Sections: `data` (existing LMDBs and/or a "DFT" set the study generates with an ASE/ML labeller),
`teacher` and `student` (model, optional checkpoint, training budget), `strategies` (KD modes),
`extra` (synthetic data the study makes with its trained teacher, mixed at given ratios),
`online` (online augmentation runs) and `cka`.
"""

from __future__ import annotations

from dataclasses import dataclass, make_dataclass
from typing import Literal

from kdaug.config import check_values, option
from kdaug.train.strategies import STRATEGIES, KdName


@dataclass(frozen=True, kw_only=True)
class DftGeneration:
    """A ground-truth ("DFT") set the study labels itself with `kdaug generate` (EMT stands in for DFT)."""

    teacher: str = option("emt", help="labeller: emt, chgnet, ase:module:Class, or a model config with checkpoint")
    checkpoint: str | None = option(None, help="labeller checkpoint (GNN labellers)")
    device: str = option("cpu", help="the labeller's device (EMT runs on the CPU whatever the study's device)")
    train_systems: int = option(0, help="relaxed systems for the training set (0: no generated set)")
    val_systems: int = option(0, help="further systems (other seed) for the held-out validation set")
    seed: int = option(0, help="generate seed of the training systems; validation uses seed + 1")
    adsorbate_ids: tuple[int, ...] | None = option(None, help="fairchem-data-oc adsorbate ids to draw from")
    elements: tuple[str, ...] | None = option(
        None, help="draw only embedded bulks made of these elements (e.g. [Cu, Pt]; default: all bulks)")
    max_miller: int = option(1, help="largest Miller index of sampled slabs")
    fmax: float = option(0.05, help="relaxation convergence threshold", unit="eV/A")
    max_steps: int = option(100, help="optimizer steps per system at most")
    frame_fraction: float = option(0.3, help="probability of keeping each relaxation frame")


@dataclass(frozen=True, kw_only=True)
class DataSection:
    """Training and validation data: given LMDBs, plus the generated set when `generate` asks for one."""

    train: tuple[str, ...] = option((), help="ground-truth training LMDBs (besides a generated set)")
    val: tuple[str, ...] = option((), help="validation sets, each evaluated and tabulated on its own")
    generate: DftGeneration = option(default_factory=DftGeneration, help="a generated ground-truth set")


@dataclass(frozen=True, kw_only=True)
class Budget:
    """How one model is trained: a `kdaug train` YAML recipe plus the values set here (unset: the recipe's)."""

    recipe: str | None = option(None, help="kdaug train YAML (e.g. configs/train/painn-oc20.yml)")
    epochs: int | None = option(None, help="epochs per run")
    max_steps: int | None = option(None, help="optimizer steps per run (instead of epochs)")
    batch_size: int | None = option(None, help="systems per batch")
    lr: float | None = option(None, help="initial learning rate")
    ema_decay: float | None = option(None, help="EMA of the weights used for validation and export")
    val_every: int | None = option(None, help="validate every this many steps (learning curves)", unit="steps")
    energy_reference: Literal["linear", "none"] | None = option(None, help="per-element energy references (kdaug "
                                                                          "train --energy-reference)")
    normalize: bool | None = option(None, help="output normalizers (kdaug train --normalize)")
    energy_coefficient: float | None = option(None, help="alpha_E, weight of the energy loss (kdaug train "
                                                         "--energy-coefficient)")
    force_coefficient: float | None = option(None, help="alpha_F, weight of the force loss (kdaug train "
                                                        "--force-coefficient)")
    early_stopping: int = option(
        5, help="stop a run after this many validations without improvement of the monitored metric and keep "
                "its best weights (kdaug train --early-stopping; every study run stops this way)")
    monitor: Literal["energy", "forces", "l0"] | None = option(
        None, help="validation metric for early stopping (kdaug train --monitor; default the force MAE)")
    schedule: Literal["step", "cosine", "plateau"] | None = option(
        None, help="learning-rate schedule (kdaug train --schedule)")
    plateau_patience: int | None = option(None, help="plateau schedule patience (kdaug train --plateau-patience)")

    def __post_init__(self) -> None:
        check_values(self, [
            (self.epochs is None or self.epochs > 0, "epochs", "a positive number of epochs"),
            (self.max_steps is None or self.max_steps > 0, "max_steps", "a positive number of steps"),
            (self.batch_size is None or self.batch_size > 0, "batch_size", "a positive number"),
            (self.lr is None or self.lr > 0, "lr", "a positive learning rate"),
            (self.ema_decay is None or 0 <= self.ema_decay < 1, "ema_decay", "a value in [0, 1)"),
            (self.val_every is None or self.val_every > 0, "val_every", "a positive number of steps"),
            (self.energy_coefficient is None or self.energy_coefficient >= 0, "energy_coefficient",
             "a weight >= 0"),
            (self.force_coefficient is None or self.force_coefficient >= 0, "force_coefficient", "a weight >= 0"),
            (self.early_stopping > 0, "early_stopping",
             "a positive number of validations (every study run stops early)"),
        ])


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    """A model of the study: config name or YAML, and either its checkpoint or how to train it."""

    model: str = option(help="model config name (painn-small, schnet, ...) or YAML path")
    checkpoint: str | None = option(None, help="trained weights (teacher: skip its training)")
    train: Budget = option(default_factory=Budget, help="training budget")


KdLambdas = make_dataclass(
    "KdLambdas", [(name, float | None, option(None, help=f"{name} weight"))
                  for name, strategy in STRATEGIES.items() if strategy.uses_teacher],
    frozen=True, kw_only=True,
    namespace={"__module__": __name__,
               "__doc__": "lambda of L = L0 + lambda L_KD per strategy, one field per strategy that uses a teacher "
                          "(unset: the paper's Table 7 for the pair, where it has one)."})


@dataclass(frozen=True, kw_only=True)
class ExtraData:
    """Synthetic data made by the study with its trained teacher; each enabled source x mix ratio x r_s/dft x
    KD mode is one more student run. The sources (data arms): generate (teacher relaxations, d1M-style), rattle,
    adversarial, onpolicy (relaxations driven by the baseline student) and disagreement (generate's frames the
    baseline student gets most wrong). Adversarial, onpolicy and disagreement use the first seed's baseline
    student of the largest dft_fraction."""

    generate_systems: int = option(0, help="systems relaxed by the teacher (kdaug generate; 0: off)")
    generate_max_steps: int = option(100, help="teacher relaxation steps per system at most")
    generate_frame_fraction: float = option(0.3, help="probability of keeping each relaxation frame")
    rattle_copies: int = option(0, help="rattled copies of each training frame (kdaug rattle; 0: off)")
    rattle_sigma: float = option(0.05, help="rattle noise", unit="Angstrom")
    adversarial_steps: int = option(0, help="attack steps against the baseline student (kdaug adversarial; 0: off)")
    adversarial_alpha: float = option(0.01, help="attack step size", unit="Angstrom per unit gradient")
    onpolicy_systems: int = option(
        0, help="systems relaxed by the baseline student's forces and labelled by the teacher (kdaug generate "
                "--driver; the first of generate's systems, same steps and frame share; 0: off)")
    disagreement_keep: float = option(
        0.0, help="share of the generate frames kept where the baseline student disagrees most with the teacher "
                  "(kdaug select; with regimes.synthetic_scale the scale's frame count instead; 0: off)")
    mix_ratios: tuple[float, ...] = option((0.5,), help="alpha_target values (share of synthetic samples)")
    rs_dft: tuple[float, ...] = option((1.0,), help="r = w_s / w_dft values")
    kd: tuple[KdName, ...] = option(("none",), help="KD modes trained with the extra data")

    def __post_init__(self) -> None:
        check_values(self, [
            (self.generate_systems >= 0, "generate_systems", "0 (off) or more"),
            (self.rattle_copies >= 0, "rattle_copies", "0 (off) or more"),
            (self.adversarial_steps >= 0, "adversarial_steps", "0 (off) or more"),
            (self.onpolicy_systems >= 0, "onpolicy_systems", "0 (off) or more"),
            (0 <= self.disagreement_keep <= 1, "disagreement_keep", "a share in [0, 1] (0: off)"),
            (not self.disagreement_keep or self.generate_systems > 0, "disagreement_keep",
             "generate_systems > 0 (the frames it selects from)"),
            (all(0 <= a <= 1 for a in self.mix_ratios), "mix_ratios", "values in [0, 1]"),
            (all(r > 0 for r in self.rs_dft), "rs_dft", "positive ratios"),
        ])


@dataclass(frozen=True, kw_only=True)
class OnlineSection:
    """Online augmentation runs (kdaug train --online-rattle / --online-adversarial), one per value x KD mode."""

    rattle: tuple[float, ...] = option((), help="online rattle sigmas", unit="Angstrom")
    adversarial: tuple[int, ...] = option((), help="online adversarial step counts")
    share: float = option(0.25, help="share of each batch replaced by perturbed copies")
    kd: tuple[KdName, ...] = option(("none",), help="KD modes trained with online augmentation")


@dataclass(frozen=True, kw_only=True)
class Regimes:
    """Data regimes of the students (the teacher always trains on all the ground truth): each dft_fraction is one
    regime of every run; each synthetic_scale one more run per synthetic-data run."""

    dft_fraction: tuple[float, ...] = option(
        (1.0,), help="shares of the ground-truth training systems (by system id) the students see; 0: students on "
                     "teacher-labelled synthetic data only (mix ratio 1; baseline and KD-on-ground-truth runs "
                     "then have no data and are left out)")
    synthetic_scale: tuple[float, ...] = option(
        (), help="synthetic frames as multiples of the student's ground-truth frames (at dft_fraction 0: of the "
                 "whole training set's), subsampled (or all, when fewer were made); empty: every synthetic frame")
    seed: int = option(0, help="seed of the system split and of the synthetic subsample")

    def __post_init__(self) -> None:
        check_values(self, [
            (bool(self.dft_fraction) and all(0 <= f <= 1 for f in self.dft_fraction)
             and len(set(self.dft_fraction)) == len(self.dft_fraction), "dft_fraction", "distinct shares in [0, 1]"),
            (max(self.dft_fraction) > 0, "dft_fraction", "a share above 0 among them (the baseline's regime)"),
            (all(s > 0 for s in self.synthetic_scale) and len(set(self.synthetic_scale)) == len(self.synthetic_scale),
             "synthetic_scale", "distinct positive multiples"),
        ])

    @property
    def largest(self) -> float:
        """The regime with the most ground truth: its baseline is the reference of dft_fraction 0."""
        return max(self.dft_fraction)


@dataclass(frozen=True, kw_only=True)
class CkaSection:
    """Teacher-student CKA maps of every student run against the teacher."""

    enabled: bool = option(True, help="compute CKA maps and per-strategy similarity gains")
    max_samples: int = option(32, help="validation frames whose atoms the CKA uses")


@dataclass(frozen=True, kw_only=True)
class StudyConfig:
    """Options of `kdaug study` (a YAML in configs/studies/)."""

    name: str = option(help="study name (titles of the table and plots)")
    out: str = option(help="study folder: data/, teacher/, runs/<run>/seed<k>/, results.md, results.json, plots")
    teacher: ModelSection = option(help="the teacher: trained here on the ground truth unless checkpoint is set")
    student: ModelSection = option(help="the student: its baseline and every strategy use this model and budget")
    data: DataSection = option(default_factory=DataSection, help="training and validation data")
    strategies: tuple[KdName, ...] = option(
        ("vanilla1", "vanilla2", "n2n", "e2n", "v2v"), help="KD modes on the ground truth (skipped with a note "
                                                            "where the pair cannot do one)")
    kd_lambda: KdLambdas = option(default_factory=KdLambdas, help="KD loss weight per mode")
    extra: ExtraData = option(default_factory=ExtraData, help="synthetic data from the trained teacher")
    online: OnlineSection = option(default_factory=OnlineSection, help="online augmentation")
    regimes: Regimes = option(default_factory=Regimes, help="data regimes: ground-truth share, synthetic scale")
    cka: CkaSection = option(default_factory=CkaSection, help="CKA similarity")
    seeds: tuple[int, ...] = option((0,), help="student seeds; the table shows mean and spread over them")
    teacher_seed: int = option(0, help="seed of the teacher's training")
    checkpoint_every: int = option(50, help="checkpoint every this many steps (a killed study resumes there)",
                                   unit="steps")
    eval_batch_size: int = option(16, help="systems per batch when evaluating")
    device: str = option("cpu", help="cpu or cuda")

    def __post_init__(self) -> None:
        check_values(self, [
            (bool(self.seeds) and len(set(self.seeds)) == len(self.seeds), "seeds", "distinct seeds (at least one)"),
            (self.checkpoint_every > 0, "checkpoint_every", "a positive number of steps"),
            (self.eval_batch_size > 0, "eval_batch_size", "a positive number"),
        ])
