"""Whether a run's validation had plateaued when it stopped: the study marks the results of runs that had not.

A run plateaued when its last 20 % of validations (at least one) lowered the best monitored value (kdaug train
--monitor, logged with each validation) by less than 2 % of the best before them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

TAIL = 0.2  # share of the validations at the end of a run
TOLERANCE = 0.02  # relative improvement of the best value over that tail below which the run plateaued


def plateaued(values: Sequence[float]) -> bool | None:
    """True when the last TAIL of `values` (a validation curve, lower is better) improved its best by less than
    TOLERANCE; None with fewer than 2 values (nothing to compare)."""
    if len(values) < 2:
        return None
    tail = min(len(values) - 1, max(1, math.ceil(TAIL * len(values))))
    before, after = min(values[:-tail]), min(values)
    return before - after < TOLERANCE * abs(before)


def val_records(log: Path) -> list[dict]:
    """The validation records of a kdaug train log.jsonl (none if it is missing; unreadable lines skipped)."""
    if not log.is_file():
        return []
    records = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "val" in record:
            records.append(record)
    return records


def monitored_curve(log: Path) -> list[float]:
    """The monitored value of each counted validation in a run's log.jsonl."""
    return [r["monitor"]["value"] for r in val_records(log) if "monitor" in r]
