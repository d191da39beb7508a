"""CHGNet graphs built in worker processes give the same labels as graphs built in this thread."""

from __future__ import annotations

import torch

from kdaug.data.batch import batch_from_frames
from kdaug.models import load_model
from tests.conftest import emt_frames


def test_parallel_graphs_equal_the_serial_path():
    model = load_model("chgnet")
    frames = emt_frames(3)
    serial = model(batch_from_frames(frames), taps=["atom_energy"])
    model.build_graphs_in(1)
    try:
        parallel = model(batch_from_frames(frames), taps=["atom_energy"])
    finally:
        model.close_graph_workers()
    assert torch.equal(parallel.energy, serial.energy)
    assert torch.equal(parallel.forces, serial.forces)
    assert torch.equal(parallel.taps["atom_energy"], serial.taps["atom_energy"])
    assert model._graph_pool is None
