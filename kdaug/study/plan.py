"""The student runs a study config asks for: baseline, KD strategies, extra data and online augmentation, in each
data regime (dft_fraction; labels beyond the whole ground truth carry " f=<share>", and synthetic subsamples
" x<scale>").

At dft_fraction 0 the students train on synthetic data alone: only the synthetic-data runs exist there, and
they are compared with the baseline of the largest share."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kdaug.study.config import StudyConfig
from kdaug.train.strategies import STRATEGIES, KDStrategy

SOURCES = ("generate", "rattle", "adversarial", "onpolicy", "disagreement")  # the data arms


@dataclass(frozen=True)
class RunSpec:
    """One student run: its table label, seed and what `kdaug train` gets beyond the baseline's options."""

    label: str
    seed: int
    kd: str = "none"  # the --kd value
    source: str | None = None  # synthetic data from the study's teacher: one of SOURCES
    mix_ratio: float | None = None
    rs_dft: float | None = None
    online_rattle: float | None = None
    online_adversarial: int | None = None
    online_share: float = 0.25
    dft_fraction: float = 1.0  # share of the ground-truth training systems the run sees (0: synthetic data only)
    synthetic_scale: float | None = None  # synthetic frames per ground-truth frame (None: all that were made)
    baseline: str = "student"  # label of the baseline run this one is compared with
    arm: str | None = None  # a synthetic-data run's label without its regime and scale (one line per arm in plots)

    @property
    def folder(self) -> str:
        """Run folder relative to the study folder: runs/<label slug>/seed<k>."""
        return f"runs/{slug(self.label)}/seed{self.seed}"

    @property
    def strategy(self) -> KDStrategy:
        return STRATEGIES[self.kd]

    @property
    def is_baseline(self) -> bool:
        return self.label == self.baseline


BASELINE = "student"


def slug(label: str) -> str:
    """A folder name for a run label ("generate a=0.5 +n2n" -> "generate_a0.5_n2n")."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", label.replace("=", "")).strip("_")


def plan_runs(config: StudyConfig, unsupported: dict[str, str]) -> tuple[list[RunSpec], list[dict[str, str]]]:
    """(runs in training order: baseline first, then per label all seeds; skipped strategies with the reason).

    `unsupported`: {KD mode the teacher-student pair cannot do: why} (from `kdaug.train.strategies.check_pair`).
    """
    skipped: list[dict[str, str]] = []

    def supported(mode: str) -> bool:
        if mode not in unsupported:
            return True
        if not any(s["strategy"] == mode for s in skipped):
            skipped.append({"strategy": mode, "reason": unsupported[mode]})
        return False

    labels: list[dict] = []
    for fraction in sorted(config.regimes.dft_fraction, reverse=True):  # the largest share's baseline first
        suffix = regime_suffix(fraction)
        baseline = BASELINE + regime_suffix(fraction or config.regimes.largest)
        labels += [{**fields, "label": fields["label"] + suffix, "dft_fraction": fraction, "baseline": baseline}
                   for fields in _arms(config, supported, fraction)]
    runs = [RunSpec(seed=seed, **fields) for fields in labels for seed in config.seeds]
    return runs, skipped


def regime_suffix(fraction: float) -> str:
    return "" if fraction == 1 else f" f={fraction:g}"


def _arms(config: StudyConfig, supported, fraction: float) -> list[dict]:
    """The runs of one regime (labels without the regime suffix)."""
    extra = config.extra
    sources = [name for name in SOURCES if source_enabled(config, name)]
    scales = config.regimes.synthetic_scale or (None,)
    if fraction == 0:  # synthetic data alone: no ground truth to mix with, weigh or distil on
        return [{"label": source + _scale_suffix(scale) + _kd_suffix(mode), "kd": mode, "source": source,
                 "synthetic_scale": scale, "arm": source + _kd_suffix(mode)}
                for source in sources for scale in scales for mode in extra.kd if supported(mode)]
    arms: list[dict] = [{"label": BASELINE}]
    arms += [{"label": mode, "kd": mode} for mode in config.strategies
             if STRATEGIES[mode].uses_teacher and supported(mode)]
    for source in sources:
        for alpha in extra.mix_ratios:
            for r in extra.rs_dft:
                for scale in scales:
                    for mode in extra.kd:
                        if supported(mode):
                            mix = f"{source} a={alpha:g}" + (f" r={r:g}" if r != 1 else "")
                            arm, label = mix + _kd_suffix(mode), mix + _scale_suffix(scale) + _kd_suffix(mode)
                            arms.append({"label": label, "kd": mode, "source": source, "mix_ratio": alpha,
                                         "rs_dft": r, "synthetic_scale": scale, "arm": arm})
    online = config.online
    for kind, values in (("rattle", online.rattle), ("adversarial", online.adversarial)):
        for value in values:
            for mode in online.kd:
                if supported(mode):
                    arms.append({"label": f"online {kind} {value:g}" + _kd_suffix(mode), "kd": mode,
                                 f"online_{kind}": value, "online_share": online.share})
    return arms


def source_enabled(config: StudyConfig, source: str) -> bool:
    """Whether the study config asks for the synthetic data `source` (one of SOURCES)."""
    extra = config.extra
    return bool({"generate": extra.generate_systems, "rattle": extra.rattle_copies,
                 "adversarial": extra.adversarial_steps, "onpolicy": extra.onpolicy_systems,
                 "disagreement": extra.disagreement_keep}[source])


def _scale_suffix(scale: float | None) -> str:
    return "" if scale is None else f" x{scale:g}"


def _kd_suffix(mode: str) -> str:
    return f" +{mode}" if STRATEGIES[mode].uses_teacher else ""

