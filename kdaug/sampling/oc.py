"""Random adsorbate+slab systems with fairchem-data-oc: bulk -> slab -> adsorbate placement.

System `sid` is drawn from a generator seeded by (seed, sid), so any subset of
ids reproduces the same systems in any process. fairchem-data-oc draws from the
global `np.random`; each of its calls runs inside `_seeded_numpy` with a seed
derived from (seed, sid), and the global state is restored afterwards.
Tags: 0 subsurface (fixed), 1 surface, 2 adsorbate.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

from kdaug.errors import KdaugError
from kdaug.resources import resource_path

DEFAULT_BULK_DB = resource_path("bulks.pkl")
PLACEMENT_MODES = ("random_site_heuristic_placement", "heuristic", "random")


@dataclass(frozen=True)
class SamplerConfig:
    """What to sample. `supported_elements` comes from the teacher; bulks and adsorbates outside it are skipped."""

    bulk_db: str | None = None
    adsorbate_ids: tuple[int, ...] | None = None
    placement: str = "random_site_heuristic_placement"
    max_miller: int = 2
    seed: int = 0
    supported_elements: frozenset[int] = field(default_factory=lambda: frozenset(range(1, 119)))


@dataclass
class SampledSystem:
    """atoms: ase.Atoms with tags and FixAtoms; details: provenance (bulk, miller, shift, adsorbate, site)."""

    sid: int
    atoms: Atoms
    details: dict[str, Any]


@contextlib.contextmanager
def _seeded_numpy(seed: int) -> Iterator[None]:
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _symbols(numbers: Iterable[int]) -> str:
    return ", ".join(chemical_symbols[z] for z in sorted(set(numbers)))


def load_bulk_db(path: str | os.PathLike | None) -> list[dict[str, Any]]:
    """Read an OC20-format bulks.pkl (list of {"atoms": ase.Atoms, "src_id": str}); checks its shape."""
    path = Path(path) if path is not None else DEFAULT_BULK_DB
    if not path.is_file():
        msg = f"--bulk-db {path}: no such file (expected an OC20-format bulks.pkl)"
        raise KdaugError(msg)
    try:
        entries = pickle.loads(path.read_bytes())
    except Exception as err:  # unpickling raises many kinds
        msg = f"--bulk-db {path}: not a pickle ({type(err).__name__}); expected an OC20-format bulks.pkl"
        raise KdaugError(msg) from err
    if not isinstance(entries, list) or not entries or not all(
        isinstance(e, dict) and isinstance(e.get("atoms"), Atoms) and "src_id" in e for e in entries
    ):
        msg = f"--bulk-db {path}: expected a non-empty list of dicts with 'atoms' (ase.Atoms) and 'src_id'"
        raise KdaugError(msg)
    return entries


def load_adsorbate_db() -> dict[int, tuple]:
    from fairchem.data.oc.databases.pkls import ADSORBATE_PKL_PATH

    with open(ADSORBATE_PKL_PATH, "rb") as handle:
        return pickle.load(handle)


class SystemSampler:
    """Draws system `sid` deterministically; caches each bulk's slabs (computing them is the slow part)."""

    def __init__(self, config: SamplerConfig, *, slab_cache_size: int = 64) -> None:
        if config.placement not in PLACEMENT_MODES:
            msg = f"--placement {config.placement}: expected one of {', '.join(PLACEMENT_MODES)}"
            raise KdaugError(msg)
        self.config = config
        supported = config.supported_elements
        bulks = load_bulk_db(config.bulk_db)
        self.bulks = [b for b in bulks if set(b["atoms"].numbers) <= supported]
        if not self.bulks:
            msg = (f"--bulk-db {config.bulk_db or DEFAULT_BULK_DB}: none of its {len(bulks)} bulks uses only "
                   f"elements the teacher supports ({_symbols(supported)})")
            raise KdaugError(msg)
        adsorbates = load_adsorbate_db()
        if config.adsorbate_ids is None:
            self.adsorbate_ids = [i for i, entry in sorted(adsorbates.items()) if set(entry[0].numbers) <= supported]
        else:
            for ads_id in config.adsorbate_ids:
                if ads_id not in adsorbates:
                    msg = (f"--adsorbate-ids {ads_id}: not in fairchem-data-oc's adsorbate database "
                           f"(ids {min(adsorbates)}-{max(adsorbates)})")
                    raise KdaugError(msg)
                lacking = set(adsorbates[ads_id][0].numbers) - supported
                if lacking:
                    msg = (f"--adsorbate-ids {ads_id} ({adsorbates[ads_id][1]}): the teacher lacks element(s) "
                           f"{_symbols(lacking)}")
                    raise KdaugError(msg)
            self.adsorbate_ids = list(config.adsorbate_ids)
        if not self.adsorbate_ids:
            msg = "no adsorbate in fairchem-data-oc's database uses only elements the teacher supports"
            raise KdaugError(msg)
        self._adsorbates = adsorbates
        self._slab_cache: OrderedDict[int, dict] = OrderedDict()
        self._slab_cache_size = slab_cache_size

    def _slabs_by_miller(self, bulk_index: int) -> dict:
        from fairchem.data.oc.core import Bulk

        if bulk_index in self._slab_cache:
            self._slab_cache.move_to_end(bulk_index)
            return self._slab_cache[bulk_index]
        bulk = Bulk(bulk_atoms=self.bulks[bulk_index]["atoms"])
        bulk.set_source_dataset_id(self.bulks[bulk_index]["src_id"])
        by_miller: dict[tuple, list] = {}
        for slab in bulk.get_slabs(max_miller=self.config.max_miller):  # deterministic enumeration
            by_miller.setdefault(tuple(int(m) for m in slab.millers), []).append(slab)
        self._slab_cache[bulk_index] = by_miller
        if len(self._slab_cache) > self._slab_cache_size:
            self._slab_cache.popitem(last=False)
        return by_miller

    def sample(self, sid: int) -> SampledSystem:
        """System `sid`: uniform bulk, uniform Miller index then uniform (shift, top), uniform adsorbate."""
        from fairchem.data.oc.core import Adsorbate, AdsorbateSlabConfig

        rng = np.random.default_rng([self.config.seed, sid])
        bulk_index = int(rng.integers(len(self.bulks)))
        by_miller = self._slabs_by_miller(bulk_index)
        millers = sorted(by_miller)
        miller = millers[int(rng.integers(len(millers)))]
        slab = by_miller[miller][int(rng.integers(len(by_miller[miller])))]
        ads_id = self.adsorbate_ids[int(rng.integers(len(self.adsorbate_ids)))]
        adsorbate = Adsorbate(adsorbate_id_from_db=ads_id, adsorbate_db=self._adsorbates)
        placement_seed = int(rng.integers(2**31))
        with _seeded_numpy(placement_seed):
            config = AdsorbateSlabConfig(slab, adsorbate, num_sites=1, num_augmentations_per_site=1,
                                         mode=self.config.placement)
        atoms = config.atoms_list[0]
        meta = config.get_metadata_dict(0)["adsorbed_slab_metadata"]
        details = {
            "seed": self.config.seed,
            "bulk_src_id": self.bulks[bulk_index]["src_id"],
            "miller": list(miller),
            "shift": float(slab.shift),
            "top": bool(slab.top),
            "adsorbate_id": int(ads_id),
            "adsorbate_smiles": adsorbate.smiles,
            "placement": self.config.placement,
            "site": [float(x) for x in meta["site"]],
        }
        return SampledSystem(sid=sid, atoms=atoms, details=details)


def iter_systems(sampler: SystemSampler, sids: Sequence[int], *, num_workers: int = 0) -> Iterator[SampledSystem]:
    """Systems in the order of `sids`; with workers, sampling runs ahead in a bounded window."""
    if num_workers <= 0:
        for sid in sids:
            yield sampler.sample(sid)
        return
    import multiprocess

    window = 4 * num_workers
    # Workers ignore SIGINT: Ctrl-C reaches the whole process group, and only the parent reports it.
    with multiprocess.get_context("spawn").Pool(num_workers, initializer=signal.signal,
                                                initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        queue: list = []
        sid_iter = iter(sids)
        for sid in sid_iter:
            queue.append(pool.apply_async(sampler.sample, (sid,)))
            if len(queue) >= window:
                break
        while queue:
            result = queue.pop(0).get()
            next_sid = next(sid_iter, None)
            if next_sid is not None:
                queue.append(pool.apply_async(sampler.sample, (next_sid,)))
            yield result
