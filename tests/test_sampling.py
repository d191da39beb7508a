"""The per-Miller sampler builds exactly the slabs fairchem-data-oc's enumerate-everything path builds."""

from __future__ import annotations

import numpy as np
import pytest

from kdaug.sampling.oc import SamplerConfig, SystemSampler

# Embedded bulks with small cells (AlNi B2: two elements; Ni fcc): enumerating them takes seconds.
BULKS = ["kdaug-B2-AlNi", "kdaug-dcdft-Ni"]


def slab_key(slab):
    return slab.millers, slab.shift, slab.top


@pytest.mark.parametrize("src_id", BULKS)
def test_per_miller_slabs_equal_the_full_enumeration(src_id):
    from fairchem.data.oc.core import Bulk

    sampler = SystemSampler(SamplerConfig(max_miller=1))
    sampler.bulks = [entry for entry in sampler.bulks if entry["src_id"] == src_id]
    index = 0
    reference = Bulk(bulk_atoms=sampler.bulks[index]["atoms"]).get_slabs(max_miller=1)
    ours = [sampler.slab(index, miller, k) for miller in sampler.millers(index)
            for k in range(sampler.n_slabs(index, miller))]
    assert [slab_key(s) for s in ours] == [slab_key(s) for s in reference]
    for mine, theirs in zip(ours, reference):
        np.testing.assert_array_equal(mine.atoms.numbers, theirs.atoms.numbers)
        np.testing.assert_array_equal(mine.atoms.get_tags(), theirs.atoms.get_tags())
        np.testing.assert_allclose(mine.atoms.positions, theirs.atoms.positions, atol=1e-10)
        np.testing.assert_allclose(mine.atoms.cell[:], theirs.atoms.cell[:], atol=1e-10)
        np.testing.assert_array_equal(mine.atoms.constraints[0].index, theirs.atoms.constraints[0].index)
    # A sampled system's slab is one of the enumerated slabs of a Miller index that has slabs.
    with_slabs = {s.millers for s in reference}
    for sid in range(3):
        details = sampler.sample(sid).details
        assert tuple(details["miller"]) in with_slabs
        assert (tuple(details["miller"]), details["shift"], details["top"]) in {slab_key(s) for s in reference}


def test_miller_index_is_uniform_over_those_with_slabs(monkeypatch):
    sampler = SystemSampler(SamplerConfig(max_miller=2, seed=1))
    sampler.bulks = sampler.bulks[:1]
    millers = [(1, 0, 0), (1, 1, 0), (1, 1, 1)]
    monkeypatch.setattr(sampler, "millers", lambda index: millers)
    monkeypatch.setattr(sampler, "n_slabs", lambda index, miller: 0 if miller == (1, 1, 0) else 2)
    drawn = []

    def record(index, miller, k):
        drawn.append(miller)
        raise StopIteration  # stop before placing an adsorbate

    monkeypatch.setattr(sampler, "slab", record)
    for sid in range(400):
        with pytest.raises(StopIteration):
            sampler.sample(sid)
    counts = {m: drawn.count(m) for m in millers}
    assert counts[(1, 1, 0)] == 0
    assert 160 < counts[(1, 0, 0)] < 240 and counts[(1, 0, 0)] + counts[(1, 1, 1)] == 400
