"""FIRE and LBFGS over a flat batch of systems, each with its own optimizer state.

Both follow ASE's `ase.optimize.FIRE` / `ase.optimize.LBFGS` step for step (same
defaults), vectorised over systems: per-atom tensors have N rows, per-system
tensors S rows, and `OptimizerState.select` / `concat` let systems leave and
join the batch between steps. Forces on fixed atoms are zeroed and fixed atoms
never move. Positions in Angstrom, forces in eV/Angstrom, float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class OptimizerState:
    """Optimizer memory: `atom` tensors (N, ...) and `system` tensors (S, ...)."""

    atom: dict[str, torch.Tensor] = field(default_factory=dict)
    system: dict[str, torch.Tensor] = field(default_factory=dict)

    def select(self, atom_mask: torch.Tensor, system_mask: torch.Tensor) -> OptimizerState:
        return OptimizerState({k: v[atom_mask] for k, v in self.atom.items()},
                              {k: v[system_mask] for k, v in self.system.items()})

    @staticmethod
    def concat(states: Sequence[OptimizerState]) -> OptimizerState:
        states = [s for s in states if s.system]
        if not states:
            return OptimizerState()
        return OptimizerState({k: torch.cat([s.atom[k] for s in states]) for k in states[0].atom},
                              {k: torch.cat([s.system[k] for s in states]) for k in states[0].system})


def segment_sum(values: torch.Tensor, system_idx: torch.Tensor, n_systems: int) -> torch.Tensor:
    """(N,) -> (S,) sums per system."""
    return torch.zeros(n_systems, dtype=values.dtype, device=values.device).index_add_(0, system_idx, values)


def segment_max(values: torch.Tensor, system_idx: torch.Tensor, n_systems: int) -> torch.Tensor:
    """(N,) -> (S,) maxima per system (0 for a system with no atoms)."""
    out = torch.zeros(n_systems, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, system_idx, values, reduce="amax", include_self=False)


class Optimizer(Protocol):
    def init(self, n_atoms: int, *, device: torch.device) -> OptimizerState:
        """State of one fresh system of `n_atoms` atoms."""

    def step(self, positions: torch.Tensor, forces: torch.Tensor, system_idx: torch.Tensor, n_systems: int,
             state: OptimizerState) -> tuple[torch.Tensor, OptimizerState]:
        """New positions (N,3) and state; does not mutate its inputs. `forces` has fixed atoms zeroed."""


@dataclass(frozen=True)
class FIRE:
    """ASE's FIRE (Bitzek et al. 2006) with ASE's defaults; maxstep in Angstrom."""

    dt: float = 0.1
    maxstep: float = 0.2
    dtmax: float = 1.0
    n_min: int = 5
    finc: float = 1.1
    fdec: float = 0.5
    astart: float = 0.1
    fa: float = 0.99

    def init(self, n_atoms: int, *, device: torch.device) -> OptimizerState:
        f64 = {"dtype": torch.float64, "device": device}
        return OptimizerState(
            atom={"velocity": torch.zeros(n_atoms, 3, **f64)},
            system={"dt": torch.full((1,), self.dt, **f64), "a": torch.full((1,), self.astart, **f64),
                    "n_downhill": torch.zeros(1, dtype=torch.long, device=device),
                    "started": torch.zeros(1, dtype=torch.bool, device=device)},
        )

    def step(self, positions, forces, system_idx, n_systems, state):
        v, dt, a = state.atom["velocity"], state.system["dt"], state.system["a"]
        n_down, started = state.system["n_downhill"], state.system["started"]

        def per_system(x):
            return segment_sum(x, system_idx, n_systems)

        vf = per_system((forces * v).sum(1))
        f_norm = per_system((forces * forces).sum(1)).sqrt()
        v_norm = per_system((v * v).sum(1)).sqrt()
        downhill = started & (vf > 0)
        uphill = started & ~(vf > 0)
        mix = torch.where(downhill, a * v_norm / f_norm.clamp_min(1e-300), torch.zeros_like(a))
        keep = torch.where(downhill, 1 - a, torch.where(uphill, torch.zeros_like(a), torch.ones_like(a)))
        v = keep[system_idx, None] * v + mix[system_idx, None] * forces
        speed_up = downhill & (n_down > self.n_min)
        dt = torch.where(speed_up, (dt * self.finc).clamp_max(self.dtmax), dt)
        a = torch.where(speed_up, a * self.fa, a)
        dt = torch.where(uphill, dt * self.fdec, dt)
        a = torch.where(uphill, torch.full_like(a, self.astart), a)
        n_down = torch.where(downhill, n_down + 1, torch.where(uphill, torch.zeros_like(n_down), n_down))
        v = v + dt[system_idx, None] * forces
        dr = dt[system_idx, None] * v
        dr_norm = per_system((dr * dr).sum(1)).sqrt()
        scale = torch.where(dr_norm > self.maxstep, self.maxstep / dr_norm.clamp_min(1e-300), torch.ones_like(dr_norm))
        dr = dr * scale[system_idx, None]
        new_state = OptimizerState({"velocity": v}, {"dt": dt, "a": a, "n_downhill": n_down,
                                                     "started": torch.ones_like(started)})
        return positions + dr, new_state


@dataclass(frozen=True)
class LBFGS:
    """ASE's LBFGS with ASE's defaults (memory 100, alpha 70 eV/A^2, damping 1, maxstep 0.2 A).

    The history lives per atom ((N, memory, 3), newest last) so systems can join and
    leave; a system's unused slots have rho = 0 and drop out of the two-loop recursion.
    """

    memory: int = 100
    alpha: float = 70.0
    damping: float = 1.0
    maxstep: float = 0.2

    def init(self, n_atoms: int, *, device: torch.device) -> OptimizerState:
        f64 = {"dtype": torch.float64, "device": device}
        return OptimizerState(
            atom={"s": torch.zeros(n_atoms, self.memory, 3, **f64), "y": torch.zeros(n_atoms, self.memory, 3, **f64),
                  "r0": torch.zeros(n_atoms, 3, **f64), "f0": torch.zeros(n_atoms, 3, **f64)},
            system={"rho": torch.zeros(1, self.memory, **f64),
                    "n_hist": torch.zeros(1, dtype=torch.long, device=device),
                    "started": torch.zeros(1, dtype=torch.bool, device=device)},
        )

    def step(self, positions, forces, system_idx, n_systems, state):
        started = state.system["started"]
        atom_started = started[system_idx, None]
        s_new = torch.where(atom_started, positions - state.atom["r0"], torch.zeros_like(positions))
        y_new = torch.where(atom_started, state.atom["f0"] - forces, torch.zeros_like(forces))
        ys = segment_sum((y_new * s_new).sum(1), system_idx, n_systems)
        rho_new = torch.where(started & (ys != 0), 1 / torch.where(ys != 0, ys, torch.ones_like(ys)),
                              torch.zeros_like(ys))
        s_hist = torch.cat([state.atom["s"][:, 1:], s_new[:, None]], dim=1)
        y_hist = torch.cat([state.atom["y"][:, 1:], y_new[:, None]], dim=1)
        rho = torch.cat([state.system["rho"][:, 1:], rho_new[:, None]], dim=1)
        n_hist = torch.where(started, (state.system["n_hist"] + 1).clamp_max(self.memory), state.system["n_hist"])

        # Two-loop recursion over the slots some system uses (one small host read).
        used = int(n_hist.max()) if n_systems else 0
        q = -forces
        coefficients = []
        for i in range(self.memory - 1, self.memory - used - 1, -1):
            coef = rho[:, i] * segment_sum((s_hist[:, i] * q).sum(1), system_idx, n_systems)
            q = q - coef[system_idx, None] * y_hist[:, i]
            coefficients.append(coef)
        z = q / self.alpha
        for i, coef in zip(range(self.memory - used, self.memory), reversed(coefficients)):
            b = rho[:, i] * segment_sum((y_hist[:, i] * z).sum(1), system_idx, n_systems)
            z = z + s_hist[:, i] * (coef - b)[system_idx, None]
        step = -z
        longest = segment_max(step.norm(dim=1), system_idx, n_systems)
        scale = torch.where(longest >= self.maxstep, self.maxstep / longest.clamp_min(1e-300),
                            torch.ones_like(longest))
        dr = step * scale[system_idx, None] * self.damping
        new_state = OptimizerState(
            {"s": s_hist, "y": y_hist, "r0": positions, "f0": forces},
            {"rho": rho, "n_hist": n_hist, "started": torch.ones_like(started)},
        )
        return positions + dr, new_state


OPTIMIZERS = {"fire": FIRE, "lbfgs": LBFGS}
