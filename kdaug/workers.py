"""Worker process pools of kdaug (sampling, CHGNet graphs): spawned, quiet on Ctrl-C, gone with their parent."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor


def _exit_with_parent() -> None:
    """End this worker as soon as the process that started it is gone, even killed with -9 (a pool's workers
    otherwise wait forever on their task queue, holding its write end themselves)."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=lambda: (parent.join(), os._exit(1)), name="kdaug-parent-watch",
                         daemon=True).start()


def _start(initializer: Callable[..., None], *initargs: object) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group; only the parent reports it
    _exit_with_parent()
    initializer(*initargs)


def worker_pool(workers: int, initializer: Callable[..., None], *initargs: object) -> ProcessPoolExecutor:
    """`workers` spawned processes (a fresh interpreter: no inherited threads or CUDA state), each running
    `initializer(*initargs)` once."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start,
                               initargs=(initializer, *initargs))
