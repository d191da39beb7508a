"""Linear CKA between the per-layer node features of two models (`kdaug cka`; paper Sec. 4, Fig. 3, App. F).

Linear CKA (Kornblith et al. 2019) of X (n, p) and Y (n, q), rows = the same n atoms, columns centred:

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)

It lies in [0, 1], is 1 for X against itself and does not change under orthogonal transforms or
isotropic scaling of either side. `cka_map` evaluates it for every (teacher layer, student layer)
pair on the atoms of a data sample (fixed and free alike), with each model's `layer_features`.

Output of `run_cka` (`--out DIR`): cka.json {"teacher", "student", "data", "n_samples", "n_atoms",
"teacher_layers", "student_layers", "cka" (teacher layers x student layers)} and cka.png (heatmap).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from kdaug.data.batch import make_batch
from kdaug.data.run_record import check_input_paths, check_output_not_input, make_output_dir, write_json
from kdaug.data.training_set import TrainingSet, collate
from kdaug.errors import KdaugError
from kdaug.models import load_model
from kdaug.models.protocol import AtomisticModel


def linear_cka(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Linear CKA of features x (n, p) and y (n, q) of the same n samples (float64; 0 if one side is constant)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        msg = f"linear_cka: expected (n, p) and (n, q) features of the same n samples, got {tuple(x.shape)}, " \
              f"{tuple(y.shape)}"
        raise ValueError(msg)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    denominator = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if denominator == 0:
        return 0.0
    return float(torch.linalg.matrix_norm(y.T @ x) ** 2 / denominator)


def cka_map(teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor]) -> np.ndarray:
    """(teacher layers, student layers) linear CKA of every pair of per-layer features (n atoms each)."""
    return np.array([[linear_cka(t, s) for s in student.values()] for t in teacher.values()])


def collect_layer_features(model: AtomisticModel, dataset_paths: Sequence[str | os.PathLike], *,
                           max_samples: int = 64, batch_size: int = 8, device: str | torch.device = "cpu",
                           ) -> tuple[dict[str, torch.Tensor], int]:
    """({layer: (n_atoms, D) node features}, number of frames) of `model` on the first `max_samples` frames."""
    if not hasattr(model, "layer_features"):
        msg = f"model {model.name}: has no per-layer node features (fairchem GNNs have: painn, schnet, gemnet-oc)"
        raise KdaugError(msg)
    dataset = TrainingSet(dataset_paths, flags=("--data", "--data"))
    indices = list(range(min(max_samples, len(dataset))))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         collate_fn=collate)
    model = model.to(device).eval()
    parts: dict[str, list[torch.Tensor]] = {}
    try:
        for batch in loader:
            inputs = make_batch(pos=batch.pos.to(device=device, dtype=model.dtype), atomic_numbers=batch.atomic_numbers,
                                cell=batch.cell, natoms=batch.natoms, tags=batch.tags, fixed=batch.fixed)
            for name, value in model.layer_features(inputs).items():
                parts.setdefault(name, []).append(value.cpu())
    finally:
        dataset.close()
    return {name: torch.cat(values) for name, values in parts.items()}, len(indices)


def plot_cka(matrix: np.ndarray, teacher_layers: Sequence[str], student_layers: Sequence[str], png: str | os.PathLike,
             *, title: str, mark: tuple[str, str] | None = None, diverging: bool = False) -> None:
    """Heatmap of a (teacher layers, student layers) CKA map (or a gain map with `diverging`), the cell
    `mark` = (teacher layer, student layer) outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(max(5.0, 2.5 + 0.9 * len(student_layers)), 2.0 + 0.7 * len(teacher_layers)))
    if diverging:
        limit = max(float(np.abs(matrix).max()), 0.05)  # gains below 0.05 stay pale
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit, origin="lower")
    else:
        limit = 1.0
        image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=limit, origin="lower")
    for (i, j), value in np.ndenumerate(matrix):
        dark = abs(value) > 0.6 * limit if diverging else value < 0.5
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color="white" if dark else "black")
    if mark is not None and mark[0] in teacher_layers and mark[1] in student_layers:
        i, j = list(teacher_layers).index(mark[0]), list(student_layers).index(mark[1])
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    ax.set(xticks=range(len(student_layers)), xticklabels=student_layers, yticks=range(len(teacher_layers)),
           yticklabels=teacher_layers, xlabel="student layer", ylabel="teacher layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="CKA gain" if diverging else "linear CKA")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def run_cka(teacher: str | os.PathLike, student: str | os.PathLike, data: Sequence[str | os.PathLike],
            out: str | os.PathLike, *, max_samples: int = 64, batch_size: int = 8,
            device: str = "cpu") -> dict:
    """CKA of every teacher layer against every student layer (checkpoints with their configs) on `data`;
    writes out/cka.json and out/cka.png and returns the JSON's content."""
    if max_samples < 1:
        msg = f"--max-samples {max_samples}: expected a positive number of frames"
        raise KdaugError(msg)
    check_input_paths([("--data", path) for path in data])
    for flag, path in (("--teacher", teacher), ("--student", student)):  # one model may be both (self-CKA)
        check_input_paths([(flag, path)])
        if not Path(path).is_file():
            msg = f"{flag} {path}: no such file (expected a model checkpoint)"
            raise KdaugError(msg)
    for flag, path in (("--teacher", teacher), ("--student", student), *(("--data", p) for p in data)):
        check_output_not_input(path, out, input_flag=flag)
    out = make_output_dir(out)
    models = {flag: load_model(None, path, device=device) for flag, path in (("--teacher", teacher),
                                                                             ("--student", student))}
    features = {}
    for flag, model in models.items():
        features[flag], n_samples = collect_layer_features(model, data, max_samples=max_samples,
                                                           batch_size=batch_size, device=device)
    matrix = cka_map(features["--teacher"], features["--student"])
    n_atoms = len(next(iter(features["--teacher"].values())))
    report = {"teacher": str(teacher), "student": str(student), "data": [str(p) for p in data],
              "n_samples": n_samples, "n_atoms": n_atoms,
              "teacher_layers": list(features["--teacher"]), "student_layers": list(features["--student"]),
              "cka": matrix.round(6).tolist()}
    write_json(out / "cka.json", report)
    plot_cka(matrix, report["teacher_layers"], report["student_layers"], out / "cka.png",
             title=f"linear CKA, {n_atoms} atoms")
    return report

