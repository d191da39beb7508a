"""TrainingSet over kdaug and fairchem-tutorial LMDBs, and its collate function with the mixed sampler."""

from __future__ import annotations

import pickle

import lmdb
import numpy as np
import pytest
import torch
from fairchem.core.preprocessing import AtomsToGraphs

from kdaug.data.lmdb import FrameDataset, LmdbWriter
from kdaug.data.training_set import TrainingSet, collate
from kdaug.errors import KdaugError
from kdaug.train.mixing import MixedBatchSampler
from kdaug.types import Provenance
from tests.conftest import emt_frames, emt_slab


def write(path, frames):
    with LmdbWriter(path) as writer:
        writer.write_batch(frames)
    return path


def write_tutorial_lmdb(path, n):
    """An LMDB as fairchem's tutorial writes it: AtomsToGraphs Data, no provenance, no y/force names."""
    a2g = AtomsToGraphs(r_energy=True, r_forces=True, r_fixed=True, r_edges=False)
    images = [emt_slab("Pt", "O", seed=10 + i) for i in range(n)]
    env = lmdb.open(str(path), map_size=1 << 26, subdir=False, meminit=False)
    with env.begin(write=True) as txn:
        for fid, atoms in enumerate(images):
            data = a2g.convert(atoms)
            data.sid, data.fid = torch.LongTensor([0]), torch.LongTensor([fid])
            txn.put(f"{fid}".encode("ascii"), pickle.dumps(data, protocol=-1))
    env.close()
    return path, images


@pytest.fixture
def sources(tmp_path):
    dft = emt_frames(3)
    rattled = [f.replace(provenance=Provenance("rattled", "emt", parent=(f.sid, f.fid))) for f in emt_frames(2)]
    tutorial_path, tutorial_images = write_tutorial_lmdb(tmp_path / "tutorial.lmdb", 2)
    return {
        "dft": (write(tmp_path / "dft", dft), dft),
        "rattled": (write(tmp_path / "rattled", rattled), rattled),
        "tutorial": (tutorial_path, tutorial_images),
    }


def test_samples_carry_group_origin_and_keys(sources):
    dft_path, dft = sources["dft"]
    rattled_path, rattled = sources["rattled"]
    tutorial_path, images = sources["tutorial"]
    # the tutorial LMDB (no provenance) given as synthetic: its group comes from the flag
    dataset = TrainingSet([dft_path], [rattled_path, tutorial_path])
    assert (dataset.n_dft, dataset.n_synthetic, len(dataset)) == (3, 4, 7)
    expected = [
        *[(f, False, "dft", 0, i) for i, f in enumerate(dft)],
        *[(f, True, "rattled", 1, i) for i, f in enumerate(rattled)],
        *[(a, True, "dft", 2, i) for i, a in enumerate(images)],
    ]
    for index, (source, synthetic, origin, dataset_idx, local_idx) in enumerate(expected):
        sample = dataset[index]
        assert set(sample.keys()) == {"pos", "atomic_numbers", "cell", "natoms", "tags", "fixed", "y", "force",
                                      "synthetic", "origin", "dataset_idx", "local_idx"}
        assert (sample.synthetic, sample.origin, sample.dataset_idx, sample.local_idx) == (
            synthetic, origin, dataset_idx, local_idx)
        assert sample.pos.dtype == sample.cell.dtype == sample.force.dtype == torch.float32
        assert sample.atomic_numbers.dtype == sample.tags.dtype == torch.long
        assert sample.fixed.dtype == torch.bool and sample.cell.shape == (1, 3, 3)
        assert sample.natoms == 13 and isinstance(sample.y, float)
        if hasattr(source, "provenance"):  # a Frame
            positions, forces, energy, fixed, tags = (source.positions, source.forces, source.energy,
                                                      source.fixed, source.tags)
        else:  # ase.Atoms
            positions, forces = source.get_positions(wrap=True), source.get_forces(apply_constraint=False)  # a2g wraps
            energy, tags = source.get_potential_energy(), source.get_tags()
            fixed = tags == 0
        np.testing.assert_allclose(sample.pos.numpy(), positions, atol=1e-5)
        np.testing.assert_allclose(sample.force.numpy(), forces, atol=1e-5)
        assert sample.y == pytest.approx(energy)
        np.testing.assert_array_equal(sample.fixed.numpy(), fixed)
        np.testing.assert_array_equal(sample.tags.numpy(), tags)
    fingerprints = dataset.fingerprints()
    dataset.close()  # py-lmdb allows one open handle per file and process
    assert fingerprints == [FrameDataset(p).fingerprint() for p in (dft_path, rattled_path, tutorial_path)]


def test_collate_with_the_mixed_sampler_in_a_dataloader(sources):
    dataset = TrainingSet([sources["dft"][0], sources["tutorial"][0]], [sources["rattled"][0]])
    sampler = MixedBatchSampler(dataset.n_dft, dataset.n_synthetic, 3, mix_ratio=0.5, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    seen = []
    for batch, indices in zip(loader, sampler.epoch_batches(0)):
        assert batch.num_graphs == len(indices)
        assert batch.synthetic.dtype == torch.bool and batch.synthetic.tolist() == [i >= 5 for i in indices]
        assert batch.dataset_idx.dtype == batch.local_idx.dtype == torch.long
        assert [dataset.locate(i) for i in indices] == list(zip(batch.dataset_idx.tolist(),
                                                                batch.local_idx.tolist()))
        assert batch.origin == [dataset[i].origin for i in indices]
        assert batch.y.shape == (len(indices),) and batch.force.shape == (13 * len(indices), 3)
        assert torch.equal(batch.batch, torch.repeat_interleave(torch.arange(len(indices)), 13))
        seen += indices
    assert sum(i >= 5 for i in seen) == round(0.5 * 7)


def test_missing_and_empty_datasets_name_flag_and_path(tmp_path, sources):
    with pytest.raises(KdaugError, match=rf"^--train {tmp_path / 'nowhere'}: no such file"):
        TrainingSet([tmp_path / "nowhere"])
    LmdbWriter(tmp_path / "empty").close()
    with pytest.raises(KdaugError, match=rf"^--synthetic {tmp_path / 'empty'}: holds no frames"):
        TrainingSet([sources["dft"][0]], [tmp_path / "empty"])
    with pytest.raises(KdaugError, match=rf"^--val {tmp_path / 'empty'}: holds no frames"):
        TrainingSet([tmp_path / "empty"], flags=("--val", "--val"))


def test_a_path_given_twice_shares_one_reader(sources):
    dft_path, dft = sources["dft"]
    dataset = TrainingSet([dft_path], [dft_path])
    assert (dataset.n_dft, dataset.n_synthetic) == (3, 3)
    first, again = dataset[1], dataset[4]
    assert (first.synthetic, again.synthetic, again.dataset_idx, again.local_idx) == (False, True, 1, 1)
    assert torch.equal(first.pos, again.pos) and first.y == again.y == pytest.approx(dft[1].energy)
