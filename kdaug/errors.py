"""User-facing errors: the CLI prints their message as one line, no traceback."""

from __future__ import annotations

import errno
import os


class KdaugError(Exception):
    """An input problem the user can fix; the message names the file, field or flag."""


class PropertyNotAvailable(KdaugError):
    """A model was asked for an output or tap it cannot compute."""


class UnsupportedElement(KdaugError):
    """A model was asked about an element it was not trained on."""


def write_error(path: str | os.PathLike, err: OSError) -> KdaugError:
    """One line for a failed write: "no space left on device writing PATH" when the disk is full."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return KdaugError(f"no space left on device writing {path}")
    return KdaugError(f"cannot write {path} ({err.strerror or err})")
