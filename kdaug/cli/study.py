"""`kdaug study STUDY.yml`: teacher, baseline student and every KD strategy / extra data, as the paper's Table 3."""

from __future__ import annotations

import argparse
from pathlib import Path

from kdaug.cli.options import add_config_arguments, overrides_from_args
from kdaug.config import load_config
from kdaug.study.config import StudyConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY.yml", help="study config (e.g. configs/studies/mini-emt.yml); "
                                                            "flags below override its values")
    add_config_arguments(parser, StudyConfig)


def run(args: argparse.Namespace) -> None:
    from kdaug.study.runner import run_study

    config = load_config(StudyConfig, [args.study, *args.config], overrides_from_args(StudyConfig, args))
    run_study(config)
    print(Path(config.out, "results.md").read_text())
