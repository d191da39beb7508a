"""Run records: what a run was made with, checked on resume; atomic writes; input and output path guards.

Every command that writes a resumable output (generate, rattle, adversarial, train, teacher-cache, study)
stores the resolved options that shape it, with the fingerprints of what it read, and refuses a resume
whose record differs, listing `name stored -> now`. The API (kept small and stable):

    to_json(value)                              value as it reads back from JSON (dataclass -> dict, tuple -> list)
    option_differences(stored, now, may_change) ["name stored -> now", ...] outside `may_change`
    check_resume(where, stored, now, may_change=(), kind=..., advice=...)   KdaugError listing the differences
    atomic_write(path, content)                 bytes, str or a writer of a binary handle, via a temporary file
    write_json(path, content) / read_json(path, advice=...)   atomic JSON; damage is one line naming the file
    sha256_of(path)                             hex digest of a file (checkpoints, bulk databases)
    check_input_paths([(flag, path), ...])      no empty path, no path given twice
    check_output_not_input(input, out, input_flag=..., out_flag=...)   an output is never (inside) an input
    make_output_dir(out, flag="--out")          the output folder, created; a file or unwritable place is one line
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from kdaug.errors import KdaugError, write_error

UNSET = "<unset>"


def to_json(value: Any) -> Any:
    """`value` as it reads back from JSON (dataclasses become dicts, tuples lists), so records compare equal."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def option_differences(stored: Mapping[str, Any], now: Mapping[str, Any], may_change: Iterable[str] = ()) -> list[str]:
    """"name stored -> now" for every option outside `may_change` whose value differs (absent reads <unset>)."""
    allowed = set(may_change)
    return [f"{name} {stored.get(name, UNSET)!r} -> {now.get(name, UNSET)!r}"
            for name in sorted(set(stored) | set(now))
            if name not in allowed and stored.get(name, UNSET) != now.get(name, UNSET)]


def check_resume(where: str, stored: Mapping[str, Any], now: Mapping[str, Any], may_change: Iterable[str] = (),
                 *, kind: str = "options",
                 advice: str = "rerun with the options it was started with, or write to a new --out") -> None:
    """Refuse to resume a record that differs: "WHERE was started with other KIND: a 1 -> 2; ...; ADVICE"."""
    differences = option_differences(stored, now, may_change)
    if differences:
        msg = f"{where} was started with other {kind}: {'; '.join(differences)}; {advice}"
        raise KdaugError(msg)


def atomic_write(path: str | os.PathLike, content: bytes | str | Callable[[IO[bytes]], None]) -> None:
    """Write `path` whole or not at all: a temporary file beside it, flushed to disk, then renamed over it.

    `content` is bytes, text (UTF-8) or a function writing to a binary handle (e.g. `lambda f: torch.save(x, f)`).
    A failed write (full disk, read-only folder) leaves the previous file as it was and no temporary file,
    and is a `KdaugError` ("no space left on device writing PATH", "cannot write PATH (...)").
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            if callable(content):
                content(handle)
            else:
                handle.write(content.encode() if isinstance(content, str) else content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise write_error(path, err) from err
    except RuntimeError as err:  # torch.save reports a failed write of its zip archive as a RuntimeError
        cause = err.__cause__ if isinstance(err.__cause__, OSError) else OSError(str(err))
        raise write_error(path, cause) from err
    finally:  # also on Ctrl-C
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, content: Any) -> None:
    """`content` as indented JSON, written atomically (see `atomic_write`)."""
    atomic_write(path, json.dumps(content, indent=1, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike, *, advice: str) -> Any:
    """The JSON content of `path`; a damaged file is one line naming it and saying what to do (`advice`)."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode())
    except (UnicodeDecodeError, ValueError) as err:
        msg = f"{path}: damaged (not JSON: {type(err).__name__}); {advice}"
        raise KdaugError(msg) from err
    except OSError as err:
        msg = f"{path}: cannot read ({err.strerror or err}); {advice}"
        raise KdaugError(msg) from err


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of the file at `path`."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_input_paths(named: Sequence[tuple[str, str | os.PathLike]]) -> None:
    """Refuse an empty path (it would read the current directory) and a path given twice (read twice),
    naming the flags: `named` holds (flag or YAML key, path) pairs."""
    seen: dict[Path, str] = {}
    for flag, path in named:
        if not str(path).strip():
            msg = f"{flag} {str(path)!r}: empty path; expected a file or directory"
            raise KdaugError(msg)
        key = Path(path).resolve()
        if key in seen:
            also = "" if seen[key] == flag else f" (also as {seen[key]})"
            msg = f"{flag} {path}: given twice{also}; name each input once"
            raise KdaugError(msg)
        seen[key] = flag


def check_output_not_input(input_path: str | os.PathLike, out: str | os.PathLike, *, input_flag: str | None = None,
                           out_flag: str = "--out") -> None:
    """Refuse an output equal to, inside or holding an input: nothing is ever written into inputs."""
    source, target = Path(input_path).resolve(), Path(out).resolve()
    if target.is_relative_to(source) or source.is_relative_to(target):
        named = f"{input_flag} {input_path}" if input_flag else str(input_path)
        msg = f"{out_flag} {out}: must not be (inside) the input {named}; nothing is written into inputs"
        raise KdaugError(msg)


def make_output_dir(out: str | os.PathLike, *, flag: str = "--out") -> Path:
    """The output folder `out`, created if missing; an existing file, or a folder this process cannot write
    (read-only file system, no permission), is one line naming `flag` before anything is written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        msg = f"{flag} {out}: is an existing file; expected a folder"
        raise KdaugError(msg)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        msg = f"{flag} {out}: cannot write there ({err.strerror or err})"
        raise KdaugError(msg) from err
    if not os.access(out, os.W_OK | os.X_OK):
        msg = f"{flag} {out}: cannot write there (read-only file system or no permission)"
        raise KdaugError(msg)
    return out
