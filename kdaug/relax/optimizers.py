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
        """The state after one step; `forces` (N,3) eV/A has fixed atoms zeroed. Fixed atoms keep their
        positions. It may reuse the buffers of `state` (LBFGS's history rings): use only the returned state."""


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
    """LBFGS memory: steps s and force changes y (N, 3, memory) per atom, a ring per system (pair number n in
    slot n % memory), the previous positions r0 and forces f0 (N, 3); per system rho (S, memory), the products
    sy[i, j] = s_i . y_j and yy[i, j] = y_i . y_j (S, memory, memory), pairs stored so far and started flag."""

    s: torch.Tensor = per_atom()
    y: torch.Tensor = per_atom()
    r0: torch.Tensor = per_atom()
    f0: torch.Tensor = per_atom()
    rho: torch.Tensor = per_system()
    sy: torch.Tensor = per_system()
    yy: torch.Tensor = per_system()
    n_pairs: torch.Tensor = per_system()
    started: torch.Tensor = per_system()


@dataclass(frozen=True)
class LBFGS:
    """ASE's LBFGS with ASE's defaults (memory 100, alpha 70 eV/A^2, damping 1, maxstep 0.2 A).

    The history lives per atom ((N, 3, memory) rings) so systems can join and leave; each step writes one
    slot in place (`step` reuses its input's history buffers) and updates the per-system products of the new
    pair with the stored ones, so the two-loop recursion is two batched triangular solves over the slots
    (the same sums in another order: equal to the loop to float64 rounding). Unused slots have rho = 0.
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
            s=torch.zeros(n_atoms, 3, self.memory, **f64), y=torch.zeros(n_atoms, 3, self.memory, **f64),
            r0=torch.zeros(n_atoms, 3, **f64), f0=torch.zeros(n_atoms, 3, **f64),
            rho=torch.zeros(n_systems, self.memory, **f64),
            sy=torch.zeros(n_systems, self.memory, self.memory, **f64),
            yy=torch.zeros(n_systems, self.memory, self.memory, **f64),
            n_pairs=torch.zeros(n_systems, dtype=torch.long, device=device),
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
        n_pairs = torch.where(started, state.n_pairs + 1, state.n_pairs)
        used = min(int(n_pairs.max()), self.memory) if n_systems else 0  # slots some system uses (a host read)
        # A system not started yet writes zeros into its empty slot 0.
        slot = state.n_pairs % self.memory
        systems = torch.arange(n_systems, device=state.device)
        s_hist, y_hist, rho, sy, yy = state.s, state.y, state.rho, state.sy, state.yy
        atoms = torch.arange(len(positions), device=state.device)
        s_hist[atoms, :, slot[system_idx]] = s_new
        y_hist[atoms, :, slot[system_idx]] = y_new
        rho[systems, slot] = rho_new

        def products(hist: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            """(S, used): each stored slot's vector dotted with the new one, per system."""
            return _per_system_dots(state, hist[:, :, :used], new)

        sy[systems, slot, :used] = products(y_hist, s_new)
        sy[systems, :used, slot] = products(s_hist, y_new)
        yy_new = products(y_hist, y_new)
        yy[systems, slot, :used] = yy_new
        yy[systems, :used, slot] = yy_new
        state = state.replace(r0=positions, f0=forces, n_pairs=n_pairs, started=torch.ones_like(started))
        step = -self._inverse_hessian_times(state, -forces, used)
        longest = segment_max(step.norm(dim=1), system_idx, n_systems)
        scale = torch.where(longest >= self.maxstep, self.maxstep / longest.clamp_min(1e-300),
                            torch.ones_like(longest))
        return state.replace(positions=moved(state, step * scale[system_idx, None] * self.damping))

    def _inverse_hessian_times(self, state: LbfgsState, q: torch.Tensor, used: int) -> torch.Tensor:
        """ASE's two-loop recursion over the `used` slots, newest pair first, as two triangular solves.

        In age order (0 newest), the first loop's coefficients solve a_i + rho_i sum_{j<i} sy_ij a_j =
        rho_i s_i.q; with z0 = (q - sum_j a_j y_j) / alpha, the second loop's solve b_i + rho_i sum_{j>i}
        sy_ji b_j = rho_i (y_i.z0 + sum_{j>i} sy_ji a_j), and the result is z0 + sum_j (a_j - b_j) s_j.
        """
        if used == 0:
            return q / self.alpha
        system_idx, n_systems = state.system_idx, state.n_systems
        s_hist, y_hist = state.s[:, :, :used], state.y[:, :, :used]
        age = torch.arange(used, device=state.device)
        valid = age < state.n_pairs[:, None]  # (S, used): ages a system has
        order = torch.where(valid, (state.n_pairs[:, None] - 1 - age) % self.memory, torch.zeros_like(age))
        systems = torch.arange(n_systems, device=state.device)[:, None, None]
        pair = valid[:, :, None] & valid[:, None, :]
        sy = torch.where(pair, state.sy[systems, order[:, :, None], order[:, None, :]], 0.0)
        yy = torch.where(pair, state.yy[systems, order[:, :, None], order[:, None, :]], 0.0)
        rho = torch.where(valid, state.rho.gather(1, order), 0.0)

        def in_age_order(hist: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
            return _per_system_dots(state, hist, vector).gather(1, order)

        eye = torch.eye(used, dtype=q.dtype, device=q.device)
        newer = sy * torch.ones(used, used, dtype=q.dtype, device=q.device).tril(-1)  # s_i . y_j, j newer than i
        a = torch.linalg.solve_triangular(eye + rho[:, :, None] * newer, (rho * in_age_order(s_hist, q))[:, :, None],
                                          upper=False, unitriangular=True)[:, :, 0]
        yz0 = (in_age_order(y_hist, q) - (yy @ a[:, :, None])[:, :, 0]) / self.alpha
        older = newer.transpose(1, 2)  # [i, j] = y_i . s_j for j older than i
        rhs = rho * (yz0 + (older @ a[:, :, None])[:, :, 0])
        b = torch.linalg.solve_triangular(eye + rho[:, :, None] * older, rhs[:, :, None], upper=True,
                                          unitriangular=True)[:, :, 0]

        def combination(coefficients: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
            """(N, 3): sum over slots of each system's coefficients (S, used, age order) times its vectors."""
            slots = torch.zeros_like(coefficients).scatter_add_(1, order, torch.where(valid, coefficients, 0.0))
            every = (hist.reshape(3 * len(q), used) @ slots.T).view(len(q), 3, n_systems)  # all systems' coefficients
            return every.gather(2, system_idx[:, None, None].expand(-1, 3, 1))[:, :, 0]

        z0 = (q - combination(a, y_hist)) / self.alpha
        return z0 + combination(a - b, s_hist)


def _per_system_dots(state: BatchState, hist: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """(S, m): per system, each slot of `hist` (N, 3, m) dotted with `vector` (N, 3), as one matrix product
    (elementwise products of the whole history, or index_add_ over 2-D rows, cost far more on a CPU)."""
    systems = torch.arange(state.n_systems, device=state.device)
    spread = vector[:, :, None] * (state.system_idx[:, None] == systems[None, :]).to(vector.dtype)[:, None, :]
    return spread.reshape(3 * len(vector), state.n_systems).T @ hist.reshape(3 * len(vector), hist.shape[2])


OPTIMIZERS = {"fire": FIRE, "lbfgs": LBFGS}
