"""Run configs: frozen dataclasses whose fields carry their help text and unit, filled from
defaults <- YAML files (later files win) <- overrides, every value checked against its field's type.

Example (a nested section is a field whose type is another dataclass)::

    @dataclass(frozen=True)
    class Optim:
        lr: float = option(1e-3, help="learning rate")
        clip: float | None = option(None, help="gradient-norm clip", unit="eV/A")

    @dataclass(frozen=True)
    class TrainConfig:
        out: str = option(help="output directory")
        optim: Optim = option(default_factory=Optim, help="optimizer")

    config = load_config(TrainConfig, ["run.yaml"], {"optim.lr": 3e-4})

with run.yaml holding ``out: runs/a`` and ``optim: {clip: 10}``. Accepted types: int, float (ints
accepted), str, bool, tuple[X, ...], Literal[...], X | None and nested dataclasses. A wrong value
is a one-line `KdaugError` naming the file (or the flag, for overrides), the key and what was expected.
`kdaug.cli.options` turns the same dataclass into command-line flags (``--optim.lr``).
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import yaml

from kdaug.errors import KdaugError

T = TypeVar("T")
_PLURAL = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
_SINGULAR = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def option(default: Any = dataclasses.MISSING, *, help: str, unit: str | None = None,
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its help text and unit (eV, Angstrom, eV/A, ...) in `metadata`."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help, "unit": unit})


class Leaf(NamedTuple):
    """One settable value of a config: its dotted path, dataclass field and resolved type."""

    path: tuple[str, ...]
    field: dataclasses.Field
    hint: Any

    @property
    def key(self) -> str:
        return ".".join(self.path)

    @property
    def flag(self) -> str:
        return "--" + ".".join(part.replace("_", "-") for part in self.path)


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def _is_section(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def leaves(cls: type, prefix: tuple[str, ...] = ()) -> list[Leaf]:
    """Every non-section field of `cls`, nested sections expanded depth first."""
    found = []
    for f, hint in _fields(cls):
        path = (*prefix, f.name)
        found.extend(leaves(hint, path) if _is_section(hint) else [Leaf(path, f, hint)])
    return found


def flag_of(name: str) -> str:
    """`--max-steps` for field `max_steps` (a top-level field's flag, used by `check_values`)."""
    return "--" + name.replace("_", "-")


class ValueCheckError(KdaugError):
    """A value `check_values` refused; `load_config` names the YAML file and key (or the flag) that set it."""

    def __init__(self, name: str, value: Any, expected: str) -> None:
        super().__init__(f"{flag_of(name)} {value}: expected {expected}")
        self.path: tuple[str, ...] = (name,)
        self.value, self.expected = value, expected


def check_values(config: Any, checks: Iterable[tuple[bool, str, str]]) -> None:
    """For `__post_init__`: raise "--flag value: expected ..." for the first (ok, field name, expected) not ok."""
    for ok, name, expected in checks:
        if not ok:
            raise ValueCheckError(name, getattr(config, name), expected)


# -- types ---------------------------------------------------------------------------------------------------
def _optional_parts(hint: Any) -> tuple[Any, ...] | None:
    """The non-None members of a Union (None if `hint` is no Union)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(a for a in typing.get_args(hint) if a is not type(None))
    return None


def without_none(hint: Any) -> Any:
    """X for `X | None`; `hint` itself otherwise."""
    parts = _optional_parts(hint)
    return parts[0] if parts is not None and len(parts) == 1 else hint


def describe(hint: Any) -> str:
    """What a value of type `hint` looks like, for error messages and --help."""
    parts = _optional_parts(hint)
    if parts is not None:
        nullable = type(None) in typing.get_args(hint)
        return " or ".join(describe(p) for p in parts) + (" or null" if nullable else "")
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        item = args[0]
        plural = _PLURAL.get(item, f"values ({describe(item)})")
        return f"a list of {plural}" if args[-1] is Ellipsis else f"a list of {len(args)} {plural}"
    return _SINGULAR.get(hint, getattr(hint, "__name__", str(hint)))


class _Mismatch(Exception):
    pass


def convert(hint: Any, value: Any) -> Any:
    """`value` as type `hint` (ints widen to float, lists become tuples); raises `_Mismatch` otherwise.
    Strings are never parsed: YAML `seed: "7"` is refused (the CLI parses text with `parse_text`)."""
    parts = _optional_parts(hint)
    if parts is not None:
        if value is None and type(None) in typing.get_args(hint):
            return None
        for part in parts:
            try:
                return convert(part, value)
            except _Mismatch:
                continue
        raise _Mismatch
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        if any(type(value) is type(choice) and value == choice for choice in typing.get_args(hint)):
            return value
        raise _Mismatch
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple) or (args[-1] is not Ellipsis and len(value) != len(args)):
            raise _Mismatch
        items = args[:1] * len(value) if args[-1] is Ellipsis else args
        return tuple(convert(item, v) for item, v in zip(items, value))
    if hint in (int, float) and isinstance(value, bool):
        raise _Mismatch
    if hint is int and isinstance(value, numbers.Integral) or hint is float and isinstance(value, numbers.Real):
        return hint(value)  # numpy scalars too; ints widen to float
    if hint in (str, bool) and isinstance(value, hint):
        return value
    if hint not in (int, float, str, bool):
        msg = f"config type {hint!r} is not supported (see kdaug.config)"
        raise TypeError(msg)
    raise _Mismatch


def parse_text(leaf: Leaf, raw: str | bool | Sequence[str]) -> Any:
    """A command-line value (text, a list of texts for tuples, a bool from --x/--no-x) as `leaf`'s type."""
    def parse(hint: Any, text: Any) -> Any:
        parts = _optional_parts(hint)
        if parts is not None:
            if isinstance(text, str) and text.lower() in ("none", "null") and str not in parts:
                return None
            for part in parts:
                try:
                    return parse(part, text)
                except _Mismatch:
                    continue
            raise _Mismatch
        origin = typing.get_origin(hint)
        if origin is tuple:
            return convert(hint, [parse(typing.get_args(hint)[0], t) for t in text])
        if origin is typing.Literal:
            for choice in typing.get_args(hint):
                if text == str(choice):
                    return choice
            raise _Mismatch
        if hint in (int, float):
            try:
                return hint(text)
            except ValueError:
                raise _Mismatch from None
        return convert(hint, text)

    try:
        return parse(leaf.hint, raw)
    except _Mismatch:
        shown = " ".join(raw) if isinstance(raw, list | tuple) else raw
        msg = f"{leaf.flag} {shown}: expected {describe(leaf.hint)}"
        raise KdaugError(msg) from None


# -- files ---------------------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def read_yaml(path: str | os.PathLike) -> dict:
    """The mapping in a YAML file; one-line errors naming the file (and line, for syntax errors)."""
    path = Path(path)
    if not path.is_file():
        msg = f"config file {path}: no such file"
        raise KdaugError(msg)
    try:
        loaded = yaml.load(path.read_text(), Loader=_Loader)
    except UnicodeDecodeError:
        msg = f"config file {path}: not a UTF-8 text file"
        raise KdaugError(msg) from None
    except yaml.YAMLError as err:
        problem, context = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
        where = f"{path}:{problem.line + 1}" if problem is not None else str(path)
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        if context is not None and getattr(err, "context", None):
            what += f"; {err.context} at line {context.line + 1}"
        msg = f"{where}: invalid YAML ({what})"
        raise KdaugError(msg) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        msg = f"{path}: expected a mapping of option names to values, got {type(loaded).__name__}"
        raise KdaugError(msg)
    return loaded


def _read_section(cls: type, data: Mapping, source: str, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """{path: checked value} from a (nested) mapping read from file `source`."""
    fields = {f.name: hint for f, hint in _fields(cls)}
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        where = ".".join(prefix) + ": " if prefix else ""
        msg = (f"{source}: {where}unknown key(s) {', '.join(unknown)}; "
               f"expected some of {', '.join(sorted(fields))}")
        raise KdaugError(msg)
    values: dict[tuple[str, ...], Any] = {}
    for name, value in data.items():
        path, hint = (*prefix, name), fields[name]
        if _is_section(hint):
            if not isinstance(value, dict):
                msg = f"{source}: {'.'.join(path)}: expected a mapping (section), got {value!r}"
                raise KdaugError(msg)
            values.update(_read_section(hint, value, source, path))
            continue
        try:
            values[path] = convert(hint, value)
        except _Mismatch:
            msg = f"{source}: {'.'.join(path)}: expected {describe(hint)}, got {value!r}"
            raise KdaugError(msg) from None
    return values


def _build(cls: type[T], values: dict[tuple[str, ...], Any], prefix: tuple[str, ...], missing: list[str],
           ) -> T | None:
    """`cls` from the checked values; None once a required value is missing (its flag added to `missing`)."""
    kwargs = {}
    for f, hint in _fields(cls):
        path = (*prefix, f.name)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if _is_section(hint):
            # A section named in no source keeps the field's default; otherwise its class defaults apply.
            if required or any(p[: len(path)] == path for p in values):
                kwargs[f.name] = _build(hint, values, path, missing)
        elif path in values:
            kwargs[f.name] = values[path]
        elif required:
            missing.append(Leaf(path, f, hint).flag)
    if missing:
        return None
    try:
        return cls(**kwargs)
    except ValueCheckError as err:
        err.path = (*prefix, *err.path)  # the key within the whole config (a nested section's check)
        raise


def load_config(cls: type[T], files: Iterable[str | os.PathLike] = (), overrides: Mapping[str, Any] | None = None,
                ) -> T:
    """`cls` from its defaults <- each YAML file in order <- `overrides` ({"section.field": value}).

    Values are checked against the field types (see the module docstring); unknown keys, wrong types and
    missing required fields raise one-line `KdaugError`s naming the file or flag; `cls.__post_init__`
    checks the values themselves.
    """
    if not _is_section(cls):
        msg = f"load_config needs a dataclass, got {cls!r}"
        raise TypeError(msg)
    values: dict[tuple[str, ...], Any] = {}
    sources: dict[tuple[str, ...], str] = {}  # the file that set each value (flags are named by their check)
    for path in files:
        section = _read_section(cls, read_yaml(path), str(path))
        values.update(section)
        sources.update(dict.fromkeys(section, str(path)))
    by_key = {leaf.key: leaf for leaf in leaves(cls)}
    for key, value in (overrides or {}).items():
        leaf = by_key.get(key)
        if leaf is None:
            msg = f"unknown option {key}; expected one of {', '.join(sorted(by_key))}"
            raise KdaugError(msg)
        try:
            values[leaf.path] = convert(leaf.hint, value)
            sources.pop(leaf.path, None)
        except _Mismatch:
            msg = f"{leaf.flag} {value!r}: expected {describe(leaf.hint)}"
            raise KdaugError(msg) from None
    missing: list[str] = []
    try:
        config = _build(cls, values, (), missing)
    except ValueCheckError as err:
        key = ".".join(err.path)
        if err.path in sources:
            msg = f"{sources[err.path]}: {key}: expected {err.expected}, got {err.value!r}"
        elif len(err.path) > 1:
            msg = f"--{key.replace('_', '-')} {err.value}: expected {err.expected}"  # a nested flag
        else:
            raise
        raise KdaugError(msg) from None
    if config is None:
        msg = f"missing required option(s): {', '.join(missing)}"
        raise KdaugError(msg)
    return config


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
