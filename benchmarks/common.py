"""Shared pieces of the benchmark scripts: an OC20-sized system and a timer."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from ase.build import add_adsorbate, fcc111, molecule

from kdaug.types import Frame


def oc20_sized_frame(seed: int = 0, metal: str = "Cu") -> Frame:
    """82 atoms: a 4x4x5 fcc(111) slab (bottom three layers fixed) with CO on top, rattled."""
    slab = fcc111(metal, size=(4, 4, 5), vacuum=8.0)
    layer = slab.get_tags()
    add_adsorbate(slab, molecule("CO"), 1.9, "ontop")
    tags = np.concatenate([np.where(layer <= 2, 1, 0), [2, 2]])
    slab.rattle(0.05, seed=seed)
    return Frame(
        positions=slab.positions.copy(),
        atomic_numbers=slab.numbers.astype(np.int64),
        cell=np.array(slab.cell),
        tags=tags,
        fixed=tags == 0,
        energy=0.0,
        forces=np.zeros((len(slab), 3)),
        sid=seed,
        fid=0,
    )


def rate(fn: Callable[[], object], items_per_call: int, *, min_seconds: float = 2.0, device: str = "cpu",
         warmup: int = 1) -> float:
    """Items per second of `fn`, timed over at least `min_seconds` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return calls * items_per_call / elapsed
