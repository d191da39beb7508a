"""The storage contract: our LMDBs are fairchem's, and fairchem-style LMDBs are ours."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap

import lmdb
import numpy as np
import pytest
import torch
from fairchem.core.datasets import LmdbDataset
from fairchem.core.preprocessing import AtomsToGraphs

from kdaug.data.convert import data_to_frame
from kdaug.data.lmdb import FrameDataset, LmdbWriter, collate_frames
from kdaug.types import Provenance
from tests.conftest import emt_slab


def assert_frames_close(a, b):
    np.testing.assert_allclose(a.positions, b.positions, atol=1e-5)
    np.testing.assert_array_equal(a.atomic_numbers, b.atomic_numbers)
    np.testing.assert_array_equal(a.tags, b.tags)
    np.testing.assert_array_equal(a.fixed, b.fixed)
    np.testing.assert_allclose(a.forces, b.forces, atol=1e-5)
    assert a.energy == pytest.approx(b.energy)
    assert (a.sid, a.fid) == (b.sid, b.fid)
    assert a.provenance == b.provenance


def test_writer_output_reads_identically_with_fairchem(tmp_path, frames):
    derived = frames[1].replace(provenance=Provenance("rattled", "emt", None, (frames[1].sid, 0), {"sigma": 0.05}))
    with LmdbWriter(tmp_path, frames_per_file=4) as writer:
        writer.write_batch(frames[:2])
        writer.write_batch(frames[2:4])  # file full: the next batch opens data.0001
        writer.write_batch([*frames[4:], derived])
    assert sorted(p.name for p in tmp_path.glob("*.lmdb")) == ["data.0000.lmdb", "data.0001.lmdb"]
    ours = FrameDataset(tmp_path)
    ours_items = [ours[i] for i in range(len(ours))]
    ours.close()
    theirs = LmdbDataset({"src": str(tmp_path)})
    assert len(theirs) == len(ours_items) == 7
    for mine, their in zip(ours_items, (theirs[i] for i in range(len(theirs)))):
        for key in mine.keys():
            if isinstance(mine[key], torch.Tensor):
                assert torch.equal(mine[key], their[key]), key
            else:
                assert mine[key] == their[key], key
    del theirs
    for original, stored in zip([*frames, derived], FrameDataset(tmp_path).iter_frames()):
        assert_frames_close(original, stored)


@pytest.mark.parametrize("with_length", [True, False])
def test_reads_lmdb_written_the_fairchem_tutorial_way(tmp_path, with_length):
    a2g = AtomsToGraphs(r_energy=True, r_forces=True, r_fixed=True, r_edges=False)
    images = [emt_slab(seed=i) for i in range(3)]
    path = tmp_path / "tutorial.lmdb"
    env = lmdb.open(str(path), map_size=1 << 30, subdir=False, meminit=False, map_async=True)
    for fid, atoms in enumerate(images):
        data = a2g.convert(atoms)
        data.sid, data.fid = torch.LongTensor([0]), torch.LongTensor([fid])
        with env.begin(write=True) as txn:
            txn.put(f"{fid}".encode("ascii"), pickle.dumps(data, protocol=-1))
    if with_length:
        with env.begin(write=True) as txn:
            txn.put(b"length", pickle.dumps(len(images), protocol=-1))
    env.close()
    dataset = FrameDataset(path)
    assert len(dataset) == 3
    for fid, atoms in enumerate(images):
        frame = dataset.frame(fid)
        assert (frame.sid, frame.fid) == (0, fid)
        assert frame.provenance.origin == "dft"
        assert frame.energy == pytest.approx(atoms.get_potential_energy())
        np.testing.assert_allclose(frame.forces, atoms.get_forces(apply_constraint=False), atol=1e-5)
        np.testing.assert_array_equal(frame.fixed, atoms.get_tags() == 0)


def test_real_oc20_frame_round_trip(tmp_path, oc20_atoms):
    from kdaug.data.convert import atoms_to_frame

    frame = atoms_to_frame(oc20_atoms, sid=7, fid=3)
    with LmdbWriter(tmp_path) as writer:
        writer.write_batch([frame])
    stored = FrameDataset(tmp_path).frame(0)
    assert stored.energy == pytest.approx(-135.66393572)
    assert stored.fixed.sum() == 24
    assert_frames_close(frame, stored)


def test_map_grows_instead_of_failing(tmp_path, frames):
    with LmdbWriter(tmp_path, map_size=1 << 14) as writer:
        for _ in range(20):
            writer.write_batch(frames)
    assert len(FrameDataset(tmp_path)) == 120


def test_resume_appends_and_remembers_done_units(tmp_path, frames):
    with LmdbWriter(tmp_path) as writer:
        writer.write_batch(frames[:2], done=["sys-1"], counters={"dropped:desorbed": 1})
    with LmdbWriter(tmp_path) as writer:
        assert writer.done_keys() == {"sys-1"}
        writer.write_batch(frames[2:], done=["sys-2"], counters={"dropped:desorbed": 2})
        assert writer.done_keys() == {"sys-1", "sys-2"}
    dataset = FrameDataset(tmp_path)
    assert [dataset.frame(i).sid for i in range(len(dataset))] == [f.sid for f in frames]
    import json

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["n_frames"] == 6
    assert manifest["origins"] == {"dft": 6}
    assert manifest["counters"] == {"dropped:desorbed": 3}
    assert manifest["elements"]["29"] == 2 * 12
    assert manifest["versions"]["fairchem-core"].startswith("1.10")


def test_dataloader_with_workers(tmp_path, frames):
    with LmdbWriter(tmp_path) as writer:
        writer.write_batch(frames)
    loader = torch.utils.data.DataLoader(FrameDataset(tmp_path), batch_size=4, num_workers=2,
                                         collate_fn=collate_frames)
    batches = list(loader)
    assert [b.num_graphs for b in batches] == [4, 2]
    assert batches[0].force.shape == (4 * 13, 3)
    assert batches[0].origin == ["dft"] * 4


CRASHER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from tests.conftest import emt_frames
    from kdaug.data.lmdb import LmdbWriter
    writer = LmdbWriter({out!r})
    frames = emt_frames(4)
    for batch in range(3):
        writer.write_batch(frames, done=[f"batch-{{batch}}"])
    os.kill(os.getpid(), signal.SIGKILL)  # dies with the environment still open
    """
)


def test_killed_writer_leaves_every_committed_batch(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = CRASHER.format(root=root, out=str(tmp_path / "out"))
    result = subprocess.run([sys.executable, "-c", script], check=False)
    assert result.returncode == -signal.SIGKILL
    dataset = FrameDataset(tmp_path / "out")
    assert len(dataset) == 12
    assert [data_to_frame(dataset[i]).sid for i in range(12)] == [100, 101, 102, 103] * 3
    dataset.close()
    with LmdbWriter(tmp_path / "out") as writer:
        assert writer.done_keys() == {"batch-0", "batch-1", "batch-2"}


def test_stored_layout_matches_atoms_to_graphs(frames):
    from kdaug.data.convert import frame_to_atoms, frame_to_data

    ours = frame_to_data(frames[0])
    a2g = AtomsToGraphs(r_energy=True, r_forces=True, r_fixed=True, r_edges=False).convert(
        frame_to_atoms(frames[0]), sid=frames[0].sid)
    for key in a2g.keys():
        mine = ours[{"energy": "y", "forces": "force"}.get(key, key)]
        if isinstance(a2g[key], torch.Tensor):
            assert mine.dtype == a2g[key].dtype and mine.shape == a2g[key].shape, key
        else:
            assert type(mine) is type(a2g[key]), key


def test_fingerprint_names_the_data_not_the_directory(tmp_path, frames):
    for name, subset in (("a", frames), ("b", frames), ("c", frames[:-1])):
        with LmdbWriter(tmp_path / name) as writer:
            writer.write_batch(subset)
    prints = {name: FrameDataset(tmp_path / name).fingerprint() for name in "abc"}
    assert prints["a"] == prints["b"]
    assert prints["a"] != prints["c"]


def test_two_readers_of_one_file_in_one_process_share_it(tmp_path, frames):
    with LmdbWriter(tmp_path / "a") as writer:
        writer.write_batch(frames)
    first, second = FrameDataset(tmp_path / "a"), FrameDataset(tmp_path / "a")
    assert first.frame(1).sid == second.frame(1).sid
    first.close()
    assert second.frame(2).sid == frames[2].sid
    second.close()
    assert FrameDataset(tmp_path / "a").frame(0).sid == frames[0].sid


def test_fingerprint_sees_a_changed_middle_frame(tmp_path, frames):
    assert len(frames) >= 3
    changed = list(frames)
    middle = changed[1]
    changed[1] = middle.replace(energy=middle.energy + 0.5)
    for name, subset in (("a", frames), ("b", changed)):
        with LmdbWriter(tmp_path / name) as writer:
            writer.write_batch(subset)
    first, second = FrameDataset(tmp_path / "a"), FrameDataset(tmp_path / "b")
    assert first.frame(0).energy == second.frame(0).energy and first.frame(-1).energy == second.frame(-1).energy
    assert first.fingerprint() != second.fingerprint()
