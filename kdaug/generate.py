"""`run_generate`: sample systems, relax them with the teacher in batches, keep ~10 % of frames.

On-policy generation (`--driver`): the relaxations follow another model's forces (e.g. a student.pt of
`kdaug train`), and the teacher labels each kept frame (one teacher evaluation per kept frame, batched).
Convergence and the trajectory's anomaly checks then see the driver's forces; the teacher's labels are
checked too (non-finite or exploded: the system is dropped).

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

import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from ase import Atoms
from tqdm import tqdm

from kdaug.config import check_values, option, shard_from_environment
from kdaug.data.lmdb import LmdbWriter
from kdaug.data.run_record import sha256_of
from kdaug.errors import KdaugError
from kdaug.models import AtomisticModel, load_named_model, load_teacher
from kdaug.perturb.common import label
from kdaug.relax.optimizers import OPTIMIZERS
from kdaug.relax.runner import BatchedRelaxer, ReadyTasks, RelaxResult, RelaxTask
from kdaug.sampling.oc import DEFAULT_BULK_DB, PLACEMENT_MODES, SamplerConfig, SystemSampler, iter_systems
from kdaug.types import Frame, Provenance

logger = logging.getLogger(__name__)

# A trajectory "explodes" when its energy moves this far per atom from the start,
# or a force exceeds this norm; such labels are teacher failures, not data.
EXPLODED_EV_PER_ATOM = 5.0
EXPLODED_FORCE_EV_PER_ANG = 50.0
PRECISIONS = ("fp32", "tf32")


@dataclass(frozen=True)
class GenerateConfig:
    """Options of `kdaug generate` (flags and recipe YAML keys; units in the fields' metadata)."""

    # Options that shape the data: a resume must keep them (with the teacher and bulk database hashes).
    DATA_KEYS: ClassVar[tuple[str, ...]] = ("seed", "teacher", "frame_fraction", "fmax", "optimizer", "max_steps",
                                            "adsorbate_ids", "placement", "max_miller", "precision")

    n_systems: int = option(help="number of systems in the whole dataset (all shards)")
    out: str = option(help="output directory (resumed if it holds a previous run)")
    teacher: str = option("chgnet", help="chgnet, emt, ase:module:Class, or a model config (e.g. gemnet-oc) "
                                         "with --checkpoint")
    checkpoint: str | None = option(None, help="teacher checkpoint (fairchem OC20 format)")
    driver: str | None = option(
        None, help="on-policy generation: relax with this model's forces (a checkpoint such as the student.pt of "
                   "kdaug train, or chgnet, emt, ase:module:Class) and label the kept frames with the teacher "
                   "(default: the teacher drives)")
    device: str = option("cpu", help="cpu or cuda")
    precision: str = option("fp32", help="float32 matmuls: fp32 (full) or tf32 (CUDA only; faster, ~1e-3 relative)")
    graph_workers: int = option(0, help="processes building CHGNet's graphs in parallel (CHGNet teacher only)")
    seed: int = option(0, help="system i is drawn from a generator seeded by (seed, i)")
    bulk_db: str | None = option(None, help="OC20-format bulks.pkl (default: the bulks shipped with kdaug)")
    adsorbate_ids: tuple[int, ...] | None = option(
        None, help="fairchem-data-oc adsorbate ids to draw from (default: all the teacher supports)")
    placement: str = option("random_site_heuristic_placement",
                            help=f"fairchem-data-oc placement mode: {', '.join(PLACEMENT_MODES)}")
    max_miller: int = option(2, help="largest Miller index of sampled slabs")
    optimizer: str = option("lbfgs", help=f"relaxation optimizer: {', '.join(OPTIMIZERS)}")
    fmax: float = option(0.05, help="convergence threshold on free-atom forces", unit="eV/A")
    max_steps: int = option(200, help="optimizer steps per system at most")
    frame_fraction: float = option(0.1, help="probability of keeping each relaxation frame")
    max_systems_per_batch: int | None = option(
        None, help="systems per forward (of the teacher or the driver) at most (default: 1 on CPU, 32 on CUDA)")
    max_atoms_per_batch: int | None = option(None, help="atoms per teacher forward at most (default: no limit)")
    num_workers: int = option(2, help="sampling processes running ahead of the relaxer (0: in-process)")
    num_shards: int | None = option(None, help="split system ids over this many shards "
                                               "(default: torchrun/SLURM environment, else 1)")
    shard_index: int | None = option(None, help="this process's shard")

    def __post_init__(self) -> None:
        check_values(self, [
            (self.n_systems >= 1, "n_systems", "at least 1"),
            (self.seed >= 0, "seed", "non-negative"),
            (0 < self.frame_fraction <= 1, "frame_fraction", "in (0, 1]"),
            (self.optimizer in OPTIMIZERS, "optimizer", f"one of {', '.join(OPTIMIZERS)}"),
            (self.placement in PLACEMENT_MODES, "placement", f"one of {', '.join(PLACEMENT_MODES)}"),
            (self.max_miller >= 1, "max_miller", "at least 1"),
            (self.fmax > 0, "fmax", "positive (eV/A)"),
            (self.max_steps >= 0, "max_steps", "non-negative"),
            (self.max_systems_per_batch is None or self.max_systems_per_batch >= 1, "max_systems_per_batch",
             "at least 1"),
            (self.max_atoms_per_batch is None or self.max_atoms_per_batch >= 1, "max_atoms_per_batch",
             "at least 1"),
            (self.num_workers >= 0, "num_workers", "non-negative"),
            (self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}"),
            (self.graph_workers >= 0, "graph_workers", "non-negative"),
        ])


@dataclass(frozen=True)
class FrameSelector:
    """Keeps evaluation `step` of system `sid` with probability `fraction`, the same for a given seed."""

    seed: int
    fraction: float

    def __call__(self, task: RelaxTask, step: int) -> bool:
        return bool(np.random.default_rng([self.seed, task.sid, step, 1]).random() < self.fraction)


def anomaly(result: RelaxResult) -> str | None:
    """Why a trajectory is dropped (None: keep it): non-finite, exploded (energy drift above 5 eV/atom or a
    free-atom force above 50 eV/A at any evaluation), or fairchem's DetectTrajAnomaly verdicts (desorbed,
    dissociated, surface changed)."""
    from fairchem.data.oc.utils.flag_anomaly import DetectTrajAnomaly

    task = result.task
    if not result.finite:
        return "non_finite"
    energies = np.asarray(result.energies)
    force_max = max(result.fmaxes)  # every evaluation's, not only the frames kept: the verdict ignores sampling
    drift_per_atom = np.abs(energies - energies[0]).max() / task.n_atoms
    if drift_per_atom > EXPLODED_EV_PER_ATOM or force_max > EXPLODED_FORCE_EV_PER_ANG:
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


def evaluation_keys(driven: bool) -> tuple[str, ...]:
    """The tally's model-evaluation counters: the teacher's ("evaluations"), or, with a driver, the driver's
    (relaxation steps) and the teacher's (labels of kept frames) apart."""
    return ("driver_evaluations", "teacher_evaluations") if driven else ("evaluations",)


def result_counts(result: RelaxResult, reason: str | None, n_frames: int, labelled: int | None = None,
                  ) -> dict[str, int]:
    """What one finished system adds to the tally (the manifest's counters and the returned summary): model
    evaluations included (`labelled`: the teacher's labels of a driven relaxation, None without a driver);
    zero counts left out."""
    evaluations = {"evaluations": len(result.energies)} if labelled is None else {
        "driver_evaluations": len(result.energies), "teacher_evaluations": labelled}
    if reason:
        tally = {"systems": 1, **evaluations, "dropped": 1, f"dropped_{reason}": 1}
    else:
        tally = {"systems": 1, **evaluations, "frames": n_frames, "converged": int(result.converged)}
    return {key: n for key, n in tally.items() if n}


def label_anomaly(frames: list[Frame]) -> str | None:
    """Why the teacher's labels of a driven relaxation's kept frames drop the system (None: keep it): a
    non-finite label, or a free-atom force above 50 eV/A."""
    for frame in frames:
        if not (np.isfinite(frame.energy) and np.isfinite(frame.forces).all()):
            return "teacher_non_finite"
        free = frame.forces[~frame.fixed]
        if free.size and np.linalg.norm(free, axis=1).max() > EXPLODED_FORCE_EV_PER_ANG:
            return "teacher_exploded"
    return None


def teacher_labelled(frames: list[Frame], teacher: AtomisticModel, *, batch: int, device: str) -> list[Frame]:
    """`frames` with the teacher's energy and forces in place of the driver's, `batch` frames per forward."""
    labels = [pair for start in range(0, len(frames), batch)
              for pair in label(frames[start:start + batch], teacher, device=device)]
    return [frame.replace(energy=energy, forces=forces) for frame, (energy, forces) in zip(frames, labels)]


def result_frames(result: RelaxResult, teacher: AtomisticModel, driver: AtomisticModel | None = None,
                  ) -> list[Frame]:
    """The kept frames with the relaxer's labels (the driver's, when there is one: see `teacher_labelled`)."""
    task = result.task
    details = {**task.payload, "n_steps": result.n_steps, "converged": result.converged}
    if driver is not None:
        details.update(driver=driver.name, driver_sha256=driver.checkpoint_sha256)
    return [
        Frame(positions=record.positions, atomic_numbers=task.atomic_numbers, cell=task.cell, tags=task.tags,
              fixed=task.fixed, energy=record.energy, forces=record.forces, sid=task.sid, fid=record.step,
              provenance=Provenance(origin="synthetic", teacher=teacher.name,
                                    teacher_sha256=teacher.checkpoint_sha256,
                                    details={**details, "step": record.step}))
        for record in result.kept
    ]


class WriterThread:
    """Checks and writes finished systems beside the relaxer: anomaly checks, frames (labelled by the teacher,
    `label_batch` frames per forward on `device`, when a `driver` relaxed them), then one LMDB transaction per
    system (kept frames, done-marker, counters). The first failure stops the writing; `submit` and `close` then
    raise it in the caller's thread as one line, and every system written before it stays committed."""

    def __init__(self, writer: LmdbWriter, teacher: AtomisticModel, *, driver: AtomisticModel | None = None,
                 label_batch: int = 1, device: str = "cpu", bar: tqdm | None = None, ahead: int = 64) -> None:
        self._evaluation_keys = evaluation_keys(driver is not None)
        self.counts: Counter = Counter(dict.fromkeys(
            ("systems", *self._evaluation_keys, "frames", "converged", "dropped"), 0))
        self._writer, self._teacher, self._driver, self._bar = writer, teacher, driver, bar
        self._label_batch, self._device = label_batch, device
        self._results: queue.Queue = queue.Queue(maxsize=ahead)
        self._error: KdaugError | None = None
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="kdaug-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (result := self._results.get()) is not None:
            if self._error is None:
                try:
                    self._write(result)
                except Exception as err:  # any failure of a write stops the run, reported in the main thread
                    self._error = KdaugError(
                        f"--out {self._writer.out_dir}: writing system {result.task.sid} failed "
                        f"({type(err).__name__}: {err}); the {self.counts['systems']} systems written before it "
                        "are kept -- rerun the command to resume")

    def _write(self, result: RelaxResult) -> None:
        reason = anomaly(result)
        frames = [] if reason else result_frames(result, self._teacher, self._driver)
        labelled = None
        if self._driver is not None:
            frames = teacher_labelled(frames, self._teacher, batch=self._label_batch, device=self._device)
            labelled, reason = len(frames), reason or label_anomaly(frames)
            frames = [] if reason else frames
        tally = result_counts(result, reason, len(frames), labelled)
        self._writer.write_batch(frames, done=[str(result.task.sid)], counters=tally)
        self.counts.update(tally)
        if self._bar is not None:
            self._bar.update(1)
            seconds = time.perf_counter() - self._start
            rates = {f"{key}_per_s": f"{self.counts[key] / seconds:.1f}" for key in self._evaluation_keys}
            self._bar.set_postfix(frames=self.counts["frames"], frames_per_s=f"{self.counts['frames'] / seconds:.2f}",
                                  **rates)

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, result: RelaxResult) -> None:
        self._raise_error()
        self._results.put(result)

    def close(self) -> None:
        """Write what was submitted, stop the thread; raise the failure if one happened."""
        if self._thread.is_alive():
            self._results.put(None)
            self._thread.join()
        self._raise_error()


class TeacherPace:
    """The relaxer's `on_step`: counts the evaluations of the model relaxing the systems (systems per forward;
    the teacher, or the driver, named by `key` in the summary) and times the first one from `start` (the call
    of `run_generate`)."""

    def __init__(self, start: float, key: str = "evaluations") -> None:
        self.start, self.key = start, key
        self.evaluations, self.first = 0, None

    def __call__(self, n_systems: int, n_atoms: int) -> None:
        self.evaluations += n_systems
        self.first = self.first or time.perf_counter()

    def summary(self) -> dict[str, float | int | None]:
        """Run time, evaluations, their rate, and the seconds to the first evaluation (None: none made)."""
        seconds = time.perf_counter() - self.start
        return {"seconds": round(seconds, 2), self.key: self.evaluations,
                f"{self.key}_per_s": round(self.evaluations / seconds, 3),
                "first_evaluation_s": None if self.first is None else round(self.first - self.start, 2)}


@contextlib.contextmanager
def float32_precision(precision: str, device: str) -> Iterator[None]:
    """Inside: float32 matmuls and convolutions in full precision ("fp32") or TF32 ("tf32", CUDA only)."""
    if precision == "tf32" and not device.startswith("cuda"):
        msg = f"--precision tf32: needs --device cuda (got --device {device})"
        raise KdaugError(msg)
    previous = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous[0])
        torch.backends.cudnn.allow_tf32 = previous[1]


@contextlib.contextmanager
def threads_beside_workers(device: str, n_workers: int) -> Iterator[None]:
    """Inside, on CPU: torch's intra-op threads leave one core to each worker process. Oversubscribed, torch's
    threads spin against the workers (CHGNet on 2 cores: 17x slower with 2 threads beside a sampling worker)."""
    previous = torch.get_num_threads()
    if device == "cpu" and n_workers:
        torch.set_num_threads(max(1, min(previous, len(os.sched_getaffinity(0)) - n_workers)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_generate(config: GenerateConfig, *, progress: bool = True) -> dict:
    """Generate (or resume) this shard's part of the dataset; returns the summary: this run's counts, seconds,
    model evaluations and their rate (the teacher's; with a driver, the driver's and the teacher's apart), and
    the seconds from the call to the first evaluation of the relaxing model.

    Three things run at once: sampling (`num_workers` processes, systems taken in the order they are ready),
    the relaxer (this thread), and the checks and LMDB writes (`WriterThread`).
    """
    start = time.perf_counter()
    pace = TeacherPace(start, evaluation_keys(config.driver is not None)[0])
    shard_index, num_shards = shard_from_environment(config.num_shards, config.shard_index)
    stem = "data" if num_shards == 1 else f"shard{shard_index:04d}-of-{num_shards:04d}"
    # Everything that can reject the input comes before the first byte is written.
    with contextlib.ExitStack() as stack:
        stack.enter_context(float32_precision(config.precision, config.device))
        stack.enter_context(threads_beside_workers(config.device, config.num_workers + config.graph_workers))
        teacher = load_teacher(config.teacher, config.checkpoint, device=config.device)
        if config.graph_workers:
            if not hasattr(teacher, "build_graphs_in"):
                msg = f"--graph-workers {config.graph_workers}: only the chgnet teacher builds graphs on the host"
                raise KdaugError(msg)
            teacher.build_graphs_in(config.graph_workers)
            stack.callback(teacher.close_graph_workers)
        driver = None if config.driver is None else load_named_model("--driver", config.driver, device=config.device)
        relaxing = teacher if driver is None else driver
        elements = teacher.supported_elements & relaxing.supported_elements
        sampler = SystemSampler(SamplerConfig(
            bulk_db=config.bulk_db, adsorbate_ids=config.adsorbate_ids, placement=config.placement,
            max_miller=config.max_miller, seed=config.seed, supported_elements=elements))
        # The driver shapes the data by its weights: a resume must keep its name and checkpoint hash.
        driven = {} if driver is None else {"driver_name": driver.name, "driver_sha256": driver.checkpoint_sha256}
        creation_args = {**dataclasses.asdict(config), "teacher_name": teacher.name,
                         "teacher_sha256": teacher.checkpoint_sha256, **driven, "shard_index": shard_index,
                         "num_shards": num_shards}
        data_options = {**{key: getattr(config, key) for key in GenerateConfig.DATA_KEYS},
                        "teacher_sha256": teacher.checkpoint_sha256, **driven, "num_shards": num_shards,
                        "bulk_db_sha256": sha256_of(config.bulk_db or DEFAULT_BULK_DB)}
        writer = LmdbWriter(config.out, stem=stem, creation_args=creation_args, data_options=data_options)
        done = writer.done_keys()
        sids = [sid for sid in range(shard_index, config.n_systems, num_shards) if str(sid) not in done]
        logger.info("shard %d/%d: %d systems to do, %d already done", shard_index, num_shards, len(sids), len(done))
        max_systems = config.max_systems_per_batch or (1 if config.device == "cpu" else 32)
        relaxer = BatchedRelaxer(relaxing, optimizer=config.optimizer, fmax=config.fmax, max_steps=config.max_steps,
                                 max_systems=max_systems, max_atoms=config.max_atoms_per_batch,
                                 device=config.device, on_step=pace)
        keep = FrameSelector(config.seed, config.frame_fraction)
        tasks = (RelaxTask.from_atoms(system.atoms, sid=system.sid, payload=system.details)
                 for system in iter_systems(sampler, sids, num_workers=config.num_workers))
        with (writer, tqdm(total=len(sids), desc=f"generate {stem}", unit=" systems", disable=not progress) as bar,
              ReadyTasks(tasks, ahead=max_systems + config.num_workers) as ready):
            background = WriterThread(writer, teacher, driver=driver, label_batch=max_systems, device=config.device,
                                      bar=bar)
            try:
                for result in relaxer.run(ready, keep):
                    background.submit(result)
            finally:
                background.close()
    counts = {**background.counts, **pace.summary()}  # the evaluations of this run (the tally's, unless resumed)
    if driver is not None:
        counts["teacher_evaluations_per_s"] = round(counts["teacher_evaluations"] / max(counts["seconds"], 0.01), 3)
    evaluations = ", ".join(f"{counts[key]} {key.replace('_', ' ')}" for key in evaluation_keys(driver is not None))
    logger.info("done: %d systems (%d converged, %d dropped), %d frames, %s in %.1f s -> %s",
                counts["systems"], counts["converged"], counts["dropped"], counts["frames"],
                evaluations, counts["seconds"], config.out)
    return counts
