"""Online augmentation (paper App. D.1): replace a share of each batch by perturbed, teacher-labelled copies.

The chosen systems' free atoms move, by Gaussian noise (`--online-rattle SIGMA`) or by the
adversarial search against the current student (`--online-adversarial STEPS`,
`adversarial_perturb`); the teacher then labels the whole batch in one forward, whose outputs
replace the labels of the moved systems, which count as synthetic for the r_s/dft weights.
The choice and the noise come from a generator seeded by (seed, step), so a resumed run
perturbs exactly as an uninterrupted one.
"""

from __future__ import annotations

import torch

from kdaug.models.protocol import AtomisticModel
from kdaug.perturb.adversarial import AttackParams, adversarial_perturb
from kdaug.train.config import TrainConfig
from kdaug.train.kd import KDStrategy, TeacherTargets


class OnlineAugmenter:
    """Perturbs a share of each batch in place and returns the teacher targets of the whole batch."""

    def __init__(self, teacher: AtomisticModel, student: AtomisticModel, *, share: float, strategy: KDStrategy,
                 sigma: float | None = None, attack: AttackParams | None = None) -> None:
        self.teacher, self.student = teacher, student
        self.share, self.strategy = share, strategy
        self.sigma, self.attack = sigma, attack

    @classmethod
    def from_config(cls, config: TrainConfig, student, teacher) -> OnlineAugmenter | None:
        if not config.online:
            return None
        attack = AttackParams(steps=config.online_adversarial) if config.online_adversarial else None
        return cls(teacher, student, share=config.online_share, strategy=config.strategy, sigma=config.online_rattle,
                   attack=attack)

    def augment(self, batch, *, step: int, seed: int) -> TeacherTargets:
        """Move round(share * S) systems of `batch` (in place), relabel them; teacher targets of the batch."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        n_systems = len(batch.natoms)
        count = max(1, round(self.share * n_systems))
        chosen = torch.zeros(n_systems, dtype=torch.bool)
        chosen[torch.randperm(n_systems, generator=generator)[:count]] = True
        chosen = chosen.to(batch.pos.device)
        moving = chosen[batch.batch] & ~batch.fixed.bool()
        batch.pos = torch.where(moving[:, None], self._moved_positions(batch, generator), batch.pos)
        targets = self.strategy.teacher_targets(self.teacher, batch)
        atoms = chosen[batch.batch]
        batch.y = torch.where(chosen, targets.energy.to(batch.y.dtype), batch.y)
        batch.force = torch.where(atoms[:, None], targets.forces.to(batch.force.dtype), batch.force)
        batch.synthetic = batch.synthetic | chosen
        return targets

    def _moved_positions(self, batch, generator: torch.Generator) -> torch.Tensor:
        if self.attack is None:
            noise = torch.randn(batch.pos.shape, generator=generator, dtype=batch.pos.dtype)
            return batch.pos + self.sigma * noise.to(batch.pos.device)
        positions, _ = adversarial_perturb(batch, self.student, self.teacher, self.attack, generator=generator)
        return positions.to(batch.pos.dtype)
