"""`kdaug teacher-cache --teacher T --checkpoint CKPT --data PATH... --kd STRATEGY --out DIR`: stored KD targets."""

from __future__ import annotations

import argparse
import json

from kdaug.cli.options import add_config_arguments, config_from_args
from kdaug.train.teacher_cache import TeacherCacheConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TeacherCacheConfig)


def run(args: argparse.Namespace) -> None:
    from kdaug.train.teacher_cache import run_teacher_cache

    print(json.dumps(run_teacher_cache(config_from_args(TeacherCacheConfig, args))))
