"""The one check every stored entry passes when read: a pickled PyG Data holding one labelled structure.

Accepted layouts are ours and fairchem's (`AtomsToGraphs` names energy/forces, S2EF names y/force). The
error names the file, the key and the field, e.g. `data.0000.lmdb: entry 7 is not a structure frame
(field force has shape (12, 3), expected (13, 3))`.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch_geometric.data import Data

from kdaug.errors import KdaugError

EXPECTED = ("expected an S2EF-style LMDB whose values are torch_geometric Data with pos, atomic_numbers, cell, "
            "y|energy and force|forces")
# Plausibility bounds: beyond them a value is damage, and geometry code (neighbour lists) would not finish.
MAX_COORDINATE_ANG = 1e4
MIN_CELL_HEIGHT_ANG = 0.5
_ALIASES = {"y": ("y", "energy"), "force": ("force", "forces")}


class BadEntry(KdaugError):
    """A stored entry that is not a structure frame."""


def entry_error(path: Path, key: str, detail: str) -> BadEntry:
    return BadEntry(f"{path}: entry {key} is not a structure frame ({detail}); {EXPECTED}")


def _field(data: Data, name: str) -> tuple[str, object]:
    for alias in _ALIASES.get(name, (name,)):
        if alias in data:
            return alias, data[alias]
    return "|".join(_ALIASES.get(name, (name,))), None


def _array(name: str, value: object, shape: tuple[int, ...], *, real: bool) -> np.ndarray:
    if not isinstance(value, torch.Tensor):
        msg = f"field {name} is a {type(value).__name__}, expected a tensor"
        raise ValueError(msg)
    if value.is_complex() or (real and not value.is_floating_point()):
        msg = f"field {name} has dtype {value.dtype}, expected {'floating point' if real else 'real numbers'}"
        raise ValueError(msg)
    array = value.detach().cpu().numpy()
    if array.size == int(np.prod(shape)) and array.ndim and array.shape != shape and name == "cell":
        array = array.reshape(shape)  # (1, 3, 3) in S2EF files
    if array.shape != shape:
        msg = f"field {name} has shape {tuple(array.shape)}, expected {shape}"
        raise ValueError(msg)
    if not np.isfinite(array).all():
        msg = f"field {name} holds non-finite values"
        raise ValueError(msg)
    return array


def _check_fields(data: Data) -> None:
    """Raise ValueError naming the first field that is missing or malformed."""
    missing = [name for name in ("pos", "atomic_numbers", "cell", "y", "force") if _field(data, name)[1] is None]
    if missing:
        names = ", ".join(_field(data, m)[0] for m in missing)
        msg = f"missing field {names}; has {', '.join(sorted(data.keys()))}"
        raise ValueError(msg)
    numbers = data["atomic_numbers"]
    expected = "field atomic_numbers must be a non-empty (N,) tensor of atomic numbers 1..118"
    if not isinstance(numbers, torch.Tensor) or numbers.dim() != 1 or not numbers.numel():
        raise ValueError(expected)
    n_atoms = numbers.shape[0]
    numbers = _array("atomic_numbers", numbers, (n_atoms,), real=False)
    if (numbers != np.round(numbers)).any() or numbers.min() < 1 or numbers.max() > 118:
        raise ValueError(expected)
    positions = _array("pos", data["pos"], (n_atoms, 3), real=True)
    cell = _array("cell", data["cell"], (3, 3), real=True)
    for name, array in (("pos", positions), ("cell", cell)):
        if np.abs(array).max() > MAX_COORDINATE_ANG:
            msg = f"field {name} has coordinates beyond {MAX_COORDINATE_ANG:g} Angstrom"
            raise ValueError(msg)
    if cell.any():  # all zeros: no periodic cell
        areas = np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
        if not areas.all() or abs(np.linalg.det(cell)) / areas.max() < MIN_CELL_HEIGHT_ANG:
            msg = f"field cell has a lattice height below {MIN_CELL_HEIGHT_ANG} Angstrom"
            raise ValueError(msg)
    alias, energy = _field(data, "y")
    if isinstance(energy, (int, float, np.number)) and not isinstance(energy, bool):
        energy = torch.tensor(float(energy), dtype=torch.float64)
    if isinstance(energy, torch.Tensor) and energy.numel() == 1:
        energy = energy.reshape(())
    _array(alias, energy, (), real=True)
    alias, forces = _field(data, "force")
    _array(alias, forces, (n_atoms, 3), real=True)
    for name in ("tags", "fixed"):
        if name in data:
            _array(name, data[name], (n_atoms,), real=False)
    for name in ("natoms", "sid", "fid"):
        if name in data:
            value = data[name]
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if not isinstance(value, (int, np.integer)) or (name == "natoms" and value != n_atoms):
                msg = f"field {name} is {value!r}, expected {n_atoms if name == 'natoms' else 'an integer'}"
                raise ValueError(msg)
    for name in ("origin", "teacher", "teacher_sha256", "details"):
        if name in data and not isinstance(data[name], str):
            msg = f"field {name} is a {type(data[name]).__name__}, expected a string"
            raise ValueError(msg)


def decode_entry(path: Path, key: str, raw: bytes | None) -> Data:
    """The validated Data stored under `key` of `path`, with S2EF names (y, force); raises `BadEntry`."""
    if raw is None:
        raise entry_error(path, key, "key missing")
    try:
        data = pickle.loads(raw)
    except Exception as err:  # any unpickling failure means "not our kind of value"
        raise entry_error(path, key, f"cannot unpickle: {type(err).__name__}") from err
    if not isinstance(data, Data):
        raise entry_error(path, key, f"value is a {type(data).__name__}")
    try:
        _check_fields(data)
    except (ValueError, TypeError, RuntimeError) as err:
        raise entry_error(path, key, str(err)) from err
    for name, value in data:  # stored tensors never need gradients (a flipped flag byte can set one)
        if isinstance(value, torch.Tensor) and value.requires_grad:
            data[name] = value.detach()
    if "y" not in data:
        data.y = data.energy
        del data.energy
    if "force" not in data:
        data.force = data.forces
        del data.forces
    return data
