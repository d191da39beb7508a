"""`kdaug generate`: sample adsorbate+slab systems, relax them with a teacher, write frame LMDBs."""

from __future__ import annotations

import argparse
import json

from kdaug.cli.options import add_config_arguments, config_from_args
from kdaug.generate import GenerateConfig, run_generate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, GenerateConfig)


def run(args: argparse.Namespace) -> None:
    summary = run_generate(config_from_args(GenerateConfig, args))
    print(json.dumps(summary))
