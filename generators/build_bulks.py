"""Rebuild data/bulks.pkl, the embedded bulk database in the OC20 `bulks.pkl` format.

    python generators/build_bulks.py [--out data/bulks.pkl]

Entries are dicts {"atoms": ase.Atoms, "src_id": str}:
- elemental bulks of the OC20 bulk elements whose ASE reference state
  (ase.data.reference_states) is fcc, bcc, hcp or diamond, built by ase.build.bulk;
- binary intermetallics of a host metal with every other OC20 bulk element in the
  B2 (AB), L1_0 (AB) and L1_2 (A3B and AB3) prototypes, with the lattice constant
  from Vegard's law: the composition-weighted mean of each element's lattice
  constant in that prototype, derived from its atomic volume (ASE reference
  crystal, or a close-packed estimate from the covalent radius when the element
  has no such crystal).
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.data import atomic_numbers, covalent_radii, reference_states

# OC20's bulk elements; C, H, N and O only occur in adsorbates.
OC20_BULK_ELEMENTS = (
    "Ag Al As Au B Bi Ca Cd Cl Co Cr Cs Cu Fe Ga Ge Hf Hg In Ir K Mn Mo Na Nb Ni Os P Pb Pd "
    "Pt Rb Re Rh Ru S Sb Sc Se Si Sn Sr Ta Tc Te Ti Tl V W Y Zn Zr"
).split()
HOSTS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Co", "Fe", "Ru", "Rh", "Ir")
SIMPLE_STRUCTURES = ("fcc", "bcc", "hcp", "diamond")

# Fractional positions in a cubic (L1_0: tetragonal with ideal c/a = 1) cell; "A" and "B" sites.
PROTOTYPES: dict[str, tuple[int, list[tuple[str, tuple[float, float, float]]]]] = {
    "B2": (2, [("A", (0, 0, 0)), ("B", (0.5, 0.5, 0.5))]),
    "L1_0": (4, [("A", (0, 0, 0)), ("A", (0.5, 0.5, 0)), ("B", (0.5, 0, 0.5)), ("B", (0, 0.5, 0.5))]),
    "L1_2": (4, [("B", (0, 0, 0)), ("A", (0, 0.5, 0.5)), ("A", (0.5, 0, 0.5)), ("A", (0.5, 0.5, 0))]),
}


def elemental_bulk(symbol: str) -> Atoms | None:
    state = reference_states[atomic_numbers[symbol]]
    if not state or state.get("symmetry") not in SIMPLE_STRUCTURES:
        return None
    try:
        return bulk(symbol)
    except ValueError:  # reference states that need an explicit atomic basis
        return None


def atomic_volume(symbol: str) -> float:
    """Angstrom^3 per atom: ASE's reference crystal, else close-packed spheres of the covalent radius."""
    crystal = elemental_bulk(symbol)
    if crystal is not None:
        return crystal.get_volume() / len(crystal)
    radius = covalent_radii[atomic_numbers[symbol]]
    return 4 * np.sqrt(2) * radius**3


def intermetallic(prototype: str, a_symbol: str, b_symbol: str) -> Atoms:
    n_sites, sites = PROTOTYPES[prototype]
    symbols = [a_symbol if site == "A" else b_symbol for site, _ in sites]
    # Vegard's law on the lattice constant each element would have in this prototype.
    lattice = {s: (n_sites * atomic_volume(s)) ** (1 / 3) for s in (a_symbol, b_symbol)}
    a = float(np.mean([lattice[s] for s in symbols]))
    return Atoms(symbols, scaled_positions=[p for _, p in sites], cell=[a, a, a], pbc=True)


def build_database() -> list[dict]:
    entries = []
    for symbol in OC20_BULK_ELEMENTS:
        crystal = elemental_bulk(symbol)
        if crystal is not None:
            structure = reference_states[atomic_numbers[symbol]]["symmetry"]
            entries.append({"atoms": crystal, "src_id": f"kdaug-{structure}-{symbol}"})
    seen = set()
    for host in HOSTS:
        for partner in OC20_BULK_ELEMENTS:
            if partner == host or frozenset((host, partner)) in seen:
                continue
            seen.add(frozenset((host, partner)))
            for prototype, a_symbol, b_symbol, formula in (
                ("B2", host, partner, f"{host}{partner}"),
                ("L1_0", host, partner, f"{host}{partner}"),
                ("L1_2", host, partner, f"{host}3{partner}"),
                ("L1_2", partner, host, f"{partner}3{host}"),
            ):
                entries.append({"atoms": intermetallic(prototype, a_symbol, b_symbol),
                                "src_id": f"kdaug-{prototype}-{formula}"})
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "bulks.pkl")
    args = parser.parse_args()
    entries = build_database()
    args.out.write_bytes(pickle.dumps(entries, protocol=4))
    elements = sorted({s for e in entries for s in e["atoms"].get_chemical_symbols()})
    print(f"wrote {len(entries)} bulks covering {len(elements)} elements to {args.out}")


if __name__ == "__main__":
    main()
