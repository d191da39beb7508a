"""`validate_model`: does an `AtomisticModel` keep the protocol's promises on a small batch?

Checks, in order (the first failure raises a one-line `KdaugError` naming model and check):

- outputs: energy (S,) and forces (N,3), finite, in the model's dtype and on its device;
- taps: every declared tap with its shape (node (N,D), edge `EdgeFeatures`, vector (N,3,D),
  atom_energy (N,) summing to the energy where `atom_energy_sums_to_energy`), asking for taps
  changes neither energy nor forces;
- forces: forces == -dE/dpos for conservative models, by autograd when `differentiable` (which
  must then hold), else by central finite differences;
- translation: energy and forces unchanged when every atom moves by the same vector.
"""

from __future__ import annotations

from typing import NoReturn

import numpy as np
import torch
from ase import Atoms
from ase.build import add_adsorbate, fcc100, fcc111
from ase.data import atomic_numbers as symbol_to_z
from torch_geometric.data import Batch

from kdaug.data.batch import make_batch
from kdaug.errors import KdaugError
from kdaug.models.protocol import TAPS, AtomisticModel, EdgeFeatures, ModelOutput

# (rtol, atol in eV or eV/A) per dtype: float32 GNNs accumulate ~1e-6 relative rounding per layer.
TOLERANCES = {torch.float64: (1e-7, 1e-6), torch.float32: (1e-4, 2e-3)}
# Probe systems: the first pair whose elements the model supports.
PROBES = (("Cu", "O", "Pt", "H"), ("Pt", "C", "Au", "N"), ("Al", "O", "Ni", "H"))
SHIFT = (0.37, -0.21, 0.53)  # Angstrom, a translation off every symmetry of the probes
FD_STEP = 1e-4  # Angstrom


class ContractError(KdaugError):
    """A model broke the protocol; the message names the model and the check."""


def probe_batch(model: AtomisticModel) -> Batch:
    """Two small slabs with adsorbates (10 and 13 atoms, OC20 tags, bottom layer fixed), rattled, in the
    model's dtype and device."""
    for metal_a, ads_a, metal_b, ads_b in PROBES:
        if {symbol_to_z[s] for s in (metal_a, ads_a, metal_b, ads_b)} <= model.supported_elements:
            break
    else:
        msg = f"model {model.name}: no probe system uses only its elements; pass validate_model a batch"
        raise KdaugError(msg)
    systems = [fcc111(metal_a, size=(3, 3, 1), vacuum=5.0), fcc100(metal_b, size=(2, 2, 3), vacuum=5.0)]
    for slab, adsorbate in zip(systems, (ads_a, ads_b)):
        layer = slab.get_tags()
        slab.set_tags(np.where(layer == 1, 1, 0))
        add_adsorbate(slab, adsorbate, 1.6, "ontop")
        slab.set_tags(np.append(slab.get_tags()[:-1], 2))
        slab.rattle(0.05, seed=len(slab))
    return _batch_of(systems, model)


def _batch_of(systems: list[Atoms], model: AtomisticModel) -> Batch:
    dtype, device = model.dtype, model.device
    tags = np.concatenate([s.get_tags() for s in systems])
    return make_batch(
        pos=torch.tensor(np.concatenate([s.positions for s in systems]), dtype=dtype, device=device),
        atomic_numbers=torch.tensor(np.concatenate([s.numbers for s in systems])),
        cell=torch.tensor(np.stack([np.array(s.cell) for s in systems]), dtype=dtype),
        natoms=torch.tensor([len(s) for s in systems]),
        tags=torch.tensor(tags),
        fixed=torch.tensor(tags == 0),
    )


def _moved(batch: Batch, pos: torch.Tensor) -> Batch:
    moved = batch.clone()
    moved.pos = pos
    return moved


def _fail(model: AtomisticModel, check: str, detail: str) -> NoReturn:
    raise ContractError(f"model {model.name} fails the {check} check: {detail}")


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> tuple[bool, float]:
    rtol, atol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    error = float((a.detach() - b.detach()).abs().max()) if a.numel() else 0.0
    limit = atol * scale + rtol * float(b.detach().abs().max() if b.numel() else 0.0)
    return error <= limit, error


def _check_outputs(model: AtomisticModel, batch: Batch, out: ModelOutput) -> None:
    n_systems, n_atoms = len(batch.natoms), batch.pos.shape[0]
    if not isinstance(out, ModelOutput):
        _fail(model, "outputs", f"forward returned {type(out).__name__}, expected ModelOutput")
    for name, value, shape in (("energy", out.energy, (n_systems,)), ("forces", out.forces, (n_atoms, 3))):
        if tuple(value.shape) != shape:
            _fail(model, "outputs", f"{name} has shape {tuple(value.shape)}, expected {shape}")
        if value.dtype != model.dtype:
            _fail(model, "outputs", f"{name} is {value.dtype}, the model declares dtype {model.dtype}")
        if value.device != model.device:
            _fail(model, "outputs", f"{name} is on {value.device}, the model is on {model.device}")
        if not torch.isfinite(value).all():
            _fail(model, "outputs", f"{name} is not finite")


def _check_taps(model: AtomisticModel, batch: Batch, plain: ModelOutput) -> None:
    taps = sorted(model.implemented_taps)
    unknown = sorted(set(taps) - set(TAPS))
    if unknown:
        _fail(model, "taps", f"declares unknown tap(s) {', '.join(unknown)} (known: {', '.join(TAPS)})")
    if not taps:
        return
    out = model(batch, taps=taps)
    if set(out.taps) != set(taps):
        _fail(model, "taps", f"returned taps {sorted(out.taps)} when asked for {taps}")
    for name, value in (("energy", out.energy), ("forces", out.forces)):
        ok, error = _close(value, getattr(plain, name), model.dtype)
        if not ok:
            _fail(model, "taps", f"asking for taps changes the {name} (by {error:.3g})")
    n_atoms = batch.pos.shape[0]
    for tap in taps:
        value = out.taps[tap]
        if tap == "edge":
            _check_edge(model, value, n_atoms)
            continue
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        expected = {"node": "(N, D)", "vector": "(N, 3, D)", "atom_energy": "(N,)"}[tap]
        good = shape is not None and {
            "node": len(shape) == 2 and shape[0] == n_atoms,
            "vector": len(shape) == 3 and shape[:2] == (n_atoms, 3),
            "atom_energy": shape == (n_atoms,),
        }[tap]
        if not good:
            _fail(model, "taps", f"{tap} tap has shape {shape}, expected {expected} with N = {n_atoms}")
    if "atom_energy" in taps and model.atom_energy_sums_to_energy:
        summed = torch.zeros_like(plain.energy).index_add_(0, batch.batch, out.taps["atom_energy"].detach())
        ok, error = _close(summed, plain.energy, model.dtype, scale=n_atoms)
        if not ok:
            _fail(model, "taps", f"atom_energy sums differ from the energy by {error:.3g} eV")


def _check_edge(model: AtomisticModel, edge: object, n_atoms: int) -> None:
    if not isinstance(edge, EdgeFeatures):
        _fail(model, "taps", f"edge tap is {type(edge).__name__}, expected EdgeFeatures")
    n_edges = edge.features.shape[0]
    if edge.features.dim() != 2 or tuple(edge.edge_index.shape) != (2, n_edges) or \
            tuple(edge.vectors.shape) != (n_edges, 3):
        _fail(model, "taps", f"edge tap shapes features {tuple(edge.features.shape)}, edge_index "
                             f"{tuple(edge.edge_index.shape)}, vectors {tuple(edge.vectors.shape)}; "
                             "expected (E, D), (2, E), (E, 3)")
    index = edge.edge_index
    if index.is_floating_point() or (n_edges and (int(index.min()) < 0 or int(index.max()) >= n_atoms)):
        _fail(model, "taps", f"edge_index must hold integer atom indices in [0, {n_atoms})")


def _check_forces(model: AtomisticModel, batch: Batch, plain: ModelOutput) -> None:
    if model.differentiable:
        pos = batch.pos.detach().clone().requires_grad_(True)
        energy = model(_moved(batch, pos)).energy
        if not energy.requires_grad:
            _fail(model, "forces", "declared differentiable, but the energy has no gradient w.r.t. positions")
        if not model.conservative:
            return
        (gradient,) = torch.autograd.grad(energy.sum(), pos)
        ok, error = _close(plain.forces, -gradient, model.dtype)
        if not ok:
            _fail(model, "forces", f"forces differ from -dE/dpos by {error:.3g} eV/A")
        return
    if not model.conservative:
        return
    n_atoms = batch.pos.shape[0]
    for atom, axis in ((0, 0), (n_atoms // 2, 1), (n_atoms - 1, 2)):
        energies = []
        for sign in (1.0, -1.0):
            pos = batch.pos.detach().clone()
            pos[atom, axis] += sign * FD_STEP
            energies.append(model(_moved(batch, pos)).energy.double().sum())
        derivative = float(energies[0] - energies[1]) / (2 * FD_STEP)
        force = float(plain.forces[atom, axis])
        if abs(force + derivative) > 1e-3 * (1.0 + abs(force)):
            _fail(model, "forces", f"force on atom {atom} axis {axis} is {force:.6g} eV/A, "
                                   f"finite-difference -dE/dx is {-derivative:.6g}")


def _check_translation(model: AtomisticModel, batch: Batch, plain: ModelOutput) -> None:
    shift = torch.tensor(SHIFT, dtype=batch.pos.dtype, device=batch.pos.device)
    with torch.no_grad():
        moved = model(_moved(batch, batch.pos.detach() + shift))
    for name in ("energy", "forces"):
        ok, error = _close(getattr(moved, name), getattr(plain, name), model.dtype)
        if not ok:
            _fail(model, "translation", f"moving every atom by {SHIFT} A changes the {name} by {error:.3g}")


def validate_model(model: AtomisticModel, batch: Batch | None = None) -> None:
    """Run the contract checks on `batch` (default: `probe_batch(model)`); raises `ContractError`."""
    batch = probe_batch(model) if batch is None else batch
    with torch.no_grad():
        plain = model(batch)
    _check_outputs(model, batch, plain)
    with torch.no_grad():
        _check_taps(model, batch, plain)
    _check_forces(model, batch, plain)
    _check_translation(model, batch, plain)
