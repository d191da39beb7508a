"""`kdaug select IN --student CKPT --keep F|N --by disagreement|random --out OUT`: a subset of a labelled LMDB."""

from __future__ import annotations

import argparse
import json

from kdaug.cli.options import add_config_arguments, config_from_args, dest_of
from kdaug.errors import KdaugError
from kdaug.select import SelectConfig, run_select


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("positional_input", nargs="?", metavar="IN",
                        help="teacher-labelled frame LMDB (file or directory of shards); or --input")
    add_config_arguments(parser, SelectConfig)


def run(args: argparse.Namespace) -> None:
    if args.positional_input is not None:
        given = getattr(args, dest_of("input"))
        if given is not None and given != args.positional_input:
            msg = f"IN {args.positional_input} and --input {given}: name the input once"
            raise KdaugError(msg)
        setattr(args, dest_of("input"), args.positional_input)
    print(json.dumps(run_select(config_from_args(SelectConfig, args))))
