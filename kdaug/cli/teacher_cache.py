"""`kdaug teacher-cache --teacher T --checkpoint CKPT --data PATH... --kd MODE --out DIR`: precomputed KD targets."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kdaug.errors import KdaugError
from kdaug.train.kd import KD_MODES
from kdaug.train.teacher_cache import CACHE_DTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True,
                        help="teacher: a model config name (e.g. gemnet-oc), a YAML path or chgnet")
    parser.add_argument("--checkpoint", help="teacher checkpoint; its sha256 stamps the cache")
    parser.add_argument("--data", nargs="+", required=True,
                        help="frame LMDBs (files or directories of shards): every --train/--synthetic path to cache")
    parser.add_argument("--kd", required=True, help=f"the KD mode training will use: one of {', '.join(KD_MODES[1:])}")
    parser.add_argument("--out", required=True, help="cache directory (resumed if it holds a previous run)")
    parser.add_argument("--dtype", default="float16",
                        help=f"storage of forces and features: {' or '.join(CACHE_DTYPES)} (default: float16; "
                        "energies are always float64)")
    parser.add_argument("--batch-size", type=int, default=8, help="frames per teacher forward (default: 8)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")


def run(args: argparse.Namespace) -> None:
    from kdaug.data.run_record import check_input_paths, check_output_not_input
    from kdaug.models import load_teacher
    from kdaug.train.kd import check_mode
    from kdaug.train.teacher_cache import build_teacher_cache

    check_mode(args.kd)
    inputs = [("--data", path) for path in args.data]
    check_input_paths(inputs)
    if args.checkpoint is not None:
        inputs.append(("--checkpoint", args.checkpoint))
        check_input_paths(inputs[-1:])
    if not args.out.strip():
        raise KdaugError("--out '': empty path; expected the cache folder")
    for flag, path in inputs:
        check_output_not_input(path, args.out, input_flag=flag)
    if Path(args.out).is_file():
        raise KdaugError(f"--out {args.out}: is an existing file; expected a folder")
    teacher = load_teacher(args.teacher, args.checkpoint, device=args.device)
    summary = build_teacher_cache(teacher, args.data, args.kd, args.out, dtype=args.dtype,
                                  batch_size=args.batch_size)
    print(json.dumps(summary))
