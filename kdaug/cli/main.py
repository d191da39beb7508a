"""`kdaug` entry point. Subcommands are imported only when called (heavy imports stay lazy).

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int | None`.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

from kdaug import __version__
from kdaug.errors import KdaugError, write_error

COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("generate", "kdaug.cli.generate", "sample adsorbate+slab systems, relax them with a teacher, write LMDBs"),
    ("rattle", "kdaug.cli.rattle", "add Gaussian noise to free atoms and label with the teacher"),
    ("adversarial", "kdaug.cli.adversarial", "perturb frames towards teacher-student disagreement"),
    ("select", "kdaug.cli.select", "keep the frames of an LMDB where a student disagrees most with the teacher"),
    ("inspect", "kdaug.cli.inspect", "summarise a frame LMDB (file or directory of shards)"),
    ("export", "kdaug.cli.export", "write frames of an LMDB to extxyz"),
    ("train", "kdaug.cli.train", "train a student on DFT + synthetic data, with or without knowledge distillation"),
    ("evaluate", "kdaug.cli.evaluate", "energy/force MAE, force cosine, EFwT and speed of a model on LMDBs"),
    ("teacher-cache", "kdaug.cli.teacher_cache", "store a teacher's KD targets for frame LMDBs (for kdaug train)"),
    ("study", "kdaug.cli.study", "run the paper's KD comparison (teacher, student, strategies, extra data) as a table"),
    ("cka", "kdaug.cli.cka", "linear CKA between every teacher and student layer's node features on data"),
)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and debug logging")
    parser = argparse.ArgumentParser(
        prog="kdaug", parents=[common],
        description="Synthetic and augmented training data for knowledge distillation of molecular GNNs.")
    parser.add_argument("--version", action="version", version=f"kdaug {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Import only the module of the command being run, so `kdaug --help` stays fast.
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, module_name, help_text in COMMANDS:
        sub = subparsers.add_parser(name, help=help_text, description=help_text, parents=[common])
        if name == wanted:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    args.debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        # Every commit is one transaction, so what was written is whole and a rerun resumes after it.
        print(f"kdaug {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (KdaugError, OSError) as err:
        if args.debug or (isinstance(err, OSError) and err.errno not in (errno.ENOSPC, errno.EDQUOT)):
            raise
        if isinstance(err, OSError):
            err = write_error(err.filename or "output", err)
        print(f"kdaug {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
