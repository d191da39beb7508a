"""Run several `kdaug` commands in one process (imports are paid once).

Reads one JSON argv list per stdin line; writes `{"argv", "code", "stdout", "stderr"}` per command on stdout.
A command that raises anything but what `main` handles reports code "exception" with the traceback. A
signal kills the whole process: the caller sees which command was running from the lines before.
Run as `python -m tests.kdaug_batch` with TQDM_DISABLE=1 so stderr holds only log lines and errors.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback

from kdaug.cli.main import main


def run_all() -> None:
    for line in sys.stdin:
        argv = json.loads(line)
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code: int | str = main(argv)
            except BaseException:  # noqa: BLE001 -- the caller asserts there is none
                traceback.print_exc()
                code = "exception"
        sys.__stdout__.write(json.dumps({"argv": argv, "code": code, "stdout": stdout.getvalue(),
                                         "stderr": stderr.getvalue()}) + "\n")
        sys.__stdout__.flush()


if __name__ == "__main__":
    run_all()
