"""Command-line flags generated from a config dataclass (see `kdaug.config`).

Each field becomes a flag (`--max-steps`, nested `--section.field`) whose help is the field's
`help` metadata, unit and default; `--config` (repeatable) names YAML files. Flags left unset change
nothing, so a value comes from the flag, else the last file naming it, else the field's default.
Values are parsed by `kdaug.config.parse_text`, so a wrong one is a one-line error naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

from kdaug.config import Leaf, leaves, load_config, parse_text, without_none

T = TypeVar("T")
_DEST = "config:"  # prefix of the namespace attributes holding raw flag values


def dest_of(key: str) -> str:
    """The namespace attribute holding the raw value of option `key` ("section.field"), None when unset."""
    return _DEST + key


def _help(leaf: Leaf) -> str:
    field = leaf.field
    text = field.metadata.get("help", "")
    unit = field.metadata.get("unit")
    if unit:
        text += f" [{unit}]"
    if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
        text += " (required)"
    elif field.default not in (dataclasses.MISSING, None):  # a None default is explained in the help text
        text += f" (default: {field.default})"
    return text.replace("%", "%%")


def _metavar(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(hint)) + "}"
    return {int: "INT", float: "FLOAT", str: "TEXT"}.get(hint, "VALUE")


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """`--config YAML` (repeatable, later files win) and one flag per field of `config_cls`."""
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="YAML file whose keys are these options' names (e.g. generators/d1m.yaml); repeatable")
    for leaf in leaves(config_cls):
        kwargs: dict[str, Any] = {"dest": _DEST + leaf.key, "default": None, "help": _help(leaf)}
        base = without_none(leaf.hint)
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is tuple:
            kwargs.update(nargs="+", metavar=_metavar(typing.get_args(base)[0]))
        else:
            kwargs["metavar"] = _metavar(base)
        parser.add_argument(leaf.flag, **kwargs)


def overrides_from_args(config_cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """{"section.field": value} for the flags given on the command line, parsed to the fields' types."""
    overrides = {}
    for leaf in leaves(config_cls):
        raw = getattr(args, _DEST + leaf.key, None)
        if raw is not None:
            overrides[leaf.key] = parse_text(leaf, raw)
    return overrides


def config_from_args(config_cls: type[T], args: argparse.Namespace) -> T:
    """The config: field defaults <- `--config` files <- flags."""
    return load_config(config_cls, args.config, overrides_from_args(config_cls, args))
