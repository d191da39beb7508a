"""Label-only teachers from ASE calculators (one system at a time, no gradients, no taps)."""

from __future__ import annotations

import importlib
import json
import weakref
from collections.abc import Callable, Iterable

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.data import atomic_numbers as symbol_to_z
from torch_geometric.data import Batch

from kdaug.errors import KdaugError
from kdaug.models.protocol import AtomisticModel, ModelOutput, new_trajectories


class AseCalculatorModel(AtomisticModel):
    """Wraps a calculator factory; energies and raw forces (constraints not applied).

    Each trajectory the batch names (`batch.trajectory`, see `kdaug.models.protocol`) has its own calculator
    from its first evaluation until `end_trajectories`, so EMT keeps its neighbour list between the steps of
    a relaxation as ASE's one calculator per `Atoms` does; a system without a trajectory gets a fresh one.
    Either way a result depends only on the trajectory's own history, never on what else was evaluated before
    (a calculator's neighbour list changes its sums in the last bit), so a resumed run repeats an uninterrupted
    one bit for bit.
    """

    differentiable = False

    def __init__(self, factory: Callable[[], Calculator], name: str,
                 supported_elements: frozenset[int] | None = None) -> None:
        super().__init__()
        self.factory = factory
        self.name = name
        if supported_elements is not None:
            self.supported_elements = supported_elements
        self._example = factory()
        self._calcs: dict[int, Calculator] = {}

    @property
    def identity(self) -> str:
        """A label-only teacher has no checkpoint: its calculator class and parameters name it."""
        cls = type(self._example)
        parameters = json.dumps(dict(getattr(self._example, "parameters", {})), sort_keys=True, default=str)
        return f"{cls.__module__}.{cls.__qualname__}({parameters})"

    def end_trajectories(self, ids: Iterable[int]) -> None:
        for trajectory in ids:
            self._calcs.pop(int(trajectory), None)

    def _calculator(self, trajectory: int | None) -> Calculator:
        if trajectory is None:
            return self.factory()
        if trajectory not in self._calcs:
            self._calcs[trajectory] = self.factory()
        return self._calcs[trajectory]

    def compute(self, batch: Batch, taps: tuple[str, ...]) -> ModelOutput:
        pos = batch.pos.detach().cpu().double().numpy()
        numbers = batch.atomic_numbers.cpu().numpy()
        cells = batch.cell.detach().cpu().double().numpy()
        bounds = batch.ptr.cpu().tolist()
        named = batch.get("trajectory")
        trajectories = named.tolist() if torch.is_tensor(named) else [None] * (len(bounds) - 1)
        energies, forces = [], []
        for system, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            atoms = Atoms(numbers=numbers[start:stop], positions=pos[start:stop], cell=cells[system], pbc=True)
            calc = self._calculator(trajectories[system])
            try:
                energies.append(calc.get_property("energy", atoms))
                forces.append(calc.get_property("forces"))  # of the same atoms: no second comparison of them
            except Exception as err:  # third-party calculators raise anything
                msg = f"teacher {self.name} failed on system {system}: {type(err).__name__}: {err}"
                raise KdaugError(msg) from err
        device = batch.pos.device
        return ModelOutput(
            energy=torch.tensor(np.array(energies), dtype=batch.pos.dtype, device=device),
            forces=torch.tensor(np.concatenate(forces), dtype=batch.pos.dtype, device=device),
        )


def emt() -> AseCalculatorModel:
    """ASE's EMT: the cheap stand-in for DFT (Al, Cu, Ag, Au, Ni, Pd, Pt with H, C, N, O)."""
    from ase.calculators.emt import EMT, parameters

    return AseCalculatorModel(EMT, "emt", frozenset(symbol_to_z[s] for s in parameters))


def from_spec(spec: str) -> AseCalculatorModel:
    """`ase:package.module:ClassName` -> a label-only teacher around that calculator class."""
    parts = spec.split(":")
    if len(parts) != 3 or not all(parts[1:]):
        msg = f"--teacher {spec}: expected ase:package.module:CalculatorClass"
        raise KdaugError(msg)
    _, module_name, class_name = parts
    try:
        factory = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        msg = f"--teacher {spec}: cannot import {class_name} from {module_name} ({err})"
        raise KdaugError(msg) from err
    return AseCalculatorModel(factory, spec)


class ModelCalculator(Calculator):
    """Any `AtomisticModel` as an ASE calculator (one structure per call): energy (eV) and forces (eV/A).
    Its calls are one trajectory of the model, ended when the calculator is garbage-collected."""

    implemented_properties = ("energy", "forces")

    def __init__(self, model: AtomisticModel, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.trajectory = new_trajectories(1)
        weakref.finalize(self, model.end_trajectories, self.trajectory.tolist())

    def calculate(self, atoms=None, properties=("energy",), system_changes=None) -> None:
        from kdaug.data.batch import make_batch

        super().calculate(atoms, properties, system_changes)
        dtype = self.model.dtype
        device = self.model.device
        from kdaug.data.convert import fixed_mask

        batch = make_batch(
            pos=torch.tensor(self.atoms.positions, dtype=dtype, device=device),
            atomic_numbers=torch.tensor(self.atoms.numbers),
            cell=torch.tensor(np.array(self.atoms.cell), dtype=dtype)[None],
            natoms=torch.tensor([len(self.atoms)]),
            tags=torch.tensor(self.atoms.get_tags()),  # GemNet-OC's quadruplets use tags
            fixed=torch.tensor(fixed_mask(self.atoms)),
        )
        batch.trajectory = self.trajectory
        with torch.no_grad():
            out = self.model(batch)
        self.results = {"energy": float(out.energy[0]), "forces": out.forces.detach().double().cpu().numpy()}
