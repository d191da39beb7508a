"""`BatchState`: scopes, select / concat / split / to round trips, model input, segment reductions."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kdaug.relax.optimizers import FIRE, LBFGS, FireState
from kdaug.state import ATOM, SYSTEM, BatchState, per_atom, segment_max, segment_sum, split_atoms
from tests.conftest import emt_frames


def assert_same(a: BatchState, b: BatchState) -> None:
    assert type(a) is type(b)
    for name in a.scopes():
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)


@pytest.fixture
def frames():
    return emt_frames(4)


@pytest.fixture
def state(frames):
    return BatchState.from_frames(frames)


def test_from_frames_keeps_every_field_and_tag(frames, state):
    assert state.n_systems == 4 and state.n_atoms.tolist() == [f.n_atoms for f in frames]
    assert state.sid.tolist() == [f.sid for f in frames] and state.positions.dtype == torch.float64
    for k, frame in enumerate(frames):
        rows = state.system_idx == k
        np.testing.assert_array_equal(state.positions[rows].numpy(), frame.positions)
        np.testing.assert_array_equal(state.tags[rows].numpy(), frame.tags)
        np.testing.assert_array_equal(state.fixed[rows].numpy(), frame.fixed)
        np.testing.assert_array_equal(state.cell[k].numpy(), frame.cell)
    assert set(state.tags.tolist()) == {0, 1, 2} and torch.equal(state.fixed, state.tags == 0)


def test_every_field_has_one_scope_and_unscoped_fields_are_refused():
    scopes = BatchState.scopes()
    assert {name for name, scope in scopes.items() if scope == ATOM} == {
        "positions", "atomic_numbers", "tags", "fixed", "system_idx"}
    assert {name for name, scope in scopes.items() if scope == SYSTEM} == {"cell", "sid"}
    assert FireState.scopes()["velocity"] == ATOM and FireState.scopes()["dt"] == SYSTEM
    with pytest.raises(TypeError, match="Loose.charge: declare the field with per_atom"):
        @dataclasses.dataclass
        class Loose(BatchState):
            charge: torch.Tensor = None


def test_rows_are_checked_against_the_scope(state):
    with pytest.raises(ValueError, match="positions: .* rows, expected"):
        state.replace(positions=state.positions[:-1])
    with pytest.raises(ValueError, match="sid: 3 rows, expected 4"):
        state.replace(sid=state.sid[:3])


def test_select_keeps_chosen_systems_and_renumbers(frames, state):
    picked = state.select(torch.tensor([False, True, False, True]))
    assert_same(picked, BatchState.from_frames([frames[1], frames[3]]))
    assert picked.system_idx.tolist() == [0] * frames[1].n_atoms + [1] * frames[3].n_atoms
    empty = state.select(torch.zeros(4, dtype=torch.bool))
    assert empty.n_systems == 0 and len(empty.positions) == 0


def test_split_and_concat_round_trip(frames, state):
    parts = state.split()
    assert len(parts) == 4
    for part, frame in zip(parts, frames):
        assert_same(part, BatchState.from_frames([frame]))
    assert_same(BatchState.concat(parts), state)
    mask = torch.tensor([True, False, False, True])
    regrouped = BatchState.concat([state.select(mask), state.select(~mask)])
    assert_same(regrouped, BatchState.from_frames([frames[0], frames[3], frames[1], frames[2]]))


@pytest.mark.parametrize("optimizer", [FIRE(), LBFGS(memory=4)], ids=["fire", "lbfgs"])
def test_optimizer_states_move_with_their_systems(state, optimizer):
    full = optimizer.init(state)
    full = full.replace(**{name: torch.randn_like(getattr(full, name), dtype=torch.float64)
                           for name in ("velocity", "dt", "s", "rho") if name in full.scopes()})
    assert type(full).scopes().keys() > BatchState.scopes().keys()
    mask = torch.tensor([False, True, True, False])
    rejoined = type(full).concat([full.select(~mask), full.select(mask)])
    assert_same(rejoined.select(torch.tensor([False, False, True, True])), full.select(mask))
    assert_same(type(full).concat(full.split()), full)
    assert_same(full.structure(), state)


def test_to_changes_float_fields_only(state):
    single = state.to(dtype=torch.float32)
    assert single.positions.dtype == single.cell.dtype == torch.float32
    assert single.atomic_numbers.dtype == torch.long and single.fixed.dtype == torch.bool
    assert torch.equal(single.to(device="cpu", dtype=torch.float64).positions, state.positions.float().double())


def test_model_input_batch_round_trip(state):
    batch = state.to_batch(dtype=torch.float32)
    assert batch.pos.dtype == batch.cell.dtype == torch.float32
    assert batch.natoms.tolist() == state.n_atoms.tolist() and batch.ptr.tolist() == [0, 13, 26, 39, 52]
    assert torch.equal(batch.batch, state.system_idx) and torch.equal(batch.fixed, state.fixed)
    back = BatchState.from_batch(state.to_batch())
    assert_same(back, state)
    positions = state.positions.clone().requires_grad_(True)
    state.replace(positions=positions).to_batch().pos.sum().backward()  # the graph survives
    assert positions.grad is not None


def test_segment_reductions_match_a_loop():
    generator = torch.Generator().manual_seed(0)
    system_idx = torch.tensor([0, 0, 0, 2, 2, 3])
    values = torch.randn(6, generator=generator)
    vectors = torch.randn(6, 3, generator=generator)
    sums, maxima, vector_sums = segment_sum(values, system_idx, 5), segment_max(values, system_idx, 5), \
        segment_sum(vectors, system_idx, 5)
    for k in range(5):
        rows = system_idx == k
        assert sums[k] == pytest.approx(float(values[rows].sum()))
        assert maxima[k] == pytest.approx(float(values[rows].max()) if rows.any() else 0.0)
        torch.testing.assert_close(vector_sums[k], vectors[rows].sum(0))
    parts = split_atoms(np.arange(12).reshape(6, 2), [3, 0, 2, 1])
    assert [len(p) for p in parts] == [3, 0, 2, 1] and parts[2].tolist() == [[6, 7], [8, 9]]


def test_a_subclass_field_follows_its_scope():
    @dataclasses.dataclass(eq=False)
    class Charged(BatchState):
        charge: torch.Tensor = per_atom()

    state = BatchState.from_frames(emt_frames(2))
    charged = Charged(**vars(state), charge=torch.arange(len(state.positions), dtype=torch.float64))
    first = charged.select(torch.tensor([True, False]))
    assert first.charge.tolist() == list(range(13))
    assert Charged.concat(charged.split()).charge.tolist() == list(range(26))
