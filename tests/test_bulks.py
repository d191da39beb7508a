"""The embedded bulks (data/bulks.pkl through kdaug.resources) and generators/build_bulks.py, which curates them."""

from __future__ import annotations

import importlib.util
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from kdaug.resources import resource_path
from kdaug.sampling.oc import load_bulk_db

ROOT = Path(__file__).resolve().parents[1]
# OC20's bulk elements (C, H, N and O occur only in its adsorbates).
OC20_BULK_ELEMENTS = set(
    "Ag Al As Au B Bi Ca Cd Cl Co Cr Cs Cu Fe Ga Ge Hf Hg In Ir K Mn Mo Na Nb Ni Os P Pb Pd "
    "Pt Rb Re Rh Ru S Sb Sc Se Si Sn Sr Ta Tc Te Ti Tl V W Y Zn Zr".split())
FIELDS = {"atoms", "src_id", "energy_per_atom", "formation_energy_per_atom", "e_above_hull", "lattice",
          "prototype", "source", "teacher"}


@pytest.fixture(scope="module")
def build_bulks():
    spec = importlib.util.spec_from_file_location("build_bulks", ROOT / "generators" / "build_bulks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_bulks"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["build_bulks"]


def check_entries(entries, teacher: str) -> None:
    assert len({e["src_id"] for e in entries}) == len(entries)
    for e in entries:
        assert FIELDS <= set(e), e["src_id"]
        assert e["teacher"] == teacher
        assert set(e["atoms"].get_chemical_symbols()) <= OC20_BULK_ELEMENTS, e["src_id"]
        assert e["e_above_hull"] <= 0.1 + 1e-9, e["src_id"]
        assert np.isfinite([e["energy_per_atom"], e["formation_energy_per_atom"]]).all()
        np.testing.assert_allclose(e["lattice"], e["atoms"].cell.cellpar(), atol=1e-6)
        assert e["atoms"].calc is None and e["atoms"].pbc.all()
        if e["prototype"] == "element":
            assert e["source"] == "ase.collections.dcdft" and e["formation_energy_per_atom"] == pytest.approx(0)
            assert e["e_above_hull"] == pytest.approx(0, abs=1e-9)


def test_embedded_bulks_are_teacher_curated_near_the_hull_and_readable_by_fairchem():
    from fairchem.data.oc.core import Bulk

    entries = load_bulk_db(None)
    check_entries(entries, "chgnet")
    elements = {e["atoms"].get_chemical_symbols()[0] for e in entries if e["prototype"] == "element"}
    assert elements == OC20_BULK_ELEMENTS  # every OC20 bulk element, from dcdft
    assert {e["prototype"] for e in entries} > {"element", "B2"}
    # Everything kept lies at most 0.1 eV/atom above the hull, so a binary below 0 formation energy is common and
    # none is far above it.
    binaries = [e for e in entries if e["prototype"] != "element"]
    assert binaries and max(e["formation_energy_per_atom"] for e in binaries) <= 0.1 + 1e-9
    last = entries[-1]
    bulk = Bulk(bulk_src_id_from_db=last["src_id"], bulk_db_path=str(resource_path("bulks.pkl")))
    assert bulk.src_id == last["src_id"]
    np.testing.assert_allclose(bulk.atoms.positions, last["atoms"].positions)


def test_stored_energies_are_chgnets():
    from kdaug.models import load_teacher
    from kdaug.models.ase_calc import ModelCalculator

    entries = load_bulk_db(None)
    calculator = ModelCalculator(load_teacher("chgnet"))
    picked = [entries[0]] + [next(e for e in entries if e["prototype"] == p) for p in ("B2", "L1_2")]
    for e in picked:
        atoms = e["atoms"].copy()
        atoms.calc = calculator
        assert atoms.get_potential_energy() / len(atoms) == pytest.approx(e["energy_per_atom"], abs=2e-3), e["src_id"]


def test_build_curates_with_emt_and_resumes_a_cut_run(build_bulks, tmp_path, monkeypatch):
    out = tmp_path / "bulks.pkl"
    args = ["--teacher", "emt", "--elements", "Cu", "Au", "--out", str(out)]
    build_bulks.main(args)
    first = pickle.loads(out.read_bytes())
    check_entries(first, "emt")
    assert {e["src_id"] for e in first} >= {"kdaug-dcdft-Cu", "kdaug-dcdft-Au"}
    # EMT's Cu-Au: ordered alloys below the elements, as in experiment.
    assert min(e["formation_energy_per_atom"] for e in first) < 0
    assert all(e["prototype"] in ("element", "B2", "L1_0", "L1_2") for e in first)  # no Cu-Au rock salt

    state = tmp_path / "bulks.build.jsonl"
    lines = state.read_text().splitlines()
    relaxed = [json.loads(line)["id"] for line in lines[1:] if json.loads(line)["stage"] == "relax"]
    assert len(relaxed) >= 2
    # A run killed while writing its last two relaxations: they are redone, nothing else.
    state.write_text("\n".join(lines[:-2]) + "\n" + lines[-2][:20])
    calls = []
    original = build_bulks.Teacher.relax
    monkeypatch.setattr(build_bulks.Teacher, "relax", lambda self, atoms: calls.append(1) or original(self, atoms))
    build_bulks.main(args)
    assert len(calls) == 2
    again = pickle.loads(out.read_bytes())
    assert [e["src_id"] for e in again] == [e["src_id"] for e in first]
    np.testing.assert_allclose([e["e_above_hull"] for e in again], [e["e_above_hull"] for e in first], atol=1e-6)


@pytest.mark.parametrize(("args", "message"), [
    (["--teacher", "painn-small"], "--teacher painn-small: gives energies and forces but no stress"),
    (["--teacher", "nope"], "model 'nope': unknown"),
    (["--teacher", "emt", "--elements", "Cu", "Xx"], "--elements Xx: expected OC20 bulk elements"),
    (["--teacher", "emt", "--elements", "Cu", "Fe"], "--elements Fe: teacher emt does not support them"),
])
def test_bad_options_are_one_line(build_bulks, tmp_path, args, message):
    with pytest.raises(SystemExit) as stop:
        build_bulks.main([*args, "--out", str(tmp_path / "bulks.pkl")])
    assert message in str(stop.value) and "\n" not in str(stop.value)
    assert not (tmp_path / "bulks.pkl").exists()


def test_a_state_of_other_options_is_refused(build_bulks, tmp_path):
    state = tmp_path / "state.jsonl"
    state.write_text(json.dumps({"teacher": "chgnet", "elements": ["Au", "Cu"], "fmax": 0.02}) + "\n")
    with pytest.raises(SystemExit, match=f"--state {state}: built with"):
        build_bulks.main(["--teacher", "emt", "--elements", "Cu", "Au", "--out", str(tmp_path / "b.pkl"),
                          "--state", str(state)])
