"""Learning curves of a run as a PNG, from its log.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_curves(log: Path, png: Path) -> None:
    """Training loss parts against step (log scale) and, when validated, the validation MAEs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val" in r]
    fig, axes = plt.subplots(1, 2 if val else 1, figsize=(11 if val else 6, 4), squeeze=False)
    for key in ("loss", "l0", "kd"):
        points = [(r["step"], r[key]) for r in train if r.get(key, 0) > 0]
        if points:
            axes[0, 0].plot(*zip(*points), label=key)
    axes[0, 0].set(xlabel="step", ylabel="training loss", yscale="log", title="training")
    axes[0, 0].legend()
    if val:
        steps = [r["step"] for r in val]
        ax = axes[0, 1]
        ax.plot(steps, [r["val"]["energy_mae_mev"] for r in val], "o-", label="energy MAE (meV)")
        ax.plot(steps, [r["val"]["force_mae_mev_per_ang"] for r in val], "s-", label="force MAE (meV/A)")
        ax.set(xlabel="step", yscale="log", title="validation (EMA weights)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
