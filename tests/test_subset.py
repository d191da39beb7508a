"""The study's data regimes on real LMDBs: a share of the systems (by sid), disjoint from held-out systems, and a
synthetic frame count; both the same for a seed."""

from __future__ import annotations

import dataclasses

from kdaug.data.lmdb import FrameDataset, LmdbWriter
from kdaug.data.subset import SubsetConfig, keep_frames, keep_systems, run_subset
from tests.conftest import emt_frames


def _write(path, frames) -> str:
    with LmdbWriter(path) as writer:
        writer.write_batch(frames)
    return str(path)


def test_dft_fraction_keeps_that_share_of_the_systems_with_all_their_frames_and_none_held_out(tmp_path):
    frames = emt_frames(20)  # sids 100..119, one frame each; two frames per system below
    frames = [*frames, *(dataclasses.replace(f, fid=f.fid + 10) for f in frames)]
    train = _write(tmp_path / "train", frames)
    held_out = tuple((train, sid) for sid in (100, 101, 102, 103))  # validation systems of this same set
    config = SubsetConfig(inputs=(train,), out=str(tmp_path / "quarter"), system_fraction=0.25,
                          held_out=held_out, seed=3)
    counts = run_subset(config)
    kept = list(FrameDataset(tmp_path / "quarter").iter_frames())
    sids = {f.sid for f in kept}
    assert counts == {"systems": 4, "frames": 8, "system_frames": 8} and len(sids) == 4  # 25 % of 16 systems
    assert not sids & {100, 101, 102, 103}
    assert all(sum(f.sid == sid for f in kept) == 2 for sid in sids)  # every frame of a kept system
    again = dataclasses.replace(config, out=str(tmp_path / "again"))
    run_subset(again)
    assert [f.sid for f in FrameDataset(tmp_path / "again").iter_frames()] == [f.sid for f in kept]
    other = keep_systems([(train, f.sid) for f in frames], 0.25, seed=4, held_out=held_out)
    assert len(other) == 4 and {sid for _, sid in other} != sids  # another seed, another split


def test_synthetic_scale_gives_the_frame_count_or_every_frame_when_fewer(tmp_path):
    synthetic = _write(tmp_path / "synthetic", emt_frames(10, origin="synthetic"))
    counts = run_subset(SubsetConfig(inputs=(synthetic,), out=str(tmp_path / "x"), frames=6, seed=0))
    assert counts["frames"] == 6 and len(FrameDataset(tmp_path / "x")) == 6
    assert run_subset(SubsetConfig(inputs=(synthetic,), out=str(tmp_path / "all"), frames=40))["frames"] == 10
    assert keep_frames(10, 6, seed=0) == keep_frames(10, 6, seed=0) != keep_frames(10, 6, seed=1)
    assert len(set(keep_frames(10, 6, seed=0))) == 6
