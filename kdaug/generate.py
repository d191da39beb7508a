"""`run_generate`: sample systems, relax them with the teacher in batches, keep ~10 % of frames.

Output tree (one writer per shard; `data` when unsharded):

    out/
      data.0000.lmdb ...                 frames (OC20 S2EF layout, origin "synthetic")
      manifest.json                      counts, anomalies dropped by reason, args, versions
      shard0001-of-0004.0000.lmdb ...    with --num-shards 4 --shard-index 1
      manifest.shard0001-of-0004.json

Resume: each finished system (kept frames plus a done-marker) is one
transaction; rerunning the same command skips the systems already done.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from ase import Atoms
from tqdm import tqdm

from kdaug.config import shard_from_environment
from kdaug.data.convert import fixed_mask
from kdaug.data.lmdb import LmdbWriter
from kdaug.errors import KdaugError
from kdaug.models import AtomisticModel, load_teacher
from kdaug.models.fairchem_v1 import sha256_of
from kdaug.relax.optimizers import OPTIMIZERS
from kdaug.relax.runner import BatchedRelaxer, RelaxResult, RelaxTask
from kdaug.sampling.oc import DEFAULT_BULK_DB, PLACEMENT_MODES, SampledSystem, SamplerConfig, SystemSampler, iter_systems
from kdaug.types import Frame, Provenance

logger = logging.getLogger(__name__)

# A trajectory "explodes" when its energy moves this far per atom from the start,
# or a force exceeds this norm; such labels are teacher failures, not data.
EXPLODED_EV_PER_ATOM = 5.0
EXPLODED_FORCE_EV_PER_ANG = 50.0


@dataclass(frozen=True)
class GenerateConfig:
    """Options of `kdaug generate` (units: fmax eV/A)."""

    # Options that shape the data: a resume must keep them (with the teacher and bulk database hashes).
    DATA_KEYS: ClassVar[tuple[str, ...]] = ("seed", "teacher", "frame_fraction", "fmax", "optimizer", "max_steps",
                                            "adsorbate_ids", "placement", "max_miller")

    n_systems: int
    out: str
    teacher: str = "chgnet"
    checkpoint: str | None = None
    device: str = "cpu"
    seed: int = 0
    bulk_db: str | None = None
    adsorbate_ids: tuple[int, ...] | None = None
    placement: str = "random_site_heuristic_placement"
    max_miller: int = 2
    optimizer: str = "lbfgs"
    fmax: float = 0.05
    max_steps: int = 200
    frame_fraction: float = 0.1
    max_systems_per_batch: int | None = None  # None: 1 on CPU (batching does not pay there), 32 on CUDA
    max_atoms_per_batch: int | None = None
    num_workers: int = 2
    num_shards: int | None = None
    shard_index: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.n_systems >= 1, "--n-systems", "at least 1"),
            (0 < self.frame_fraction <= 1, "--frame-fraction", "in (0, 1]"),
            (self.optimizer in OPTIMIZERS, "--optimizer", f"one of {', '.join(OPTIMIZERS)}"),
            (self.placement in PLACEMENT_MODES, "--placement", f"one of {', '.join(PLACEMENT_MODES)}"),
            (self.fmax > 0, "--fmax", "positive"),
            (self.max_steps >= 0, "--max-steps", "non-negative"),
            (self.max_systems_per_batch is None or self.max_systems_per_batch >= 1, "--max-systems-per-batch",
             "at least 1"),
            (self.num_workers >= 0, "--num-workers", "non-negative"),
        ]
        for ok, flag, expected in checks:
            if not ok:
                msg = f"{flag} {getattr(self, flag[2:].replace('-', '_'))}: expected {expected}"
                raise KdaugError(msg)


@dataclass(frozen=True)
class FrameSelector:
    """Keeps evaluation `step` of system `sid` with probability `fraction`, the same for a given seed."""

    seed: int
    fraction: float

    def __call__(self, task: RelaxTask, step: int) -> bool:
        return bool(np.random.default_rng([self.seed, task.sid, step, 1]).random() < self.fraction)


def to_task(system: SampledSystem) -> RelaxTask:
    atoms = system.atoms
    return RelaxTask(sid=system.sid, positions=atoms.positions.copy(), atomic_numbers=atoms.numbers.copy(),
                     cell=np.array(atoms.cell), tags=atoms.get_tags().copy(), fixed=fixed_mask(atoms),
                     payload=system.details)


def anomaly(result: RelaxResult) -> str | None:
    """Why a trajectory is dropped (None: keep it): non-finite, exploded, or fairchem's
    DetectTrajAnomaly verdicts (desorbed, dissociated, surface changed)."""
    from fairchem.data.oc.utils.flag_anomaly import DetectTrajAnomaly

    task = result.task
    if not result.finite:
        return "non_finite"
    energies = np.asarray(result.energies)
    force_max = max(float(np.linalg.norm(r.forces, axis=1).max()) for r in [*result.kept, result.final])
    if np.abs(energies - energies[0]).max() / task.n_atoms > EXPLODED_EV_PER_ATOM or force_max > EXPLODED_FORCE_EV_PER_ANG:
        return "exploded"

    def atoms_at(positions: np.ndarray) -> Atoms:
        return Atoms(numbers=task.atomic_numbers, positions=positions, cell=task.cell, pbc=True, tags=task.tags)

    detector = DetectTrajAnomaly(atoms_at(task.positions), atoms_at(result.final.positions), task.tags)
    if detector.is_adsorbate_desorbed():
        return "desorbed"
    if detector.is_adsorbate_dissociated():
        return "dissociated"
    if detector.has_surface_changed():
        return "surface_changed"
    return None


def result_frames(result: RelaxResult, teacher: AtomisticModel) -> list[Frame]:
    task = result.task
    details = {**task.payload, "n_steps": result.n_steps, "converged": result.converged}
    return [
        Frame(positions=record.positions, atomic_numbers=task.atomic_numbers, cell=task.cell, tags=task.tags,
              fixed=task.fixed, energy=record.energy, forces=record.forces, sid=task.sid, fid=record.step,
              provenance=Provenance(origin="synthetic", teacher=teacher.name,
                                    teacher_sha256=teacher.checkpoint_sha256,
                                    details={**details, "step": record.step}))
        for record in result.kept
    ]


def run_generate(config: GenerateConfig, *, progress: bool = True, on_step=None) -> dict:
    """Generate (or resume) this shard's part of the dataset; returns the summary counts."""
    shard_index, num_shards = shard_from_environment(config.num_shards, config.shard_index)
    stem = "data" if num_shards == 1 else f"shard{shard_index:04d}-of-{num_shards:04d}"
    # Everything that can reject the input comes before the first byte is written.
    teacher = load_teacher(config.teacher, config.checkpoint, device=config.device)
    sampler = SystemSampler(SamplerConfig(
        bulk_db=config.bulk_db, adsorbate_ids=config.adsorbate_ids, placement=config.placement,
        max_miller=config.max_miller, seed=config.seed, supported_elements=teacher.supported_elements))
    creation_args = {**dataclasses.asdict(config), "teacher_name": teacher.name,
                     "teacher_sha256": teacher.checkpoint_sha256, "shard_index": shard_index,
                     "num_shards": num_shards}
    data_options = {**{key: getattr(config, key) for key in GenerateConfig.DATA_KEYS},
                    "teacher_sha256": teacher.checkpoint_sha256, "num_shards": num_shards,
                    "bulk_db_sha256": sha256_of(config.bulk_db or DEFAULT_BULK_DB)}
    writer = LmdbWriter(config.out, stem=stem, creation_args=creation_args, data_options=data_options)
    done = writer.done_keys()
    sids = [sid for sid in range(shard_index, config.n_systems, num_shards) if str(sid) not in done]
    logger.info("shard %d/%d: %d systems to do, %d already done", shard_index, num_shards, len(sids), len(done))
    relaxer = BatchedRelaxer(teacher, optimizer=config.optimizer, fmax=config.fmax, max_steps=config.max_steps,
                             max_systems=config.max_systems_per_batch or (1 if config.device == "cpu" else 32),
                             max_atoms=config.max_atoms_per_batch,
                             device=config.device, on_step=on_step)
    keep = FrameSelector(config.seed, config.frame_fraction)
    tasks = (to_task(system) for system in iter_systems(sampler, sids, num_workers=config.num_workers))
    counts = {"systems": 0, "frames": 0, "converged": 0, "dropped": 0}
    start = time.perf_counter()
    with writer, tqdm(total=len(sids), desc=f"generate {stem}", unit=" systems", disable=not progress) as bar:
        for result in relaxer.run(tasks, keep):
            reason = anomaly(result)
            frames = [] if reason else result_frames(result, teacher)
            counters = {f"dropped:{reason}": 1} if reason else {"systems_kept": 1,
                                                               "systems_converged": int(result.converged)}
            writer.write_batch(frames, done=[str(result.task.sid)], counters=counters)
            counts["systems"] += 1
            counts["frames"] += len(frames)
            counts["converged"] += int(result.converged and not reason)
            counts["dropped"] += int(reason is not None)
            bar.update(1)
            bar.set_postfix(frames=counts["frames"],
                            frames_per_s=f"{counts['frames'] / (time.perf_counter() - start):.2f}")
    elapsed = time.perf_counter() - start
    counts["seconds"] = round(elapsed, 2)
    logger.info("done: %d systems (%d converged, %d dropped), %d frames in %.1f s -> %s",
                counts["systems"], counts["converged"], counts["dropped"], counts["frames"], elapsed, config.out)
    return counts
