"""The study's figures: gap closed per run and metric (bar chart) and validation learning curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from kdaug.study.convergence import val_records
from kdaug.study.table import GAP_METRICS, METRICS

_COLUMNS = {key: column for key, column, _ in METRICS}
_CLIP = 200.0  # gap-closed axis range (%): beyond it one run would flatten the others


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_gap_closed(tables: Mapping[str, Sequence[Mapping]], png: Path, *, title: str) -> None:
    """One panel per validation set: grouped bars of gap closed (%) per run and metric, seed spread as error bars."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(tables), 1, figsize=(max(6.0, 1.6 * max(len(r) for r in tables.values())),
                                                      3.6 * len(tables)), squeeze=False)
    width = 0.8 / len(GAP_METRICS)
    for ax, (val_name, rows) in zip(axes[:, 0], tables.items()):
        rows = [row for row in rows if "gap_closed_pct" in row]
        for k, key in enumerate(GAP_METRICS):
            stats = [row["gap_closed_pct"][key] for row in rows]
            x = [i + (k - (len(GAP_METRICS) - 1) / 2) * width for i in range(len(rows))]
            means = [s["mean"] if s["mean"] is not None else 0.0 for s in stats]
            ax.bar(x, means, width, yerr=[s["std"] or 0.0 for s in stats], capsize=2, label=_COLUMNS[key])
            for xi, mean in zip(x, means):  # bars beyond the axis range carry their value
                if abs(mean) > _CLIP:
                    ax.text(xi, _CLIP * (1 if mean > 0 else -1) * 0.95, f"{mean:.0f}", ha="center", fontsize=7,
                            rotation=90, va="top" if mean > 0 else "bottom")
        ax.set_ylim(-_CLIP, _CLIP)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.axhline(100, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(rows)), [row["label"] for row in rows], rotation=20, ha="right")
        ax.set(ylabel="gap closed (%)", title=f"{title}: {val_name}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_learning_curves(run_logs: Mapping[str, Sequence[Path]], teacher_log: Path | None, png: Path, *,
                         title: str) -> None:
    """Validation energy and force MAE against step: one colour per run label, one line per seed, the
    teacher's final values dashed."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    keys = ("energy_mae_mev", "force_mae_mev_per_ang")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, (label, logs) in enumerate(run_logs.items()):
        for s, log in enumerate(logs):
            records = val_records(log)
            for ax, key in zip(axes, keys):
                ax.plot([r["step"] for r in records], [r["val"][key] for r in records], color=colours[n % len(colours)],
                        alpha=0.8, linewidth=1.2, label=label if s == 0 else None)
    teacher = val_records(teacher_log) if teacher_log is not None else []
    for ax, key in zip(axes, keys):
        if teacher:
            ax.axhline(teacher[-1]["val"][key], color="black", linestyle="--", label="teacher")
        low, high = ax.get_ylim()
        ax.set(xlabel="step", ylabel=_COLUMNS[key], yscale="log" if low > 0 and high > 5 * low else "linear",
               title=f"{title}: validation {_COLUMNS[key]}")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_gap_vs_scale(rows: Sequence[Mapping], placement: Mapping[str, tuple[str, float, float | None]], png: Path,
                      *, title: str) -> None:
    """Energy and force gap closed (%) against synthetic_scale, one line per data arm with the seed spread as
    error bars, one row of panels per dft_fraction. `placement`: {label: (arm, dft_fraction, synthetic_scale)}
    of the synthetic-data runs of `rows` (one validation set's table)."""
    plt = _pyplot()
    by_label = {row["label"]: row for row in rows if "gap_closed_pct" in row}
    fractions = sorted({fraction for _, fraction, _ in placement.values()}, reverse=True)
    fig, axes = plt.subplots(len(fractions), 2, figsize=(11, 3.6 * len(fractions)), squeeze=False)
    for axes_row, fraction in zip(axes, fractions):
        lines: dict[str, list[tuple[float, Mapping]]] = {}
        for label, (arm, f, scale) in placement.items():
            if f == fraction and scale is not None and label in by_label:
                lines.setdefault(arm, []).append((scale, by_label[label]["gap_closed_pct"]))
        for ax, key in zip(axes_row, ("energy_mae_mev", "force_mae_mev_per_ang")):
            for arm, points in lines.items():
                points.sort(key=lambda point: point[0])
                stats = [gaps[key] for _, gaps in points]
                ax.errorbar([scale for scale, _ in points], [s["mean"] for s in stats],
                            yerr=[s["std"] or 0.0 for s in stats], marker="o", capsize=3, label=arm)
            ax.axhline(0, color="black", linewidth=0.8)
            ax.axhline(100, color="grey", linewidth=0.8, linestyle="--")
            scales = sorted({scale for points in lines.values() for scale, _ in points})
            ax.set_xscale("log")
            ax.set_xticks(scales, [f"{scale:g}" for scale in scales])
            ax.minorticks_off()
            ax.set(xlabel="synthetic frames per ground-truth frame",
                   ylabel=f"{_COLUMNS[key]}: gap closed (%)", title=f"{title}: dft_fraction {fraction:g}")
        axes_row[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
