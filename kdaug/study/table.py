"""The study's Table 3: metrics per run (mean and spread over seeds) and the share of the teacher-student gap
each run closed, as Markdown and JSON.

Gap closed (paper Table 3): 100 (student - run) / (student - teacher) %, with the run and the baseline
student of the same seed. One formula for every metric: positive means the run moved towards the teacher
(an MAE fell, a cosine or EFwT rose when the teacher's is higher), negative away from it, 100 % reached it.
The paper's signs follow it: for PaiNN-big -> PaiNN-small, n2n's force cos 0.345 -> 0.348 (teacher 0.376)
is +9.3 % and vanilla KD (1)'s fall to 0.269 is -237 %.

Each row also gives the optimizer steps its runs took (they stop early) and marks its metric cells with a
trailing `*` when a run of it had not plateaued (`kdaug.study.convergence`).
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
    ("teacher_energy_mae_mev", "energy MAE vs teacher (meV)", ".1f"),  # against the teacher's labels on the set
    ("teacher_force_mae_mev_per_ang", "force MAE vs teacher (meV/A)", ".1f"),
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
               baseline: str | Mapping[str, str],
               convergence: Mapping[str, Mapping[int, Mapping]] | None = None) -> list[dict]:
    """Rows of one validation set: the teacher, then each label of `runs` ({label: {seed: metrics}}) with its
    metrics over seeds and, except for a baseline, its gap closed per seed against the baseline of that seed.

    `baseline`: the baseline's label, or {label: its baseline's label} (one baseline per data regime; a label
    that is its own baseline, or missing, gets no gap). `convergence`: {label (or "teacher"): {seed: {"steps",
    "plateaued"}}}, copied into the rows."""
    convergence = convergence or {}
    baselines = {label: baseline for label in runs} if isinstance(baseline, str) else baseline
    rows = [{"label": "teacher", "metrics": {key: spread([teacher.get(key)]) for key, _, _ in METRICS},
             **_convergence(convergence.get("teacher", {}))}]
    for label, by_seed in runs.items():
        seeds = sorted(by_seed)
        row = {"label": label, "seeds": seeds,
               "metrics": {key: spread([by_seed[s].get(key) for s in seeds]) for key, _, _ in METRICS},
               **_convergence({s: c for s, c in convergence.get(label, {}).items() if s in by_seed})}
        reference = runs.get(baselines.get(label, label), {})
        if baselines.get(label, label) != label:
            row["baseline"] = baselines[label]
            row["gap_closed_pct"] = {
                key: spread([gap_closed(reference[s].get(key), by_seed[s].get(key), teacher.get(key))
                             if s in reference else None for s in seeds])
                for key in GAP_METRICS}
        rows.append(row)
    return rows


def _convergence(by_seed: Mapping[int, Mapping]) -> dict:
    """{"steps": spread of the steps taken, "plateaued": [per seed: True, False or None (too few validations)]}."""
    if not by_seed:
        return {}
    seeds = sorted(by_seed)
    return {"steps": spread([by_seed[s]["steps"] for s in seeds]), "plateaued": [by_seed[s]["plateaued"]
                                                                              for s in seeds]}


def not_plateaued(row: Mapping) -> bool:
    """A row with a run whose validation had not plateaued (or had too few validations to tell)."""
    return any(flag is not True for flag in row.get("plateaued", []))


def _cell(stats: Mapping, spec: str, suffix: str = "") -> str:
    if stats["mean"] is None:
        return "n/a"
    text = format(stats["mean"], spec)
    if stats["std"] is not None:
        text += f" ± {format(stats['std'], spec.lstrip('+'))}"
    return text + suffix


def markdown_table(rows: Sequence[Mapping]) -> str:
    """A Markdown table: the steps column, then one column per metric, "mean ± std (gap closed mean ± std %)" per
    cell, a trailing `*` on the cells of a row with a run that had not plateaued, and then its footnote."""
    header = "| run | steps | " + " | ".join(column for _, column, _ in METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 2)]
    for row in rows:
        mark = "*" if not_plateaued(row) else ""
        cells = [_cell(row["steps"], ".0f") if "steps" in row else "n/a"]
        for key, _, spec in METRICS:
            cell = _cell(row["metrics"][key], spec)
            gap = row.get("gap_closed_pct", {}).get(key)
            if gap is not None:
                cell += f" ({_cell(gap, '+.1f', ' %')})"
            cells.append(cell + mark)
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    if any(not_plateaued(row) for row in rows):
        lines += ["", "\\* not plateaued: in a run of this row the last 20 % of validations still improved the "
                  "monitored metric by 2 % or more (or it validated fewer than twice); its result is not final."]
    return "\n".join(lines)


def arm_table(rows: Sequence[Mapping], placement: Mapping[str, tuple[str, float, float | None]]) -> str:
    """A Markdown table of gap closed by data arm (rows, with their synthetic scale) x data regime (columns),
    "energy / forces" mean ± std % per cell. `placement`: {label: (arm, dft_fraction, synthetic_scale)} of the
    synthetic-data runs (other rows are left out)."""
    by_label = {row["label"]: row for row in rows}
    fractions = sorted({fraction for _, fraction, _ in placement.values()}, reverse=True)
    cells: dict[tuple[str, float | None], dict[float, str]] = {}
    for label, (arm, fraction, scale) in placement.items():
        row = by_label.get(label, {})
        gaps = row.get("gap_closed_pct")
        if gaps is None:
            continue
        mark = "*" if not_plateaued(row) else ""
        cells.setdefault((arm, scale), {})[fraction] = (
            f"{_cell(gaps['energy_mae_mev'], '+.0f')} / {_cell(gaps['force_mae_mev_per_ang'], '+.0f')}{mark}")
    lines = ["| data arm | synthetic scale | " + " | ".join(f"dft_fraction {f:g}" for f in fractions) + " |",
             "|" + "---|" * (len(fractions) + 2)]
    for (arm, scale), by_fraction in cells.items():
        lines.append(f"| {arm} | {'all' if scale is None else f'x{scale:g}'} | "
                     + " | ".join(by_fraction.get(f, "n/a") for f in fractions) + " |")
    return "\n".join(lines)
