"""`kdaug evaluate --model CKPT --data PATH...`: energy/force MAE, force cosine, EFwT and speed of a model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kdaug.errors import KdaugError
from kdaug.evaluate import evaluate
from kdaug.models import load_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="CKPT",
                        help="model checkpoint (fairchem v1 format, e.g. the student.pt of kdaug train)")
    parser.add_argument("--model-config", metavar="NAME|YAML", default=None,
                        help="model config, for checkpoints that do not store one")
    parser.add_argument("--data", required=True, nargs="+", metavar="PATH",
                        help="frame LMDB files or directories of *.lmdb shards")
    parser.add_argument("--batch-size", type=int, default=16, help="systems per forward pass")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _format(report: dict[str, Any]) -> str:
    def line(name: str, metrics: dict[str, Any]) -> str:
        def number(key: str, spec: str) -> str:
            return "n/a" if metrics[key] is None else format(metrics[key], spec)

        return (f"{name:<12} n {metrics['n_samples']:>6}  energy MAE {number('energy_mae_mev', '.2f')} meV  "
                f"force MAE {number('force_mae_mev_per_ang', '.2f')} meV/A  "
                f"force cos {number('force_cos', '.4f')}  EFwT {number('efwt', '.4f')}")

    lines = [f"model {report['model']} on {', '.join(report['data'])} ({report['device']})", line("all", report)]
    lines += [line(origin, metrics) for origin, metrics in report.get("per_origin", {}).items()]
    speed = report["samples_per_s"]
    lines.append(f"inference    {'n/a' if speed is None else format(speed, '.1f')} samples/s")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    checkpoint = Path(args.model)
    if not checkpoint.is_file():
        msg = f"--model {checkpoint}: no such file (expected a model checkpoint)"
        raise KdaugError(msg)
    try:
        model = load_model(args.model_config, checkpoint)
    except KdaugError as err:
        detail = str(err).removeprefix(f"--checkpoint {checkpoint}: ")
        msg = f"--model {checkpoint}: not a model checkpoint kdaug can load ({detail})"
        raise KdaugError(msg) from err
    report = evaluate(model, args.data, batch_size=args.batch_size, device=args.device, progress=not args.json)
    print(json.dumps(report, indent=2) if args.json else _format(report))
