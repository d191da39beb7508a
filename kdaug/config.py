"""Run configs: dataclass defaults <- recipe YAML (generators/*.yaml) <- command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kdaug.errors import KdaugError

T = TypeVar("T")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type, help_texts: dict[str, str]) -> None:
    """One flag per dataclass field (default None: unset flags leave YAML/defaults alone), plus --config."""
    parser.add_argument("--config", help="recipe YAML whose keys are these options' names (e.g. generators/d1m.yaml)")
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        hint = hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args and (
            isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union) else hint
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{help_texts.get(f.name, '')} (default: {default})"
        if base is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(base) is tuple:
            parser.add_argument(_flag(f.name), type=int, nargs="+", default=None, help=help_text)
        else:
            parser.add_argument(_flag(f.name), type=base, default=None, help=help_text)


def build_config(config_cls: type[T], args: argparse.Namespace) -> T:
    """Defaults <- YAML (`args.config`) <- flags set on the command line; unknown YAML keys are errors."""
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(config_cls)}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            msg = f"--config {path}: no such file"
            raise KdaugError(msg)
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            msg = f"--config {path}: expected a mapping of option names to values"
            raise KdaugError(msg)
        unknown = sorted(set(loaded) - names)
        if unknown:
            msg = f"--config {path}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(names))}"
            raise KdaugError(msg)
        values.update(loaded)
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    missing = [f.name for f in dataclasses.fields(config_cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values]
    if missing:
        msg = f"missing required option(s): {', '.join(_flag(m) for m in missing)}"
        raise KdaugError(msg)
    hints = typing.get_type_hints(config_cls)
    for name, value in values.items():
        if typing.get_origin(hints[name]) is tuple or tuple in typing.get_args(hints[name]):
            values[name] = tuple(value) if value is not None else None
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as err:
        raise KdaugError(str(err)) from err


def shard_from_environment(num_shards: int | None, shard_index: int | None) -> tuple[int, int]:
    """(index, count) from the flags, else torchrun's RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS, else (0, 1)."""
    if num_shards is None:
        for rank_var, size_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
            if rank_var in os.environ and size_var in os.environ:
                return int(os.environ[rank_var]), int(os.environ[size_var])
        return 0, 1
    index = 0 if shard_index is None else shard_index
    if num_shards < 1 or not 0 <= index < num_shards:
        msg = f"--shard-index {index} --num-shards {num_shards}: expected 0 <= shard-index < num-shards"
        raise KdaugError(msg)
    return index, num_shards
