"""Random adsorbate+slab systems with fairchem-data-oc: bulk -> slab -> adsorbate placement.

System `sid` is drawn from a generator seeded by (seed, sid), so any subset of
ids reproduces the same systems in any process. fairchem-data-oc draws from the
global `np.random`; each of its calls runs inside `_seeded_numpy` with a seed
derived from (seed, sid), and the global state is restored afterwards.
Tags: 0 subsurface (fixed), 1 surface, 2 adsorbate.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools
import os
import pickle
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

from kdaug.errors import KdaugError
from kdaug.resources import resource_path
from kdaug.workers import worker_pool

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


def _center_slab_exactly(slab, *, original: Callable):
    """pymatgen's `center_slab` without its per-site neighbour search when that search cannot move anything.

    pymatgen shifts the slab through the periodic boundary only for a site with a neighbour at least one cell
    height `c` away within 3x the shortest bond of site 0; with fairchem's 20 A of vacuum 3x a bond is far
    below `c`, so only the final centring on the centre of mass remains (same result, ~80 % of a slab's cost).
    """
    bonds = [nn[1] for nn in slab.get_neighbors(slab[0], 10) if nn[1] > 0]
    if not bonds or 3 * min(bonds) >= slab.lattice.c:
        return original(slab)
    weights = [site.species.weight for site in slab]
    center_of_mass = np.average(slab.frac_coords, weights=weights, axis=0)
    slab.translate_sites(list(range(len(slab))), [0, 0, 0.5 - center_of_mass[2]])
    return slab


@contextlib.contextmanager
def _fairchem_shortcuts(bulk_atoms: Atoms | None = None, bulk_coordination: dict | None = None) -> Iterator[None]:
    """Inside: pymatgen's slab centring skips its no-op search, and fairchem's surface tagging reuses the bulk's
    coordination numbers (`bulk_coordination`, computed once per bulk) instead of recomputing them per slab."""
    from fairchem.data.oc.core import slab as fairchem_slab
    from pymatgen.core import surface

    original_center, original_coordination = surface.center_slab, fairchem_slab.calculate_coordination_of_bulk_atoms
    surface.center_slab = functools.partial(_center_slab_exactly, original=original_center)
    if bulk_coordination is not None:
        fairchem_slab.calculate_coordination_of_bulk_atoms = (
            lambda atoms: bulk_coordination if atoms is bulk_atoms else original_coordination(atoms))
    try:
        yield
    finally:
        surface.center_slab = original_center
        fairchem_slab.calculate_coordination_of_bulk_atoms = original_coordination


@dataclass
class _BulkWork:
    """What sampling reuses across systems of one bulk: its atoms (standing in for fairchem's `Bulk`, which only
    lends `atoms` and `src_id` to a slab), distinct Miller indices, atoms' coordination numbers, and the untiled
    slabs of each Miller index asked for so far."""

    atoms: Atoms
    src_id: str
    millers: list[tuple[int, int, int]]
    coordination: dict | None = None
    slabs: dict[tuple, list] = field(default_factory=dict)

    @classmethod
    def of(cls, atoms: Atoms, src_id: str, max_miller: int) -> _BulkWork:
        from fairchem.data.oc.core.slab import standardize_bulk
        from pymatgen.core.surface import get_symmetrically_distinct_miller_indices

        atoms = atoms.copy()
        millers = get_symmetrically_distinct_miller_indices(standardize_bulk(atoms), max_miller)
        return cls(atoms, src_id, [tuple(int(m) for m in miller) for miller in millers])

    def untiled(self, miller: tuple[int, int, int]) -> list:
        """fairchem's `compute_slabs` 5-tuples (structure, miller, shift, top, oriented bulk) of one Miller index."""
        from fairchem.data.oc.core.slab import compute_slabs

        if miller not in self.slabs:
            with _fairchem_shortcuts():
                self.slabs[miller] = compute_slabs(self.atoms, specific_millers=[miller])
        return self.slabs[miller]

    def slab(self, miller: tuple[int, int, int], index: int):
        from fairchem.data.oc.core.slab import Slab, calculate_coordination_of_bulk_atoms, tile_and_tag_atoms

        if self.coordination is None:
            self.coordination = calculate_coordination_of_bulk_atoms(self.atoms)
        structure, millers, shift, top, oriented = self.untiled(miller)[index]
        with _fairchem_shortcuts(self.atoms, self.coordination):
            atoms = tile_and_tag_atoms(structure, self.atoms)
        return Slab(self, atoms, millers, shift, top, oriented)


class SystemSampler:
    """Draws system `sid` deterministically; keeps the per-bulk work of the last `cache_size` bulks."""

    def __init__(self, config: SamplerConfig, *, cache_size: int = 64) -> None:
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
        self._bulk_cache: OrderedDict[int, _BulkWork] = OrderedDict()
        self._cache_size = cache_size

    def _bulk(self, bulk_index: int) -> _BulkWork:
        if bulk_index not in self._bulk_cache:
            entry = self.bulks[bulk_index]
            self._bulk_cache[bulk_index] = _BulkWork.of(entry["atoms"], entry["src_id"], self.config.max_miller)
            if len(self._bulk_cache) > self._cache_size:
                self._bulk_cache.popitem(last=False)
        self._bulk_cache.move_to_end(bulk_index)
        return self._bulk_cache[bulk_index]

    def millers(self, bulk_index: int) -> list[tuple[int, int, int]]:
        """The bulk's symmetrically distinct Miller indices up to `max_miller` (pymatgen's order)."""
        return self._bulk(bulk_index).millers

    def n_slabs(self, bulk_index: int, miller: tuple[int, int, int]) -> int:
        """How many (shift, top) slabs the bulk has for `miller` (0 for some)."""
        return len(self._bulk(bulk_index).untiled(miller))

    def slab(self, bulk_index: int, miller: tuple[int, int, int], index: int):
        """Slab `index` of the bulk's `miller` slabs, tiled, tagged and constrained as fairchem-data-oc does."""
        return self._bulk(bulk_index).slab(miller, index)

    def sample(self, sid: int) -> SampledSystem:
        """System `sid`: uniform bulk, uniform Miller index among those with slabs, uniform (shift, top), uniform
        adsorbate -- the distribution of enumerating every slab up to `max_miller` first, at the cost of one
        Miller index (the first non-empty one of a random permutation)."""
        from fairchem.data.oc.core.adsorbate import Adsorbate
        from fairchem.data.oc.core.adsorbate_slab_config import AdsorbateSlabConfig

        rng = np.random.default_rng([self.config.seed, sid])
        bulk_index = int(rng.integers(len(self.bulks)))
        millers = self.millers(bulk_index)
        miller = next((millers[k] for k in rng.permutation(len(millers)) if self.n_slabs(bulk_index, millers[k])),
                      None)
        if miller is None:
            msg = (f"bulk {self.bulks[bulk_index]['src_id']}: no slab up to Miller index {self.config.max_miller}; "
                   "remove it from --bulk-db")
            raise KdaugError(msg)
        slab = self.slab(bulk_index, miller, int(rng.integers(self.n_slabs(bulk_index, miller))))
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


def import_oc_core_without_fairchem_core() -> None:
    """Make `fairchem.data.oc.core`'s submodules importable without running the package's `__init__`, whose
    `Bulk` import loads fairchem-core and torch (tens of seconds per fresh process). For sampling worker processes
    only: afterwards `from fairchem.data.oc.core import Bulk` fails in that process."""
    name = "fairchem.data.oc.core"
    if name not in sys.modules:
        sys.modules[name] = importlib.util.module_from_spec(importlib.util.find_spec(name))


_worker_sampler: SystemSampler | None = None


def _start_worker(config: SamplerConfig) -> None:
    global _worker_sampler
    import_oc_core_without_fairchem_core()
    _worker_sampler = SystemSampler(config)


def _sample_in_worker(sid: int) -> SampledSystem:
    return _worker_sampler.sample(sid)


def iter_systems(sampler: SystemSampler, sids: Sequence[int], *, num_workers: int = 0,
                 ahead: int | None = None) -> Iterator[SampledSystem]:
    """The systems `sids`: in their order in-process (`num_workers=0`); with workers, in the order they finish,
    at most `ahead` (default 4 per worker) sampled or in flight beyond the one being consumed, so a slow system
    never holds back the ones after it. Each worker builds its own sampler from `sampler.config` once."""
    if num_workers <= 0:
        for sid in sids:
            yield sampler.sample(sid)
        return
    from concurrent.futures import FIRST_COMPLETED, wait

    pending_sids = iter(sids)
    with worker_pool(num_workers, _start_worker, sampler.config) as pool:
        in_flight = {pool.submit(_sample_in_worker, sid)
                     for sid in itertools.islice(pending_sids, ahead or 4 * num_workers)}
        try:
            while in_flight:
                finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                in_flight |= {pool.submit(_sample_in_worker, sid)
                              for sid in itertools.islice(pending_sids, len(finished))}
                for future in sorted(finished, key=lambda f: f.result().sid):
                    yield future.result()
        finally:
            for future in in_flight:
                future.cancel()
