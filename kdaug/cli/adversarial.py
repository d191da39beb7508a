"""`kdaug adversarial --input PATH --student CKPT --teacher T --steps 5 --out PATH`."""

from __future__ import annotations

import argparse
import json

from kdaug.cli.options import add_config_arguments, config_from_args
from kdaug.perturb.adversarial import AdversarialConfig, run_adversarial


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, AdversarialConfig)


def run(args: argparse.Namespace) -> None:
    summary = run_adversarial(config_from_args(AdversarialConfig, args))
    steps = summary["mean_discrepancy_per_step"]
    print("mean teacher-student discrepancy per step: " + " -> ".join(f"{v:.4g}" for v in steps))
    print(json.dumps(summary))
