"""Radius graphs per structure (`kdaug.models.graph_cache`): a prediction does not depend on its batch mates,
kept graphs are reused, a moved structure gets a new graph, and the trainer keeps its graphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import fcc111
from ase.calculators.emt import EMT

from kdaug.data.batch import batch_from_frames
from kdaug.data.convert import atoms_to_frame
from kdaug.models import load_model
from kdaug.models.graph_cache import GraphCache
from kdaug.train.loop import Trainer
from tests.conftest import emt_slab
from tests.test_train import config, data  # noqa: F401  (the training data fixture)

# max_neighbors below a perfect slab's first shells: equidistant neighbours compete for the last places
TRUNCATING_PAINN = """name: painn
model: {hidden_channels: 16, num_layers: 2, num_rbf: 8, cutoff: 5.0, max_neighbors: 10, regress_forces: true,
        direct_forces: true, use_pbc: true}
"""


def perfect_slab(metal, size, sid):
    slab = fcc111(metal, size=size, vacuum=6.0)
    slab.set_tags([1] * len(slab))
    slab.calc = EMT()
    return atoms_to_frame(slab, sid=sid, fid=0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("graph-cache") / "painn.yml"
    path.write_text(TRUNCATING_PAINN)
    torch.manual_seed(0)
    return load_model(str(path))


@pytest.fixture(scope="module")
def frames():
    return [perfect_slab("Cu", (1, 1, 3), 0), perfect_slab("Pt", (4, 4, 3), 1), perfect_slab("Cu", (2, 2, 4), 2),
            atoms_to_frame(emt_slab("Au", "O", 0), sid=3, fid=0)]


def energies(model, frames):
    return model(batch_from_frames(frames)).energy


def test_a_prediction_does_not_depend_on_its_batch_mates(model, frames):
    alone = torch.cat([energies(model, [frame]) for frame in frames])
    assert torch.allclose(energies(model, frames), alone, atol=1e-5, rtol=0)
    per_structure, model.graph_cache = model.graph_cache, None  # fairchem's graph over the whole batch
    try:
        batched = energies(model, frames)
    finally:
        model.graph_cache = per_structure
    assert (batched - alone).abs().max() > 1e-3  # the case above is one where batch mates matter


def test_kept_graphs_are_reused_and_a_moved_structure_gets_its_own(model, frames):
    fresh = energies(model, frames)
    kept = GraphCache(5.0, 10, True, max_structures=8)
    model.graph_cache, per_structure = kept, model.graph_cache
    try:
        assert torch.equal(energies(model, frames), fresh) and (kept.hits, kept.misses) == (0, 4)
        assert torch.equal(energies(model, frames), fresh) and (kept.hits, kept.misses) == (4, 4)
        shift = np.zeros_like(frames[0].positions)
        shift[0, 2] = 0.3  # one atom of the first slab moves
        moved = [frames[0].replace(positions=frames[0].positions + shift), *frames[1:]]
        got = energies(model, moved)
        assert (kept.hits, kept.misses) == (7, 5) and len(kept) == 5
    finally:
        model.graph_cache = per_structure
    assert torch.equal(got, energies(model, moved)) and not torch.equal(got, fresh)


def test_the_least_recently_used_graphs_go_beyond_max_structures(frames):
    kept = GraphCache(5.0, 10, True, max_structures=2)
    for frame in frames[:3]:
        kept.graph(batch_from_frames([frame]))
    assert len(kept) == 2 and kept.misses == 3
    kept.graph(batch_from_frames([frames[2]]))
    kept.graph(batch_from_frames([frames[0]]))
    assert (kept.hits, kept.misses) == (1, 4)


def test_the_trainer_builds_each_training_structure_graph_once(data, tmp_path):  # noqa: F811
    trainer = Trainer(config(data, tmp_path, max_steps=9, batch_size=2), progress=False)
    trainer.run()
    graphs = trainer.student.graph_cache
    assert graphs.misses == 6 and graphs.hits == 9 * 2 - 6  # 6 DFT frames, 3 epochs of 3 batches
