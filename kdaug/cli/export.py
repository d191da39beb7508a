"""`kdaug export PATH --format extxyz OUT`: frames to a file ase.io reads back."""

from __future__ import annotations

import argparse

from kdaug.data.export import EXPORT_FORMATS, export_frames


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="an LMDB file or a directory of *.lmdb shards")
    parser.add_argument("out", help="output file")
    parser.add_argument("--format", default="extxyz", choices=EXPORT_FORMATS)


def run(args: argparse.Namespace) -> None:
    n_frames = export_frames(args.path, args.out, fmt=args.format)
    print(f"wrote {n_frames} frames to {args.out}")
