"""metadata.npz beside kdaug's LMDBs: fairchem's trainer finds natoms for load balancing, as it reads them."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from fairchem.core.common.data_parallel import BalancedBatchSampler, UnsupportedDatasetError
from fairchem.core.datasets.base_dataset import create_dataset

from kdaug.data.convert import atoms_to_frame
from kdaug.data.lmdb import LmdbWriter
from kdaug.data.metadata import METADATA_NAME, natoms_path
from kdaug.types import Provenance
from tests.conftest import emt_slab


def sized_frames(n: int, start: int = 0):
    """Frames of 10 to 13 atoms (EMT slabs with 0-3 bottom atoms removed)."""
    frames = []
    for i in range(start, start + n):
        atoms = emt_slab(["Cu", "Pt", "Au"][i % 3], ["O", "H", "C"][i % 3], seed=i)
        del atoms[list(range(i % 4))]
        frames.append(atoms_to_frame(atoms, sid=i, fid=0, provenance=Provenance(origin="dft")))
    return frames


def fairchem_train_dataset(path):
    """The training set as fairchem's BaseTrainer.load_datasets makes it (a shuffled Subset), and the natoms it
    balances by, put back in the order of the entries."""
    dataset = create_dataset({"format": "lmdb", "src": str(path)}, "train")
    assert dataset.metadata_hasattr("natoms")
    natoms = np.asarray(dataset.get_metadata("natoms", list(range(len(dataset))))).reshape(-1)  # as its sampler
    np.testing.assert_array_equal(natoms, [int(dataset[i].natoms) for i in range(len(dataset))])
    return dataset, natoms[np.argsort(dataset.indices)]


def test_fairchem_trainer_balances_by_our_natoms_without_a_warning(tmp_path, caplog):
    frames = sized_frames(7)
    with LmdbWriter(tmp_path, frames_per_file=2) as writer:
        for k in range(0, 7, 2):
            writer.write_batch(frames[k:k + 2])
    assert len(list(tmp_path.glob("*.lmdb"))) == 4
    with caplog.at_level(logging.WARNING):
        dataset, natoms = fairchem_train_dataset(tmp_path)
        sampler = BalancedBatchSampler(dataset, batch_size=2, num_replicas=2, rank=0, seed=0, on_error="raise")
        batches = list(sampler)
    assert natoms.tolist() == [f.n_atoms for f in frames] and len(set(natoms)) == 4
    assert sum(len(b) for b in batches) == 4  # rank 0's half of 7 (padded to 8)
    assert not [r for r in caplog.records if "metadata" in r.getMessage()]


def test_without_metadata_fairchem_cannot_balance(tmp_path):
    with LmdbWriter(tmp_path) as writer:
        writer.write_batch(sized_frames(3))
    (tmp_path / METADATA_NAME).unlink()
    dataset = create_dataset({"format": "lmdb", "src": str(tmp_path)}, "train")
    with pytest.raises(UnsupportedDatasetError):
        BalancedBatchSampler(dataset, batch_size=2, num_replicas=2, rank=0, seed=0, on_error="raise")


def test_shards_of_one_directory_the_last_writer_to_close_writes_it(tmp_path):
    frames = sized_frames(6)
    first, second = LmdbWriter(tmp_path, stem="b"), LmdbWriter(tmp_path, stem="a")
    first.write_batch(frames[:4])
    second.write_batch(frames[4:])
    first.close()
    assert not (tmp_path / METADATA_NAME).exists()  # shard "a" is still being written
    second.close()
    _, natoms = fairchem_train_dataset(tmp_path)  # files a.0000, b.0000: a's frames first
    assert natoms.tolist() == [f.n_atoms for f in frames[4:] + frames[:4]]


def test_removed_while_writing_and_rebuilt_after_a_lost_record(tmp_path):
    frames = sized_frames(9)
    with LmdbWriter(tmp_path, frames_per_file=4) as writer:
        writer.write_batch(frames[:3])
        writer.write_batch(frames[3:6])
    record = natoms_path(tmp_path, "data")
    record.write_bytes(record.read_bytes()[:8])  # killed between commits and appends: 2 of 6 recorded
    writer = LmdbWriter(tmp_path, frames_per_file=4)
    assert not (tmp_path / METADATA_NAME).exists()
    writer.write_batch(frames[6:])
    writer.close()
    natoms = fairchem_train_dataset(tmp_path)[1]  # its LMDB environments closed with it
    assert natoms.tolist() == [f.n_atoms for f in frames]
    record.unlink()  # an output written before the record existed
    LmdbWriter(tmp_path, frames_per_file=4).close()
    assert fairchem_train_dataset(tmp_path)[1].tolist() == natoms.tolist()


def test_written_after_a_failed_batch_and_left_alone_beside_foreign_lmdbs(tmp_path):
    frames = sized_frames(3)
    with pytest.raises(RuntimeError), LmdbWriter(tmp_path) as writer:
        writer.write_batch(frames)
        raise RuntimeError("teacher crashed")
    assert fairchem_train_dataset(tmp_path)[1].tolist() == [f.n_atoms for f in frames]
    (tmp_path / "theirs.lmdb").write_bytes((tmp_path / "data.0000.lmdb").read_bytes())
    (tmp_path / METADATA_NAME).write_bytes(b"theirs")
    with LmdbWriter(tmp_path) as writer:
        writer.write_batch(sized_frames(1, start=3))
    assert (tmp_path / METADATA_NAME).read_bytes() == b"theirs"
