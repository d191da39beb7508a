"""FIRE and LBFGS over a flat batch of systems, each with its own optimizer state.

Both follow ASE's `ase.optimize.FIRE` / `ase.optimize.LBFGS` step for step (same
defaults), vectorised over systems. Each optimizer's memory is a `BatchState`
subclass (per-atom and per-system fields), so `select` / `concat` let systems
leave and join the batch between steps. Forces on fixed atoms are zeroed and
fixed atoms never move. Positions in Angstrom, forces in eV/Angstrom, float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from kdaug.state import BatchState, per_atom, per_system, segment_max, segment_sum


class Optimizer(Protocol):
    def init(self, state: BatchState) -> BatchState:
        """The optimizer's state (a `BatchState` subclass) for fresh systems `state` (float64 positions)."""

    def step(self, state: BatchState, forces: torch.Tensor) -> BatchState:
        """The state after one step; `forces` (N,3) eV/A has fixed atoms zeroed. Does not mutate its inputs;
        fixed atoms keep their positions."""


def moved(state: BatchState, dr: torch.Tensor) -> torch.Tensor:
    """Positions (N,3) after displacing the free atoms of `state` by `dr` (N,3)."""
    return torch.where(state.fixed[:, None], state.positions, state.positions + dr)


@dataclass(eq=False)
class FireState(BatchState):
    """FIRE memory: velocity (N,3) per atom; dt, mixing a, downhill-step count and started flag per system."""

    velocity: torch.Tensor = per_atom()
    dt: torch.Tensor = per_system()
    a: torch.Tensor = per_system()
    n_downhill: torch.Tensor = per_system()
    started: torch.Tensor = per_system()


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

    def init(self, state: BatchState) -> FireState:
        n_systems, f64 = state.n_systems, {"dtype": torch.float64, "device": state.device}
        return FireState(**vars(state.structure()), velocity=torch.zeros_like(state.positions, dtype=torch.float64),
                         dt=torch.full((n_systems,), self.dt, **f64), a=torch.full((n_systems,), self.astart, **f64),
                         n_downhill=torch.zeros(n_systems, dtype=torch.long, device=state.device),
                         started=torch.zeros(n_systems, dtype=torch.bool, device=state.device))

    def step(self, state: FireState, forces: torch.Tensor) -> FireState:
        v, dt, a, n_down, started = state.velocity, state.dt, state.a, state.n_downhill, state.started
        system_idx = state.system_idx

        def per_system(x):
            return segment_sum(x, system_idx, state.n_systems)

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
        return state.replace(positions=moved(state, dr), velocity=v, dt=dt, a=a, n_downhill=n_down,
                             started=torch.ones_like(started))


@dataclass(eq=False)
class LbfgsState(BatchState):
    """LBFGS memory, newest last: steps s and force changes y (N, memory, 3), the previous positions r0 and
    forces f0 (N, 3) per atom; rho (S, memory), history length and started flag per system."""

    s: torch.Tensor = per_atom()
    y: torch.Tensor = per_atom()
    r0: torch.Tensor = per_atom()
    f0: torch.Tensor = per_atom()
    rho: torch.Tensor = per_system()
    n_hist: torch.Tensor = per_system()
    started: torch.Tensor = per_system()


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

    def init(self, state: BatchState) -> LbfgsState:
        n_atoms, n_systems, device = len(state.positions), state.n_systems, state.device
        f64 = {"dtype": torch.float64, "device": device}
        return LbfgsState(
            **vars(state.structure()),
            s=torch.zeros(n_atoms, self.memory, 3, **f64), y=torch.zeros(n_atoms, self.memory, 3, **f64),
            r0=torch.zeros(n_atoms, 3, **f64), f0=torch.zeros(n_atoms, 3, **f64),
            rho=torch.zeros(n_systems, self.memory, **f64),
            n_hist=torch.zeros(n_systems, dtype=torch.long, device=device),
            started=torch.zeros(n_systems, dtype=torch.bool, device=device),
        )

    def step(self, state: LbfgsState, forces: torch.Tensor) -> LbfgsState:
        positions, system_idx, n_systems, started = state.positions, state.system_idx, state.n_systems, state.started
        atom_started = started[system_idx, None]
        s_new = torch.where(atom_started, positions - state.r0, torch.zeros_like(positions))
        y_new = torch.where(atom_started, state.f0 - forces, torch.zeros_like(forces))
        ys = segment_sum((y_new * s_new).sum(1), system_idx, n_systems)
        rho_new = torch.where(started & (ys != 0), 1 / torch.where(ys != 0, ys, torch.ones_like(ys)),
                              torch.zeros_like(ys))
        state = state.replace(
            s=torch.cat([state.s[:, 1:], s_new[:, None]], dim=1), y=torch.cat([state.y[:, 1:], y_new[:, None]], dim=1),
            rho=torch.cat([state.rho[:, 1:], rho_new[:, None]], dim=1), r0=positions, f0=forces,
            n_hist=torch.where(started, (state.n_hist + 1).clamp_max(self.memory), state.n_hist),
            started=torch.ones_like(started))
        step = -self._inverse_hessian_times(state, -forces)
        longest = segment_max(step.norm(dim=1), system_idx, n_systems)
        scale = torch.where(longest >= self.maxstep, self.maxstep / longest.clamp_min(1e-300),
                            torch.ones_like(longest))
        return state.replace(positions=moved(state, step * scale[system_idx, None] * self.damping))

    def _inverse_hessian_times(self, state: LbfgsState, q: torch.Tensor) -> torch.Tensor:
        """Two-loop recursion over the history slots some system uses (one small host read)."""
        system_idx, n_systems, s_hist, y_hist, rho = state.system_idx, state.n_systems, state.s, state.y, state.rho
        used = int(state.n_hist.max()) if n_systems else 0
        coefficients = []
        for i in range(self.memory - 1, self.memory - used - 1, -1):
            coef = rho[:, i] * segment_sum((s_hist[:, i] * q).sum(1), system_idx, n_systems)
            q = q - coef[system_idx, None] * y_hist[:, i]
            coefficients.append(coef)
        z = q / self.alpha
        for i, coef in zip(range(self.memory - used, self.memory), reversed(coefficients)):
            b = rho[:, i] * segment_sum((y_hist[:, i] * z).sum(1), system_idx, n_systems)
            z = z + s_hist[:, i] * (coef - b)[system_idx, None]
        return z


OPTIMIZERS = {"fire": FIRE, "lbfgs": LBFGS}
