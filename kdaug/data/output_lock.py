"""One writer per output: an exclusive `flock` on `<out_dir>/.<stem>.lock`, held while the writer is open.

The lock file records its holder (pid, host, command) so that a second writer can say who holds it.
The kernel drops a `flock` when its holder dies, even by SIGKILL, so a killed run never blocks its resume.
Writers with other stems (the shards of one dataset) take other locks and write side by side.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
from pathlib import Path

from kdaug.errors import KdaugError, write_error


def lock_path(out_dir: Path, stem: str) -> Path:
    return out_dir / f".{stem}.lock"


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet recorded itself"


def _command() -> str:
    argv = list(sys.argv) or [""]
    if argv[0].endswith("__main__.py"):  # python -m kdaug
        argv[0] = "kdaug"
    elif argv[0] in ("", "-c", "-m"):
        argv.insert(0, Path(sys.executable).name)
    else:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)[:300]


class OutputLock:
    """Exclusive lock on one output (directory and stem); raises `KdaugError` naming the holder if taken."""

    def __init__(self, out_dir: Path, stem: str) -> None:
        self.path = lock_path(out_dir, stem)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            msg = f"--out {out_dir}: cannot write there ({err.strerror})"
            raise KdaugError(msg) from err
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _holder(self._fd)
            os.close(self._fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                msg = f"--out {out_dir}: cannot lock {self.path.name} ({err.strerror})"
                raise KdaugError(msg) from err
            msg = (f"--out {out_dir}: output '{stem}' is being written by another run ({holder}); "
                   "wait for it to finish, or write elsewhere")
            raise KdaugError(msg) from err
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": _command()}).encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, record, 0)
        except OSError as err:
            self.release()
            raise write_error(self.path, err) from err

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases the flock)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
