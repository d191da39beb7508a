"""Shared fixtures: tiny EMT-labelled slabs (real physics, milliseconds) and the OC20 frame."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from ase.build import add_adsorbate, fcc111
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms

from kdaug.data.convert import atoms_to_frame
from kdaug.types import Frame, Provenance

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
OC20_FRAME = SHARED / "data" / "oc20_frame_atoms.json"


def emt_slab(metal: str = "Cu", adsorbate: str = "O", seed: int = 0):
    """A 2x2x3 fcc(111) slab with one adsorbate, OC20 tags, bottom layer fixed, rattled, EMT attached."""
    slab = fcc111(metal, size=(2, 2, 3), vacuum=6.0)
    layer = slab.get_tags()  # ase: 1 = top layer ... 3 = bottom
    tags = np.where(layer == 1, 1, 0)
    add_adsorbate(slab, adsorbate, 1.8, "fcc")
    slab.set_tags(np.append(tags, 2))
    slab.set_constraint(FixAtoms(mask=slab.get_tags() == 0))
    slab.rattle(0.05, seed=seed)
    slab.calc = EMT()
    return slab


def emt_frames(n: int, *, origin: str = "dft") -> list[Frame]:
    frames = []
    for i in range(n):
        atoms = emt_slab(["Cu", "Pt", "Au"][i % 3], ["O", "H", "C"][i % 3], seed=i)
        frames.append(atoms_to_frame(atoms, sid=100 + i, fid=i % 2, provenance=Provenance(origin=origin)))
    return frames


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """An LMDB of 6 EMT-labelled slabs (`emt_frames(6)`), for the commands that read existing frames."""
    from kdaug.data.lmdb import LmdbWriter

    path = tmp_path_factory.mktemp("source")
    with LmdbWriter(path) as writer:
        writer.write_batch(emt_frames(6))
    return path


def write_training_data(root: Path, n_frames: int) -> dict[str, str]:
    """EMT slabs as LMDBs under `root`: 6 DFT, 4 synthetic, the rest for validation, and a painn-tiny
    teacher checkpoint (seed 1); {"dft", "synthetic", "val", "teacher": path}."""
    import torch

    from kdaug.data.lmdb import LmdbWriter
    from kdaug.models import load_model

    frames = emt_frames(n_frames)
    parts = {"dft": frames[:6], "synthetic": [f.replace(provenance=f.provenance.__class__(origin="synthetic"))
                                              for f in frames[6:10]], "val": frames[10:]}
    paths = {}
    for name, subset in parts.items():
        with LmdbWriter(root / name) as writer:
            writer.write_batch(subset)
        paths[name] = str(root / name)
    torch.manual_seed(1)
    load_model("painn-tiny").save(root / "teacher.pt")
    paths["teacher"] = str(root / "teacher.pt")
    return paths


@pytest.fixture
def frames() -> list[Frame]:
    return emt_frames(6)


@pytest.fixture
def oc20_atoms():
    if not OC20_FRAME.exists():
        pytest.skip("../shared/data is absent")
    from ase.io import read

    return read(OC20_FRAME)


def mounted_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at `mount` (needs root) for full-disk tests; skips the test where it cannot be mounted."""
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True,
                      check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)
