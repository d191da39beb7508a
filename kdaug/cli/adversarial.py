"""`kdaug adversarial --input PATH --student CKPT --teacher T --steps 5 --out PATH`."""

from __future__ import annotations

import argparse
import json

from kdaug.cli.rattle import PERTURB_HELP
from kdaug.config import add_config_arguments, build_config
from kdaug.perturb.adversarial import AdversarialConfig, run_adversarial

HELP = {
    **PERTURB_HELP,
    "student": "student checkpoint (saved by kdaug or fairchem; its config is read from it)",
    "teacher": "chgnet or a model config with --checkpoint (must be differentiable)",
    "steps": "gradient-ascent steps",
    "alpha": "step size: Angstrom per unit gradient (gradient rule) or Angstrom per atom (normalized rule)",
    "step_rule": "gradient (alpha * g) or normalized (per-atom step of length alpha along g)",
    "orthogonal_to_force": "remove the component of the step along the teacher force",
    "random_start": "standard deviation of a random initial displacement, Angstrom (0: start at delta = 0)",
    "max_displacement": "clip each atom's total displacement to this norm, Angstrom",
    "kT": "weight the objective by exp(-(E_t(X+delta) - E_t(X)) / kT), eV (unset: no weighting)",
    "energy_weight": "alpha_E of L0",
    "force_weight": "alpha_F of L0",
    "min_rmsd": "drop frames within this RMSD of their parent (free atoms), Angstrom",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, AdversarialConfig, HELP)


def run(args: argparse.Namespace) -> None:
    summary = run_adversarial(build_config(AdversarialConfig, args))
    steps = summary["mean_discrepancy_per_step"]
    print("mean teacher-student discrepancy per step: " + " -> ".join(f"{v:.4g}" for v in steps))
    print(json.dumps(summary))
