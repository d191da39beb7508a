"""The study's Table 3: metrics per run (mean and spread over seeds) and the share of the teacher-student gap
each run closed, as Markdown and JSON.

Gap closed (paper Table 3): 100 (student - run) / (student - teacher) %, with the run and the baseline
student of the same seed. One formula for every metric: positive means the run moved towards the teacher
(an MAE fell, a cosine or EFwT rose when the teacher's is higher), negative away from it, 100 % reached it.
The paper's signs follow it: for PaiNN-big -> PaiNN-small, n2n's force cos 0.345 -> 0.348 (teacher 0.376)
is +9.3 % and vanilla KD (1)'s fall to 0.269 is -237 %.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

METRICS: tuple[tuple[str, str, str], ...] = (  # (key in evaluate's report, column, format)
    ("energy_mae_mev", "energy MAE (meV)", ".1f"),
    ("force_mae_mev_per_ang", "force MAE (meV/A)", ".1f"),
    ("force_cos", "force cos", ".3f"),
    ("efwt", "EFwT", ".3f"),
    ("samples_per_s", "samples/s", ".0f"),
)
GAP_METRICS: tuple[str, ...] = ("energy_mae_mev", "force_mae_mev_per_ang", "force_cos", "efwt")


def gap_closed(student: float | None, run: float | None, teacher: float | None) -> float | None:
    """100 (student - run) / (student - teacher) in %; None when a value is missing or there is no gap."""
    if student is None or run is None or teacher is None or student == teacher:
        return None
    return 100.0 * (student - run) / (student - teacher)


def spread(values: Sequence[float | None]) -> dict[str, float | int | list | None]:
    """{"mean", "std" (sample standard deviation; None below 2 values), "n", "values"} over the non-None values."""
    present = [v for v in values if v is not None]
    return {"mean": statistics.fmean(present) if present else None,
            "std": statistics.stdev(present) if len(present) > 1 else None,
            "n": len(present), "values": list(values)}


def table_rows(teacher: Mapping[str, float], runs: Mapping[str, Mapping[int, Mapping[str, float]]],
               baseline: str) -> list[dict]:
    """Rows of one validation set: the teacher, then each label of `runs` ({label: {seed: metrics}}) with its
    metrics over seeds and, except for the baseline, its gap closed per seed against the baseline of that seed."""
    rows = [{"label": "teacher", "metrics": {key: spread([teacher.get(key)]) for key, _, _ in METRICS}}]
    for label, by_seed in runs.items():
        seeds = sorted(by_seed)
        row = {"label": label, "seeds": seeds,
               "metrics": {key: spread([by_seed[s].get(key) for s in seeds]) for key, _, _ in METRICS}}
        if label != baseline:
            row["gap_closed_pct"] = {
                key: spread([gap_closed(runs[baseline][s].get(key), by_seed[s].get(key), teacher.get(key))
                             if s in runs[baseline] else None for s in seeds])
                for key in GAP_METRICS}
        rows.append(row)
    return rows


def _cell(stats: Mapping, spec: str, suffix: str = "") -> str:
    if stats["mean"] is None:
        return "n/a"
    text = format(stats["mean"], spec)
    if stats["std"] is not None:
        text += f" ± {format(stats['std'], spec.lstrip('+'))}"
    return text + suffix


def markdown_table(rows: Sequence[Mapping]) -> str:
    """A Markdown table: one column per metric, "mean ± std (gap closed mean ± std %)" per cell."""
    header = "| run | " + " | ".join(column for _, column, _ in METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 1)]
    for row in rows:
        cells = []
        for key, _, spec in METRICS:
            cell = _cell(row["metrics"][key], spec)
            gap = row.get("gap_closed_pct", {}).get(key)
            if gap is not None:
                cell += f" ({_cell(gap, '+.1f', ' %')})"
            cells.append(cell)
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
