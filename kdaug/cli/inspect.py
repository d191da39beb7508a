"""`kdaug inspect PATH`: counts and label statistics of a frame LMDB."""

from __future__ import annotations

import argparse
import json

from kdaug.data.inspect import format_report, inspect_dataset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="an LMDB file or a directory of *.lmdb shards")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> None:
    report = inspect_dataset(args.path, progress=not args.json)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
