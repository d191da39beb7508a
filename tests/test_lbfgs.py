"""kdaug's LBFGS (history rings, triangular solves) against the shifting, slot-by-slot implementation it
replaced, and against ASE's LBFGS, on EMT slabs that join and leave the batch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT
from ase.optimize import LBFGS as AseLBFGS

from kdaug.models import load_model
from kdaug.relax.optimizers import LBFGS, moved
from kdaug.relax.runner import BatchedRelaxer, RelaxTask
from kdaug.state import BatchState, per_atom, per_system, segment_max, segment_sum
from tests.conftest import emt_slab


@dataclass(eq=False)
class ShiftedState(BatchState):
    s: torch.Tensor = per_atom()
    y: torch.Tensor = per_atom()
    r0: torch.Tensor = per_atom()
    f0: torch.Tensor = per_atom()
    rho: torch.Tensor = per_system()
    n_hist: torch.Tensor = per_system()
    started: torch.Tensor = per_system()


@dataclass(frozen=True)
class ShiftedLBFGS:
    """kdaug's LBFGS before the rings (commit 35c3bcf): history shifted by one slot per step, newest last,
    two-loop recursion one slot at a time."""

    memory: int = 100
    alpha: float = 70.0
    maxstep: float = 0.2

    def init(self, state: BatchState) -> ShiftedState:
        n, s, f64 = len(state.positions), state.n_systems, {"dtype": torch.float64}
        return ShiftedState(**vars(state.structure()), s=torch.zeros(n, self.memory, 3, **f64),
                            y=torch.zeros(n, self.memory, 3, **f64), r0=torch.zeros(n, 3, **f64),
                            f0=torch.zeros(n, 3, **f64), rho=torch.zeros(s, self.memory, **f64),
                            n_hist=torch.zeros(s, dtype=torch.long), started=torch.zeros(s, dtype=torch.bool))

    def step(self, state: ShiftedState, forces: torch.Tensor) -> ShiftedState:
        positions, idx, n_sys, started = state.positions, state.system_idx, state.n_systems, state.started
        s_new = torch.where(started[idx, None], positions - state.r0, torch.zeros_like(positions))
        y_new = torch.where(started[idx, None], state.f0 - forces, torch.zeros_like(forces))
        ys = segment_sum((y_new * s_new).sum(1), idx, n_sys)
        rho_new = torch.where(started & (ys != 0), 1 / torch.where(ys != 0, ys, torch.ones_like(ys)), 0.0)
        state = state.replace(
            s=torch.cat([state.s[:, 1:], s_new[:, None]], dim=1), y=torch.cat([state.y[:, 1:], y_new[:, None]], dim=1),
            rho=torch.cat([state.rho[:, 1:], rho_new[:, None]], dim=1), r0=positions, f0=forces,
            n_hist=torch.where(started, (state.n_hist + 1).clamp_max(self.memory), state.n_hist),
            started=torch.ones_like(started))
        q, used, coefficients = forces.clone(), int(state.n_hist.max()), []
        q = -q
        for i in range(self.memory - 1, self.memory - used - 1, -1):
            coef = state.rho[:, i] * segment_sum((state.s[:, i] * q).sum(1), idx, n_sys)
            q = q - coef[idx, None] * state.y[:, i]
            coefficients.append(coef)
        z = q / self.alpha
        for i, coef in zip(range(self.memory - used, self.memory), reversed(coefficients)):
            b = state.rho[:, i] * segment_sum((state.y[:, i] * z).sum(1), idx, n_sys)
            z = z + state.s[:, i] * (coef - b)[idx, None]
        step = z * -1
        longest = segment_max(step.norm(dim=1), idx, n_sys)
        scale = torch.where(longest >= self.maxstep, self.maxstep / longest.clamp_min(1e-300), 1.0)
        return state.replace(positions=moved(state, step * scale[idx, None]))


def tasks(n: int) -> list[RelaxTask]:
    pairs = [("Cu", "O"), ("Pt", "H"), ("Au", "C"), ("Ni", "N")]
    return [RelaxTask.from_atoms(emt_slab(*pairs[i % 4], seed=i), sid=i) for i in range(n)]


@pytest.mark.parametrize("memory", [3, 100])
def test_rings_equal_the_shifting_implementation_as_systems_join_and_leave(memory):
    """Twelve steps; a third system joins after step 4 and the first leaves after step 8; with memory 3 the
    rings wrap. Every step's positions agree with the old implementation's to float64 rounding."""
    model = load_model("emt")
    first, third = tasks(3)[:2], tasks(3)[2:]
    states = [opt.init(BatchState.from_frames(first)) for opt in (LBFGS(memory=memory), ShiftedLBFGS(memory=memory))]
    for step in range(12):
        if step == 4:
            states = [type(st).concat([st, opt.init(BatchState.from_frames(third))])
                      for st, opt in zip(states, (LBFGS(memory=memory), ShiftedLBFGS(memory=memory)))]
        if step == 8:
            states = [st.select(torch.tensor([False, True, True])) for st in states]
        new = []
        for state, opt in zip(states, (LBFGS(memory=memory), ShiftedLBFGS(memory=memory))):
            forces = model(state.structure().to_batch()).forces.masked_fill(state.fixed[:, None], 0.0)
            new.append(opt.step(state, forces))
        states = new
        torch.testing.assert_close(states[0].positions, states[1].positions, rtol=0, atol=1e-12)
    assert int(states[0].n_pairs.max()) == 11 and not torch.equal(states[0].positions, BatchState.from_frames(
        tasks(3)[1:]).positions)


def test_relaxer_lbfgs_follows_ase_with_native_emt_to_rounding():
    """30 steps of 3 slabs in one batch against ASE's LBFGS with its own EMT: energies within 1e-10 eV."""
    work = tasks(3)
    results = {r.task.sid: r for r in BatchedRelaxer(load_model("emt"), optimizer="lbfgs", fmax=1e-4, max_steps=30,
                                                    max_systems=3).run(work)}
    for task in work:
        atoms = emt_slab(*[("Cu", "O"), ("Pt", "H"), ("Au", "C")][task.sid], seed=task.sid)
        atoms.calc = EMT()
        AseLBFGS(atoms, logfile=None).run(fmax=1e-4, steps=30)
        assert abs(results[task.sid].final.energy - atoms.get_potential_energy()) < 1e-10
        np.testing.assert_allclose(results[task.sid].final.positions, atoms.positions, rtol=0, atol=1e-10)
