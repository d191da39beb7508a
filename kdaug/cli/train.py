"""`kdaug train`: train a student on DFT + synthetic data, with or without knowledge distillation."""

from __future__ import annotations

import argparse
import json

from kdaug.cli.options import add_config_arguments, config_from_args
from kdaug.train.config import TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TrainConfig)


def run(args: argparse.Namespace) -> None:
    from kdaug.train.loop import run_train

    summary = run_train(config_from_args(TrainConfig, args))
    print(json.dumps(summary))
