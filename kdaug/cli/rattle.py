"""`kdaug rattle --input PATH --teacher T --sigma 0.05 --out PATH`: noisy copies labelled by the teacher."""

from __future__ import annotations

import argparse
import json

from kdaug.cli.options import add_config_arguments, config_from_args
from kdaug.perturb.rattle import RattleConfig, run_rattle


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, RattleConfig)


def run(args: argparse.Namespace) -> None:
    print(json.dumps(run_rattle(config_from_args(RattleConfig, args))))
