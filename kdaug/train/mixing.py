"""Mixed DFT/synthetic epochs and the r_s/dft batch weights (paper App. D.2, eq. 9-11).

An epoch keeps the size |DFT| + |synthetic|. With mix ratio alpha it holds round(alpha * size)
synthetic draws and the rest DFT draws; each group is drawn as concatenated random permutations
of its samples (without replacement within a pass), so with 2M DFT + 1M synthetic and alpha 0.5
the synthetic set is visited 1.5 times and the DFT set 0.75 times. The draws are shuffled together.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from kdaug.errors import KdaugError


def _draws(rng: np.random.Generator, n_samples: int, n_draws: int) -> np.ndarray:
    """n_draws indices in [0, n_samples): whole random permutations, then part of one more."""
    if n_draws == 0:
        return np.zeros(0, dtype=np.int64)
    n_passes = math.ceil(n_draws / n_samples)
    return np.concatenate([rng.permutation(n_samples) for _ in range(n_passes)])[:n_draws]


def check_mix_ratio(mix_ratio: float | None, n_dft: int, n_synthetic: int) -> None:
    """Raise a one-line KdaugError naming --mix-ratio unless it is None or in [0, 1] and the data allows it."""
    if mix_ratio is None:
        return
    if not 0.0 <= mix_ratio <= 1.0:
        msg = f"--mix-ratio {mix_ratio}: expected the share of synthetic samples per epoch, in [0, 1]"
        raise KdaugError(msg)
    if mix_ratio > 0 and n_synthetic == 0:
        msg = f"--mix-ratio {mix_ratio}: asks for synthetic samples but no --synthetic data was given"
        raise KdaugError(msg)
    if mix_ratio < 1 and n_dft == 0:
        msg = f"--mix-ratio {mix_ratio}: asks for DFT samples but the --train data is empty"
        raise KdaugError(msg)


class MixedBatchSampler(torch.utils.data.Sampler):
    """Batches of `TrainingSet` indices (DFT 0..n_dft-1, synthetic n_dft..) for one rank.

    Usable as a DataLoader `batch_sampler`; call `set_epoch(epoch)` before each epoch.
    Under DDP every rank builds the same epoch order and takes every world_size-th sample
    from position `rank` on (as torch's DistributedSampler); when the epoch size is not a
    multiple of world_size, the first samples of the order are repeated to fill up, so all
    ranks get the same number of samples and batches, and global step k uses positions
    k*B*W .. (k+1)*B*W-1 of the order. The last batch of an epoch may be smaller than B.

    Args:
        n_dft, n_synthetic: sizes of the two groups.
        batch_size: samples per batch on each rank (B).
        mix_ratio: share of synthetic draws per epoch in [0, 1]; None: each sample once.
        seed: the epoch order is a function of (seed, epoch) only.
        rank, world_size: this process's DDP rank and the number of ranks (W).

    Raises:
        KdaugError: bad --mix-ratio or --batch-size, or no samples at all.
    """

    def __init__(
        self,
        n_dft: int,
        n_synthetic: int,
        batch_size: int,
        *,
        mix_ratio: float | None,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        check_mix_ratio(mix_ratio, n_dft, n_synthetic)
        if batch_size < 1:
            msg = f"--batch-size {batch_size}: expected a positive number of samples"
            raise KdaugError(msg)
        if n_dft + n_synthetic == 0:
            msg = "--train: no samples to train on"
            raise KdaugError(msg)
        if not 0 <= rank < world_size:
            msg = f"rank {rank} is not in [0, world_size={world_size})"
            raise ValueError(msg)
        self.n_dft = n_dft
        self.n_synthetic = n_synthetic
        self.batch_size = batch_size
        self.mix_ratio = mix_ratio
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    @property
    def epoch_size(self) -> int:
        """Samples per epoch over all ranks (before filling up to a multiple of world_size)."""
        return self.n_dft + self.n_synthetic

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(epoch_size,) sample indices of `epoch` over all ranks, in order."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.mix_ratio is None:
            return rng.permutation(self.epoch_size)
        n_synthetic_draws = round(self.mix_ratio * self.epoch_size)
        dft = _draws(rng, self.n_dft, self.epoch_size - n_synthetic_draws)
        synthetic = self.n_dft + _draws(rng, self.n_synthetic, n_synthetic_draws)
        return rng.permutation(np.concatenate([dft, synthetic]))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`, in order (deterministic for (seed, epoch))."""
        order = self.epoch_order(epoch)
        per_rank = math.ceil(len(order) / self.world_size)
        order = np.resize(order, per_rank * self.world_size)  # repeats from the start to fill up
        mine = order[self.rank :: self.world_size].tolist()
        return [mine[start : start + self.batch_size] for start in range(0, len(mine), self.batch_size)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.epoch_size / self.world_size) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.epoch_batches(self.epoch))


def check_rs_dft(rs_dft: float | None) -> None:
    """Raise a one-line KdaugError naming --rs-dft unless it is None or > 0."""
    if rs_dft is not None and not rs_dft > 0:
        msg = f"--rs-dft {rs_dft}: expected a positive ratio of synthetic to DFT sample weight"
        raise KdaugError(msg)


def batch_weights(synthetic: torch.Tensor, rs_dft: float | None) -> torch.Tensor:
    """(S,) per-system loss weights of eq. 9-11.

    With a = synthetic share of the batch and r = rs_dft = w_s / w_dft:
    w_dft = 1 / (1 - a + a r), w_s = r w_dft, so a w_s + (1 - a) w_dft = 1 (the mean weight is 1).
    All weights are 1 when rs_dft is None or the batch is all DFT or all synthetic.

    Args:
        synthetic: (S,) bool, True for synthetic systems.
        rs_dft: r > 0, or None for no reweighting.

    Raises:
        KdaugError: rs_dft <= 0 (names --rs-dft).
    """
    check_rs_dft(rs_dft)
    weights = torch.ones(synthetic.shape, device=synthetic.device)
    share = synthetic.sum().item() / synthetic.numel() if synthetic.numel() else 0.0
    if rs_dft is None or share in (0.0, 1.0):
        return weights
    w_dft = 1.0 / (1.0 - share + share * rs_dft)
    return torch.where(synthetic, rs_dft * w_dft * weights, w_dft * weights)
