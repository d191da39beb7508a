"""Mixed-ratio epochs (visit counts, determinism, DDP split) and the r_s/dft batch weights."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from kdaug.errors import KdaugError
from kdaug.train.mixing import MixedBatchSampler, batch_weights


def visits(sampler: MixedBatchSampler, epoch: int = 0) -> np.ndarray:
    """(n_dft + n_synthetic,) how often each sample is drawn in `epoch` on this rank."""
    drawn = [index for batch in sampler.epoch_batches(epoch) for index in batch]
    return np.bincount(drawn, minlength=sampler.n_dft + sampler.n_synthetic)


@pytest.mark.parametrize(
    ("n_dft", "n_synthetic", "alpha"),
    [(2000, 1000, 0.5), (2000, 1000, 0.0), (2000, 1000, 1.0), (300, 1000, 0.1), (7, 3, 0.8), (1000, 10, 0.25)],
)
def test_visit_counts_follow_the_formula(n_dft, n_synthetic, alpha):
    sampler = MixedBatchSampler(n_dft, n_synthetic, 32, mix_ratio=alpha, seed=3)
    counts = visits(sampler)
    size = n_dft + n_synthetic
    synthetic_draws = round(alpha * size)
    dft, synthetic = counts[:n_dft], counts[n_dft:]
    assert counts.sum() == size
    assert synthetic.sum() == synthetic_draws
    assert dft.sum() == size - synthetic_draws
    for group, draws in ((dft, size - synthetic_draws), (synthetic, synthetic_draws)):
        passes, rest = divmod(draws, len(group))
        # whole passes visit everything once each; the partial pass visits `rest` distinct samples once more
        assert Counter(group.tolist()) == Counter({passes + 1: rest, passes: len(group) - rest} if rest
                                                  else {passes: len(group)})
    assert len(sampler) == len(sampler.epoch_batches(0)) == -(-size // 32)


def test_paper_example_two_to_one_at_alpha_half():
    counts = visits(MixedBatchSampler(2000, 1000, 64, mix_ratio=0.5, seed=0))
    assert set(counts[2000:].tolist()) == {1, 2} and counts[2000:].sum() == 1500
    assert set(counts[:2000].tolist()) == {0, 1} and counts[:2000].sum() == 1500


def test_no_mix_ratio_is_each_sample_once_in_shuffled_order():
    sampler = MixedBatchSampler(20, 10, 4, mix_ratio=None, seed=1)
    order = [index for batch in sampler.epoch_batches(0) for index in batch]
    assert sorted(order) == list(range(30))
    assert order != list(range(30))
    assert [len(batch) for batch in sampler.epoch_batches(0)] == [4] * 7 + [2]


def test_reshuffled_each_epoch_and_deterministic_for_a_seed():
    def order(seed, epoch):
        sampler = MixedBatchSampler(50, 30, 8, mix_ratio=0.5, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(5, 0) == order(5, 0)
    assert order(5, 1) == order(5, 1)
    assert order(5, 0) != order(5, 1)
    assert order(5, 0) != order(6, 0)
    # a new epoch redraws which DFT samples are visited, not only their order
    assert {i for b in order(5, 0) for i in b} != {i for b in order(5, 1) for i in b}


@pytest.mark.parametrize(("n_dft", "n_synthetic", "alpha", "batch_size"),
                         [(2000, 1000, 0.5, 32), (40, 21, 0.3, 4), (9, 0, None, 2), (4, 5, 1.0, 3)])
def test_two_ranks_split_the_single_process_epoch(n_dft, n_synthetic, alpha, batch_size):
    def sampler(rank, world_size):
        return MixedBatchSampler(n_dft, n_synthetic, batch_size, mix_ratio=alpha, seed=11, rank=rank,
                                 world_size=world_size)

    single = Counter(i for batch in sampler(0, 1).epoch_batches(4) for i in batch)
    ranks = [sampler(rank, 2).epoch_batches(4) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(sampler(0, 2))
    per_rank = [Counter(i for batch in batches for i in batch) for batches in ranks]
    assert sum(per_rank[0].values()) == sum(per_rank[1].values())
    union = per_rank[0] + per_rank[1]
    size = n_dft + n_synthetic
    if size % 2 == 0:
        assert union == single
        # disjoint multiset halves: no draw is given to both ranks
        positions = [i for batch in sampler(0, 1).epoch_batches(4) for i in batch]
        assert [i for b in ranks[0] for i in b] == positions[0::2]
        assert [i for b in ranks[1] for i in b] == positions[1::2]
    else:
        # odd epoch: rank 1 repeats the first sample of the order, everything else as single-process
        first = sampler(0, 1).epoch_batches(4)[0][0]
        assert union - single == Counter({first: 1}) and single - union == Counter()


def test_bad_mix_ratio_and_batch_size_name_the_flag():
    with pytest.raises(KdaugError, match=r"^--mix-ratio 1.5: .*\[0, 1\]"):
        MixedBatchSampler(10, 10, 2, mix_ratio=1.5, seed=0)
    with pytest.raises(KdaugError, match=r"^--mix-ratio -0.1: "):
        MixedBatchSampler(10, 10, 2, mix_ratio=-0.1, seed=0)
    with pytest.raises(KdaugError, match=r"^--mix-ratio 0.5: .*no --synthetic data"):
        MixedBatchSampler(10, 0, 2, mix_ratio=0.5, seed=0)
    with pytest.raises(KdaugError, match=r"^--batch-size 0: "):
        MixedBatchSampler(10, 10, 0, mix_ratio=None, seed=0)
    MixedBatchSampler(10, 0, 2, mix_ratio=0.0, seed=0)  # no synthetic data is fine at alpha 0


@pytest.mark.parametrize("share", [0.25, 0.5, 0.75, 1 / 3])
@pytest.mark.parametrize("rs_dft", [0.1, 0.5, 1.0, 2.0, 7.0])
def test_batch_weights_keep_the_mean_and_the_ratio(share, rs_dft):
    n_systems = 12
    synthetic = torch.zeros(n_systems, dtype=torch.bool)
    synthetic[torch.randperm(n_systems, generator=torch.Generator().manual_seed(0))[: round(share * n_systems)]] = True
    weights = batch_weights(synthetic, rs_dft)
    w_s, w_dft = weights[synthetic], weights[~synthetic]
    assert torch.all(w_s == w_s[0]) and torch.all(w_dft == w_dft[0])
    a = synthetic.double().mean().item()
    assert w_s[0].item() * a + w_dft[0].item() * (1 - a) == pytest.approx(1.0, rel=1e-6)
    assert w_s[0].item() / w_dft[0].item() == pytest.approx(rs_dft, rel=1e-6)
    assert w_dft[0].item() == pytest.approx(1 / (1 - a + a * rs_dft), rel=1e-6)


def test_batch_weights_are_one_for_pure_batches_and_without_rs_dft():
    for synthetic in (torch.zeros(5, dtype=torch.bool), torch.ones(5, dtype=torch.bool)):
        assert torch.equal(batch_weights(synthetic, 3.0), torch.ones(5))
    assert torch.equal(batch_weights(torch.tensor([True, False, False]), None), torch.ones(3))
    with pytest.raises(KdaugError, match=r"^--rs-dft 0.0: expected a positive"):
        batch_weights(torch.tensor([True, False]), 0.0)
    with pytest.raises(KdaugError, match=r"^--rs-dft -1: "):
        batch_weights(torch.tensor([True, False]), -1)
