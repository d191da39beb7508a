"""The run folder of `kdaug train` (`--out`): its inputs checked, one writer, its state read and checked.

- `check_inputs(config)`: before anything is loaded or written, every path the run reads is non-empty and
  named once, and --out is neither equal to, inside nor around one of them.
- `RunFolder.claim()`: the folder is made and locked (`.run.lock`, the `flock` generation outputs take; a
  second run on it names the holder); with --restart the run files it holds are removed first.
- A resume reads checkpoint.pt, config.json and log.jsonl; a damaged one is one line naming the file and
  what to do (move the folder away, or --restart). The run's record (its options, the fingerprints of its
  data and the sha256 of the checkpoints it reads) is stored in config.json and checkpoint.pt, and a resume
  whose record differs outside `RESUMABLE_CHANGES` is refused listing `name stored -> now`.
- log.jsonl is cut back to the records the checkpoint had seen when it was written, so a resumed run's log
  holds what an uninterrupted one holds (plus one "resumed" record where training continued).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from kdaug.data.output_lock import OutputLock
from kdaug.data.run_record import (
    atomic_write,
    check_input_paths,
    check_output_not_input,
    check_resume,
    make_output_dir,
    read_json,
    write_json,
)
from kdaug.errors import KdaugError, write_error
from kdaug.train.config import RESUMABLE_CHANGES, TrainConfig

CHECKPOINT, CONFIG, LOG = "checkpoint.pt", "config.json", "log.jsonl"
OUTPUTS = ("student.pt", "curves.png")  # written at the end; --restart removes them with the run state
CHECKPOINT_KEYS = ("student", "head", "optimizer", "scheduler", "ema", "step", "epoch", "batch_in_epoch", "config",
                   "visits", "log_records", "monitor")


def check_inputs(config: TrainConfig) -> None:
    """Every input path non-empty and given once (train and synthetic together; val apart: it may repeat a
    training set), and --out never equal to, inside or around an input."""
    data = [*(("--train", p) for p in config.train), *(("--synthetic", p) for p in config.synthetic)]
    checkpoints = [(flag, path) for flag, path in (("--student-checkpoint", config.student_checkpoint),
                                                    ("--teacher-checkpoint", config.teacher_checkpoint),
                                                    ("--teacher-cache", config.teacher_cache)) if path is not None]
    val = [("--val", p) for p in config.val]
    check_input_paths(data)
    check_input_paths(val)
    check_input_paths(checkpoints)
    if not config.out.strip():
        raise KdaugError("--out '': empty path; expected the run folder")
    for flag, path in (*data, *val, *checkpoints):
        check_output_not_input(path, config.out, input_flag=flag)


class RunFolder:
    """`--out` of one training run, held by this process from `claim()` to `release()` (rank 0 only)."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self.log_records = 0  # records in log.jsonl
        self._lock: OutputLock | None = None

    @property
    def advice(self) -> str:
        return f"move {self.out} away, or rerun with --restart to start over in it"

    def claim(self, *, restart: bool) -> None:
        """Make and lock the folder; with `restart`, remove the run files it holds."""
        make_output_dir(self.out)
        self._lock = OutputLock(self.out, "run")
        if restart:
            for path in [*(self.out / n for n in (CHECKPOINT, CONFIG, LOG, *OUTPUTS)),
                         *self.out.glob("visits.rank*.npy")]:
                path.unlink(missing_ok=True)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- reading -------------------------------------------------------------------------
    def checkpoint(self, device: torch.device) -> dict[str, Any] | None:
        """The state in checkpoint.pt (None if there is none); damage is one line."""
        path = self.out / CHECKPOINT
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location=device, weights_only=False)
        except Exception as err:  # any failure to unpickle (truncation, random bytes, an empty file) is damage
            detail = str(err).strip().splitlines()[0][:120] if str(err).strip() else ""
            raise KdaugError(f"{path}: damaged ({type(err).__name__}{': ' + detail if detail else ''}); "
                             f"{self.advice}") from err
        missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
        if missing:
            raise KdaugError(f"{path}: damaged (no {', '.join(missing)}); {self.advice}")
        if not isinstance(state["config"], dict):
            raise KdaugError(f"{path}: damaged (its config is no mapping); {self.advice}")
        return state

    def damaged(self, name: str, err: Exception) -> KdaugError:
        """The one line for run state that does not fit this run (e.g. weights of another shape)."""
        detail = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        return KdaugError(f"{self.out / name}: damaged ({detail}); {self.advice}")

    def check_resume(self, record: dict[str, Any], state: dict[str, Any] | None) -> None:
        """Refuse to resume a folder whose config.json or checkpoint.pt holds another record."""
        path = self.out / CONFIG
        if path.is_file():
            stored = read_json(path, advice=self.advice)
            if not isinstance(stored, dict):
                raise KdaugError(f"{path}: damaged (expected a mapping of options); {self.advice}")
            self._compare(CONFIG, stored, record)
        if state is not None:
            self._compare(CHECKPOINT, state["config"], record)

    def _compare(self, name: str, stored: dict[str, Any], record: dict[str, Any]) -> None:
        strange = sorted(set(stored) ^ set(record))
        if strange:  # not a record of this kdaug (hand-edited, damaged, or from another version)
            raise KdaugError(f"{self.out / name}: damaged (not a run record: {', '.join(strange[:3])}"
                             f"{' ...' if len(strange) > 3 else ''} missing or unknown); {self.advice}")
        check_resume(f"--out {self.out} ({name})", stored, record, RESUMABLE_CHANGES,
                     advice="rerun with the options it was started with, use another --out, or --restart to "
                            "start over in it")

    # -- writing -------------------------------------------------------------------------
    def write_config(self, record: dict[str, Any]) -> None:
        write_json(self.out / CONFIG, record)

    def save(self, state: dict[str, Any]) -> None:
        """checkpoint.pt, replaced whole or not at all (a failed write keeps the last good one)."""
        atomic_write(self.out / CHECKPOINT, lambda handle: torch.save(state, handle))

    def cut_log(self, records: int) -> None:
        """Keep the first `records` records of log.jsonl (a killed run logged past its checkpoint)."""
        path = self.out / LOG
        lines = self._log_lines(path) if path.is_file() else []
        if len(lines) < records:
            raise KdaugError(f"{path}: damaged (holds {len(lines)} records, {CHECKPOINT} was written after "
                             f"{records}); {self.advice}")
        self.log_records = records
        atomic_write(path, "".join(line + "\n" for line in lines[:self.log_records]))

    def _log_lines(self, path: Path) -> list[str]:
        """The records of log.jsonl; a half-written last line (a kill mid-write) is dropped, other damage is
        one line."""
        try:
            lines = path.read_bytes().decode().splitlines()
        except UnicodeDecodeError as err:
            raise KdaugError(f"{path}: damaged (not UTF-8 text); {self.advice}") from err
        for number, line in enumerate(lines, 1):
            try:
                ok = isinstance(json.loads(line), dict)
            except json.JSONDecodeError:
                ok = False
            if not ok:
                if number == len(lines):
                    return lines[:-1]
                raise KdaugError(f"{path}: damaged (line {number} is not a JSON record); {self.advice}")
        return lines

    def log(self, record: dict[str, Any]) -> None:
        path = self.out / LOG
        try:
            with open(path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as err:
            raise write_error(path, err) from err
        self.log_records += 1
