"""`kdaug cka --teacher CKPT --student CKPT --data PATH`: linear CKA between every teacher and student layer."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, metavar="CKPT", help="teacher checkpoint (with its model config)")
    parser.add_argument("--student", required=True, metavar="CKPT", help="student checkpoint (e.g. student.pt)")
    parser.add_argument("--data", required=True, nargs="+", metavar="PATH", help="frame LMDBs to sample")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for cka.json and cka.png")
    parser.add_argument("--max-samples", type=int, default=64, help="frames whose atoms enter the CKA")
    parser.add_argument("--batch-size", type=int, default=8, help="frames per forward")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")


def run(args: argparse.Namespace) -> None:
    from kdaug.cka import run_cka

    report = run_cka(args.teacher, args.student, args.data, args.out, max_samples=args.max_samples,
                     batch_size=args.batch_size, device=args.device)
    print(json.dumps({key: report[key] for key in ("teacher_layers", "student_layers", "cka", "n_atoms")}))
