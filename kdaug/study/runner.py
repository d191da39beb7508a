"""`run_study`: the whole study of a `StudyConfig`, resumable run by run (layout in kdaug/study/__init__.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ase.data import atomic_numbers, chemical_symbols

from kdaug.cka import cka_map, collect_layer_features, plot_cka
from kdaug.config import load_config
from kdaug.data.output_lock import OutputLock
from kdaug.data.run_record import (
    atomic_write,
    check_input_paths,
    check_output_not_input,
    make_output_dir,
    option_differences,
    read_json,
    sha256_of,
    to_json,
    write_json,
)
from kdaug.data.lmdb import FrameDataset
from kdaug.data.subset import SubsetConfig, run_subset
from kdaug.data.training_set import TrainingSet
from kdaug.errors import KdaugError
from kdaug.evaluate import evaluate
from kdaug.generate import GenerateConfig, run_generate
from kdaug.models import load_model
from kdaug.perturb.adversarial import AdversarialConfig, run_adversarial
from kdaug.perturb.rattle import RattleConfig, run_rattle
from kdaug.perturb.relabel import RelabelConfig, run_relabel
from kdaug.resources import resource_path
from kdaug.select import SelectConfig, run_select
from kdaug.study.config import Budget, StudyConfig
from kdaug.study.convergence import monitored_curve, plateaued
from kdaug.study.plan import BASELINE, RunSpec, plan_runs, regime_suffix, slug
from kdaug.study.plots import plot_gap_closed, plot_gap_vs_scale, plot_learning_curves
from kdaug.study.table import arm_table, markdown_table, table_rows
from kdaug.train.strategies import STRATEGIES, check_pair
from kdaug.train.config import TrainConfig
from kdaug.train.teacher_cache import TeacherCacheConfig, run_teacher_cache
from kdaug.train.loop import run_train

logger = logging.getLogger(__name__)
RESULT = "result.json"  # written last in a run folder: the run is finished
# kdaug train options that leave the trained model as it is: a finished run is not redone for them
NO_OUTCOME_CHANGE = frozenset({"out", "device", "num_workers", "checkpoint_every", "log_every", "eval_batch_size",
                               "restart"})


_DAMAGED = "delete it (or move it away) and rerun to make it anew"


class Study:
    """One study folder; `run()` does what is not done yet and writes the results."""

    def __init__(self, config: StudyConfig, *, progress: bool = True) -> None:
        self.config = config
        self.progress = progress
        self.out = Path(config.out)
        self.started = time.perf_counter()

    # -- data ---------------------------------------------------------------------------
    def _make(self, option: str, config, make, *, moved: frozenset[str] = frozenset(),
              student: str | None = None) -> str:
        """Run (or resume) one generator `make(config, progress=)` into `config.out` once: done.json records the
        options and counts (and the sha256 of the `student` checkpoint the data depends on, the baseline student);
        a folder made with other options (outside `moved`: paths that follow a moved study folder) or another
        student, or holding no frames, is a one-line error naming the study `option`."""
        folder = Path(config.out)
        done = folder / "done.json"
        options = to_json(config)
        if student is not None:
            options["student_sha256"] = sha256_of(student)
        if done.is_file():
            record = _record(done, ("config", "counts"))
            differences = option_differences(record["config"], options, moved)
            if differences:
                raise KdaugError(f"{option}: {folder} was made with other options; delete it to make it anew "
                                 f"({'; '.join(differences)})")
        else:
            record = {"config": options, "counts": make(config, progress=self.progress)}
            write_json(done, record)
        counts = record["counts"]
        if not counts.get("frames", counts.get("written")):
            raise KdaugError(f"{option}: {folder} holds no frames ({json.dumps(counts)}); change the options "
                             "and delete the folder")
        return str(folder)

    def ground_truth(self) -> tuple[tuple[str, ...], dict[str, str]]:
        """(training LMDBs, {validation set name: path}), generating the EMT/labeller set when asked."""
        gen = self.config.data.generate
        train, val = list(self.config.data.train), {}
        common = {"teacher": gen.teacher, "checkpoint": gen.checkpoint, "device": gen.device,
                  "adsorbate_ids": gen.adsorbate_ids, "max_miller": gen.max_miller, "fmax": gen.fmax,
                  "max_steps": gen.max_steps, "frame_fraction": gen.frame_fraction, "num_workers": 0}
        if gen.elements:
            common["bulk_db"] = self._bulk_db(_atomic_numbers(gen.elements))
        if gen.train_systems:
            folder = self.out / "data" / "dft-train"
            train.append(self._make("data.generate.train_systems", GenerateConfig(
                n_systems=gen.train_systems, out=str(folder), seed=gen.seed, **common), run_generate))
        if gen.val_systems:
            folder = self.out / "data" / "dft-val"
            val["generated"] = self._make("data.generate.val_systems", GenerateConfig(
                n_systems=gen.val_systems, out=str(folder), seed=gen.seed + 1, **common), run_generate)
        for path in self.config.data.val:
            name = Path(path).name.removesuffix(".lmdb") or str(path)
            val[name if name not in val else f"{name}-{len(val)}"] = path
        if not train:
            raise KdaugError(f"{self.config.out}: data.train is empty and data.generate.train_systems is 0; "
                             "expected training data")
        if not val:
            raise KdaugError(f"{self.config.out}: data.val is empty and data.generate.val_systems is 0; "
                             "expected a held-out validation set")
        return tuple(train), val

    def synthetic(self, source: str, train: Sequence[str], teacher_ckpt: str) -> tuple[str, ...]:
        """The synthetic LMDBs of `source` (one of plan.SOURCES), made once with the trained teacher
        (disagreement: generate's frames, selected in `scaled_synthetic`)."""
        config, extra = self.config, self.config.extra
        teacher = {"teacher": config.teacher.model, "checkpoint": teacher_ckpt, "device": config.device}
        if source in ("generate", "onpolicy", "disagreement"):
            gen = config.data.generate
            driven = source == "onpolicy"
            folder = self.out / "data" / ("onpolicy" if driven else "generate")
            options = {"n_systems": extra.onpolicy_systems, "driver": self.baseline_student()} if driven else {
                "n_systems": extra.generate_systems}
            return (self._make("extra.onpolicy_systems" if driven else "extra.generate_systems", GenerateConfig(
                out=str(folder), seed=gen.seed + 2, bulk_db=self._bulks_like(train), adsorbate_ids=gen.adsorbate_ids,
                max_miller=gen.max_miller, fmax=gen.fmax, max_steps=extra.generate_max_steps,
                frame_fraction=extra.generate_frame_fraction, num_workers=0, **options, **teacher), run_generate,
                moved=frozenset({"driver"}), student=options.get("driver")),)
        folder = self.out / "data" / source
        paths = []
        for i, path in enumerate(train):
            part = str(folder / f"part{i}")
            if source == "rattle":
                paths.append(self._make("extra.rattle_copies", RattleConfig(
                    input=path, out=part, sigma=extra.rattle_sigma, copies=extra.rattle_copies, **teacher),
                    run_rattle))
            else:
                paths.append(self._make("extra.adversarial_steps", AdversarialConfig(
                    input=path, out=part, student=self.baseline_student(), steps=extra.adversarial_steps,
                    alpha=extra.adversarial_alpha, **teacher), run_adversarial, student=self.baseline_student()))
        return tuple(paths)

    def baseline_student(self) -> str:
        """student.pt of the first seed's baseline in the largest dft_fraction: the student that adversarial
        attacks, that drives on-policy relaxations and whose disagreement with the teacher selects frames."""
        largest = BASELINE + regime_suffix(self.config.regimes.largest)
        return str(self.out / RunSpec(largest, self.config.seeds[0]).folder / "student.pt")

    def student_train(self, train: Sequence[str], fraction: float, val: dict[str, str]) -> tuple[str, ...]:
        """The ground truth of the regime `fraction` (0 < fraction <= 1): that share of the training systems, drawn
        with regimes.seed, never a system of a validation set that is also a training input."""
        if fraction == 1:
            return tuple(train)
        held_out = tuple((path, frame.sid) for path in val.values() if path in train
                         for frame in FrameDataset(path).iter_frames())
        folder = self.out / "data" / "regimes" / f"dft-f{fraction:g}"
        return (self._make("regimes.dft_fraction", SubsetConfig(
            inputs=tuple(train), out=str(folder), system_fraction=fraction, held_out=held_out,
            seed=self.config.regimes.seed), run_subset),)

    def scaled_synthetic(self, source: str, paths: tuple[str, ...], scale: float | None, fraction: float,
                         dft: Sequence[str]) -> tuple[str, ...]:
        """`scale` x the frames of `dft` (the regime's ground truth, or the whole training set at fraction 0) from
        the synthetic set `paths` (all of it when it holds fewer; scale None: all): a random draw with regimes.seed,
        or for disagreement the frames the baseline student gets most wrong (scale None: extra.disagreement_keep
        of them)."""
        if scale is None and source != "disagreement":
            return paths
        pool = sum(len(FrameDataset(path)) for path in paths)
        frames = None if scale is None else min(pool, round(scale * sum(len(FrameDataset(path)) for path in dft)))
        folder = self.out / "data" / "regimes" / (f"{source}-f{fraction:g}" + ("" if scale is None else f"-x{scale:g}"))
        option = "regimes.synthetic_scale" if scale is not None else "extra.disagreement_keep"
        if source == "disagreement":
            (pool_path,) = paths
            return (self._make(option, SelectConfig(
                input=pool_path, out=str(folder), keep=self.config.extra.disagreement_keep if frames is None
                else frames, by="disagreement", student=self.baseline_student(), device=self.config.device),
                run_select, moved=frozenset({"input", "out", "student"}), student=self.baseline_student()),)
        return (self._make(option, SubsetConfig(inputs=paths, out=str(folder), frames=frames,
                                                seed=self.config.regimes.seed), run_subset),)

    def teacher_cache(self, kd: str, teacher_ckpt: str, paths: Sequence[str]) -> str:
        """data/teacher-cache/<kd>: the teacher's targets for `kd` on `paths` (a run's training then synthetic
        LMDBs), computed once per dataset (kdaug teacher-cache; float32, so a run reads what a live teacher gives)
        instead of a teacher forward in every training step."""
        folder = self.out / "data" / "teacher-cache" / kd
        run_teacher_cache(TeacherCacheConfig(teacher=self.config.teacher.model, checkpoint=teacher_ckpt,
                                             data=tuple(paths), kd=kd, out=str(folder), dtype="float32",
                                             batch_size=self.config.eval_batch_size, device=self.config.device),
                          progress=self.progress)
        return str(folder)

    def teacher_labelled(self, val: dict[str, str], teacher_ckpt: str, teacher_sha256: str | None) -> dict[str, str]:
        """{validation set name: a copy labelled by the teacher}, made once: students are also scored against it.
        It is the teacher's weights (sha256) that make it, wherever the study folder lies."""
        config = self.config
        return {name: self._make("data.val", RelabelConfig(
            input=path, out=str(self.out / "data" / "teacher-val" / slug(name)), teacher=config.teacher.model,
            checkpoint=teacher_ckpt, checkpoint_sha256=teacher_sha256, device=config.device), run_relabel,
            moved=frozenset({"input", "out", "checkpoint"})) for name, path in val.items()}

    def _bulks_like(self, train: Sequence[str]) -> str:
        """A bulk database of the embedded bulks made only of the training set's elements (the teacher has
        seen nothing else)."""
        dataset = TrainingSet(train)
        try:
            elements = set()
            for i in range(len(dataset)):
                elements.update(int(z) for z in dataset[i].atomic_numbers.unique())
        finally:
            dataset.close()
        return self._bulk_db(elements)

    def _bulk_db(self, elements: set[int]) -> str:
        """data/bulks-<elements>.pkl: the embedded bulks made only of `elements` (atomic numbers), written once."""
        symbols = [chemical_symbols[z] for z in sorted(elements)]
        path = self.out / "data" / f"bulks-{'-'.join(symbols)}.pkl"
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            return str(path)
        with open(resource_path("bulks.pkl"), "rb") as handle:
            bulks = [b for b in pickle.load(handle) if set(b["atoms"].get_atomic_numbers()) <= elements]
        if not bulks:
            raise KdaugError(f"data.generate.elements: no embedded bulk is made of {', '.join(symbols)} only")
        atomic_write(path, pickle.dumps(bulks))
        return str(path)

    # -- runs ---------------------------------------------------------------------------
    def train_config(self, model: str, budget: Budget, out: Path, seed: int, train: Sequence[str],
                     val: str, **changes) -> TrainConfig:
        options = {"student": model, "train": tuple(train), "out": str(out), "seed": seed, "val": (val,),
                   "device": self.config.device, "checkpoint_every": self.config.checkpoint_every,
                   "eval_batch_size": self.config.eval_batch_size}
        for field in dataclasses.fields(Budget):
            value = getattr(budget, field.name)
            if field.name != "recipe" and value is not None:
                options[field.name] = value
        if budget.epochs is not None:
            options["max_steps"] = None
        elif budget.max_steps is not None:
            options["epochs"] = None
        return load_config(TrainConfig, [budget.recipe] if budget.recipe else [], {**options, **changes})

    def train_and_evaluate(self, name: str, config: TrainConfig, val: dict[str, str],
                           teacher_val: dict[str, str] | None = None) -> dict:
        """Train (resuming a killed run) and evaluate on every validation set (and against the teacher's labels
        on it, `teacher_val`: teacher_energy_mae_mev, teacher_force_mae_mev_per_ang), unless `result.json`
        already holds this configuration's result."""
        out = Path(config.out)
        result_path = out / RESULT
        options = to_json(config)
        if result_path.is_file():
            result = _record(result_path, ("config", "val"))
            if not option_differences(result["config"], options, NO_OUTCOME_CHANGE):
                logger.info("%s: finished before, skipped", name)
                return result
        logger.info("%s: training -> %s", name, out)
        start = time.perf_counter()
        summary = run_train(config, progress=self.progress)
        seconds = time.perf_counter() - start
        model = load_model(None, out / "student.pt", device=self.config.device)
        metrics = {set_name: evaluate(model, [path], batch_size=self.config.eval_batch_size,
                                      device=self.config.device) for set_name, path in val.items()}
        for set_name, path in (teacher_val or {}).items():
            copy = evaluate(model, [path], batch_size=self.config.eval_batch_size, device=self.config.device)
            metrics[set_name].update(teacher_energy_mae_mev=copy["energy_mae_mev"],
                                     teacher_force_mae_mev_per_ang=copy["force_mae_mev_per_ang"])
        result = {"name": name, "config": options, "steps": summary["steps"], "stopped": summary["stopped"],
                  "plateaued": plateaued(monitored_curve(out / "log.jsonl")), "train_seconds": seconds,
                  "val": metrics}
        write_json(result_path, result)
        return result

    def kd_changes(self, spec: RunSpec, teacher_ckpt: str) -> dict:
        changes = {"kd": spec.kd, "online_share": spec.online_share}
        if spec.strategy.uses_teacher or spec.online_rattle is not None or spec.online_adversarial is not None:
            changes.update(teacher=self.config.teacher.model, teacher_checkpoint=teacher_ckpt)
        if spec.strategy.uses_teacher:
            changes["kd_lambda"] = getattr(self.config.kd_lambda, spec.kd)
        for key in ("mix_ratio", "rs_dft", "online_rattle", "online_adversarial"):
            if getattr(spec, key) is not None:
                changes[key] = getattr(spec, key)
        return changes

    # -- the study ----------------------------------------------------------------------
    def check_inputs(self) -> None:
        """Before anything runs: every input path non-empty and named once, none of them the study folder."""
        config = self.config
        named = [*(("data.train", p) for p in config.data.train), *(("data.val", p) for p in config.data.val)]
        if config.teacher.checkpoint is not None:
            named.append(("teacher.checkpoint", config.teacher.checkpoint))
        check_input_paths(named)
        for key, path in named:
            check_output_not_input(path, self.out, input_flag=key, out_flag="out")
        for key, section in (("teacher", config.teacher), ("student", config.student)):
            try:  # the budget with its recipe, as each run will load it (paths are checked when it starts)
                self.train_config(section.model, section.train, self.out / key, 0, ("data",), "val")
            except KdaugError as err:
                raise KdaugError(f"{key}.train: {err}") from err

    def run(self) -> dict:
        self.check_inputs()
        make_output_dir(self.out, flag="out")
        lock = OutputLock(self.out, "study")
        try:
            return self._run()
        finally:
            lock.release()

    def _run(self) -> dict:
        config = self.config
        train, val = self.ground_truth()
        first_val = next(iter(val.values()))
        if config.teacher.checkpoint:
            teacher_ckpt = config.teacher.checkpoint
            teacher_result = {"val": {name: evaluate(load_model(config.teacher.model, teacher_ckpt), [path],
                                                     batch_size=config.eval_batch_size, device=config.device)
                                      for name, path in val.items()}}
        else:
            teacher_config = self.train_config(config.teacher.model, config.teacher.train, self.out / "teacher",
                                               config.teacher_seed, train, first_val)
            teacher_result = self.train_and_evaluate("teacher", teacher_config, val)
            teacher_ckpt = str(self.out / "teacher" / "student.pt")
        teacher = load_model(config.teacher.model, teacher_ckpt)
        student = load_model(config.student.model)
        runs, skipped = plan_runs(config, _unsupported_modes(student, teacher))
        for note in skipped:
            logger.warning("strategy %s skipped: %s", note["strategy"], note["reason"])
        teacher_val = self.teacher_labelled(val, teacher_ckpt, teacher.checkpoint_sha256)
        results: dict[str, dict[int, dict]] = {}
        synthetic: dict[str, tuple[str, ...]] = {}
        for spec in runs:
            changes = self.kd_changes(spec, teacher_ckpt)
            dft = self.student_train(train, spec.dft_fraction, val) if spec.dft_fraction else ()
            if spec.source is not None:
                if spec.source not in synthetic:
                    synthetic[spec.source] = self.synthetic(spec.source, train, teacher_ckpt)
                changes["synthetic"] = self.scaled_synthetic(spec.source, synthetic[spec.source],
                                                             spec.synthetic_scale, spec.dft_fraction, dft or train)
            if not dft:  # dft_fraction 0: the synthetic data is all the run trains on
                dft = changes.pop("synthetic")
            if spec.strategy.uses_teacher and spec.online_rattle is None and spec.online_adversarial is None:
                changes["teacher_cache"] = self.teacher_cache(spec.kd, teacher_ckpt,
                                                              (*dft, *changes.get("synthetic", ())))
            train_config = self.train_config(config.student.model, config.student.train, self.out / spec.folder,
                                             spec.seed, dft, first_val, **changes)
            results.setdefault(spec.label, {})[spec.seed] = self.train_and_evaluate(
                f"{spec.label} seed {spec.seed}", train_config, val, teacher_val)
        report = self.report(val, teacher_result, results, skipped, runs)
        if config.cka.enabled:
            report["cka"] = self.cka(teacher, runs, first_val)
            write_json(self.out / "results.json", report)
        return report

    # -- results ------------------------------------------------------------------------
    def report(self, val: dict[str, str], teacher_result: dict, results: dict[str, dict[int, dict]],
               skipped: list[dict], runs: list[RunSpec]) -> dict:
        """results.json, results.md, gap_closed.png, learning_curves.png; returns the JSON content."""
        config = self.config
        convergence = {label: {seed: {"steps": r["steps"], "plateaued": r["plateaued"]}
                               for seed, r in by_seed.items()} for label, by_seed in results.items()}
        if "plateaued" in teacher_result:  # trained here
            convergence["teacher"] = {config.teacher_seed: {"steps": teacher_result["steps"],
                                                            "plateaued": teacher_result["plateaued"]}}
        tables = {name: table_rows(teacher_result["val"][name],
                                   {label: {seed: r["val"][name] for seed, r in by_seed.items()}
                                    for label, by_seed in results.items()},
                                   {spec.label: spec.baseline for spec in runs}, convergence)
                  for name in val}
        report = {"name": config.name, "commit": _commit(), "teacher": config.teacher.model,
                  "student": config.student.model, "seeds": list(config.seeds), "val_sets": val,
                  "tables": tables, "skipped": skipped,
                  "train_seconds": {label: {str(s): r["train_seconds"] for s, r in by_seed.items()}
                                    for label, by_seed in results.items()},
                  "wall_seconds": time.perf_counter() - self.started}  # of this invocation (resumed: its part)
        write_json(self.out / "results.json", report)
        lines = [f"# {config.name}: teacher {config.teacher.model}, student {config.student.model}",
                 "", f"Seeds {', '.join(map(str, config.seeds))}: mean ± sample std over seeds; in brackets the "
                 "share of the teacher-student gap closed, 100 (student - run) / (student - teacher) %, per seed "
                 "against the baseline student of that seed and regime (positive: towards the teacher, for every "
                 "metric). steps: optimizer steps the runs took (they stop early); the last two columns score the runs "
                 "against the teacher's labels on the held-out set.",
                 f"Commit {report['commit'] or 'unknown'}; this invocation took {report['wall_seconds'] / 60:.1f} min "
                 f"(device {config.device})."]
        placement = {spec.label: (spec.arm, spec.dft_fraction, spec.synthetic_scale) for spec in runs if spec.arm}
        for name, rows in tables.items():
            lines += ["", f"## Validation set: {name} ({val[name]})", "", markdown_table(rows)]
            if placement:
                lines += ["", "Gap closed by data arm and regime, energy MAE / force MAE (mean ± std % over seeds; "
                          "`*`: a run had not plateaued):", "", arm_table(rows, placement)]
        if skipped:
            lines += ["", "Skipped: " + "; ".join(f"{s['strategy']} ({s['reason']})" for s in skipped)]
        (self.out / "results.md").write_text("\n".join(lines) + "\n")
        plot_gap_closed(tables, self.out / "gap_closed.png", title=config.name)
        if any(scale is not None for _, _, scale in placement.values()):
            name = next(iter(tables))
            plot_gap_vs_scale(tables[name], placement, self.out / "gap_vs_scale.png", title=f"{config.name}: {name}")
        logs: dict[str, list[Path]] = {}
        for spec in runs:
            logs.setdefault(spec.label, []).append(self.out / spec.folder / "log.jsonl")
        teacher_log = self.out / "teacher" / "log.jsonl"
        plot_learning_curves(logs, teacher_log if teacher_log.is_file() else None, self.out / "learning_curves.png",
                             title=config.name)
        return report

    def cka(self, teacher, runs: list[RunSpec], data: str) -> dict:
        """Teacher-vs-student CKA per run (cka.json in its folder), the (largest regime's) baseline's mean map and
        each label's mean gain over its regime's baseline of the same seed (cka/<label>.png, distilled layer pair
        outlined)."""
        config = self.config
        folder = self.out / "cka"
        folder.mkdir(exist_ok=True)
        teacher_features, n_frames = collect_layer_features(teacher, [data], max_samples=config.cka.max_samples,
                                                            device=config.device)
        maps: dict[str, dict[int, np.ndarray]] = {}
        student_layers: list[str] = []
        marks: dict[str, tuple[str, str] | None] = {}
        for spec in runs:
            student = load_model(None, self.out / spec.folder / "student.pt", device=config.device)
            features, _ = collect_layer_features(student, [data], max_samples=config.cka.max_samples,
                                                 device=config.device)
            student_layers = list(features)
            maps.setdefault(spec.label, {})[spec.seed] = cka_map(teacher_features, features)
            marks[spec.label] = _distilled_pair(spec.strategy, teacher, student)
        teacher_layers = list(teacher_features)
        baselines = {spec.label: spec.baseline for spec in runs}
        main = BASELINE + regime_suffix(config.regimes.largest)
        baseline = np.mean(list(maps[main].values()), axis=0)
        plot_cka(baseline, teacher_layers, student_layers, folder / f"{slug(main)}.png",
                 title=f"CKA teacher vs baseline student ({n_frames} frames)")
        summary = {"data": data, "n_frames": n_frames, "teacher_layers": teacher_layers,
                   "student_layers": student_layers, "baseline": baseline.round(6).tolist(), "gain": {}}
        for label, by_seed in maps.items():
            if baselines[label] == label:
                continue
            gain = np.mean([m - maps[baselines[label]][s] for s, m in by_seed.items()], axis=0)
            summary["gain"][label] = {"gain": gain.round(6).tolist(), "distilled_pair": marks[label]}
            plot_cka(gain, teacher_layers, student_layers, folder / f"{slug(label)}.png", diverging=True,
                     mark=marks[label], title=f"CKA gain of {label} over the baseline student")
        return summary


def _atomic_numbers(symbols: Sequence[str]) -> set[int]:
    unknown = [s for s in symbols if s not in atomic_numbers]
    if unknown:
        raise KdaugError(f"data.generate.elements: {', '.join(unknown)}: expected element symbols (Cu, Pt, ...)")
    return {atomic_numbers[s] for s in symbols}


def _record(path: Path, keys: Sequence[str]) -> dict:
    """A study record (done.json, result.json) holding `keys`; damage is one line naming the file."""
    record = read_json(path, advice=_DAMAGED)
    if not isinstance(record, dict) or not all(isinstance(record.get(key), dict) for key in keys):
        raise KdaugError(f"{path}: damaged (expected a mapping with {', '.join(keys)}); {_DAMAGED}")
    return record


def _unsupported_modes(student, teacher) -> dict[str, str]:
    """{KD mode the pair cannot do: kdaug train's one-line reason}."""
    reasons = {}
    for name, strategy in STRATEGIES.items():
        try:
            check_pair(strategy, student, teacher)
        except KdaugError as err:
            reasons[name] = str(err).removeprefix(f"--kd {name}: ")
    return reasons


def _distilled_pair(strategy, teacher, student) -> tuple[str, str] | None:
    """(teacher layer, student layer) a feature KD strategy distils between, None if no layer pair holds both
    taps."""
    teacher_taps, student_taps = strategy.teacher_taps, strategy.student_taps
    if not teacher_taps or not student_taps or "atom_energy" in teacher_taps:
        return None
    pair = (teacher.tap_layer(teacher_taps[0]), student.tap_layer(student_taps[0]))
    return pair if None not in pair else None


def _commit() -> str | None:
    """The git commit of the kdaug source that ran the study (None outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, check=True,
                              capture_output=True, text=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def run_study(config: StudyConfig, *, progress: bool = True) -> dict:
    """Run (or resume) the study `config`; returns the content of its results.json."""
    return Study(config, progress=progress).run()
