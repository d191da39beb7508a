"""`kdaug train --early-stopping`: stops on a validation curve that no longer improves, exports the best
validation's EMA weights (also after an interrupted run is resumed), logs why it stopped; the plateau schedule."""

from __future__ import annotations

import pytest
import torch

import kdaug.train.loop as loop
from kdaug.errors import KdaugError
from kdaug.train.early_stopping import MIN_DELTA, ValidationMonitor, improves
from kdaug.train.losses import LossWeights
from kdaug.train.loop import run_train
from tests.test_train import config, data, read_log  # noqa: F401  (data: the module's fixture)


def scripted_forces(monkeypatch, curve: dict[int, float], *, fail_at: int | None = None) -> None:
    """Validation runs the real evaluation, then reports `curve[step]` as the force MAE; raises at step
    `fail_at` (an interrupted run)."""

    def evaluate(model, paths, **kwargs):
        metrics = _EVALUATE(model, paths, **kwargs)
        step = _validating[0]
        if step == fail_at:
            raise RuntimeError("killed")
        return {**metrics, "force_mae_mev_per_ang": curve[step]}

    monkeypatch.setattr(loop, "evaluate", evaluate)


_EVALUATE = loop.evaluate
_validating = [0]  # the step the trainer validates


@pytest.fixture(autouse=True)
def track_step(monkeypatch):
    """Expose the trainer's step to the scripted evaluation."""
    validate = loop.Trainer.validate

    def tracked(self):
        _validating[0] = self.step
        return validate(self)

    monkeypatch.setattr(loop.Trainer, "validate", tracked)


def _student_weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["state_dict"]


# force MAE per validated step: best at step 4, then within MIN_DELTA of it or worse (a flat curve)
CURVE = {2: 100.0, 4: 80.0, 6: 80.0 * (1 - MIN_DELTA / 2), 8: 81.0, 10: 80.0, 12: 79.99, 14: 70.0, 16: 60.0}


def test_early_stopping_stops_on_a_flat_curve_and_exports_the_best_ema_weights(data, tmp_path, monkeypatch):
    scripted_forces(monkeypatch, CURVE)
    summary = run_train(config(data, tmp_path / "stopped", val=(data["val"],), val_every=2, max_steps=16,
                               early_stopping=3, ema_decay=0.9), progress=False)
    assert summary["steps"] == 10
    assert summary["stopped"] == {"step": 10, "reason": "early_stopping", "best_step": 4, "best": 80.0}
    log = read_log(tmp_path / "stopped")
    assert log[-1] == {"stopped": summary["stopped"]}
    assert [r["monitor"]["bad"] for r in log if "monitor" in r] == [0, 0, 1, 2, 3]
    assert summary["val"]["force_mae_mev_per_ang"] == 80.0
    # the same seed trained to the best step without early stopping ends on the best validation's EMA weights
    run_train(config(data, tmp_path / "to-best", max_steps=4, ema_decay=0.9), progress=False)
    best, stopped = _student_weights(tmp_path / "to-best" / "student.pt"), _student_weights(
        tmp_path / "stopped" / "student.pt")
    assert all(torch.equal(best[key], stopped[key]) for key in best)
    run_train(config(data, tmp_path / "to-stop", max_steps=10, ema_decay=0.9), progress=False)
    last = _student_weights(tmp_path / "to-stop" / "student.pt")
    assert not all(torch.equal(last[key], stopped[key]) for key in last)


def test_a_resumed_run_keeps_the_best_and_its_patience(data, tmp_path, monkeypatch):
    options = {"val": (data["val"],), "val_every": 2, "max_steps": 16, "early_stopping": 3, "ema_decay": 0.9,
               "checkpoint_every": 2}
    scripted_forces(monkeypatch, CURVE, fail_at=8)  # interrupted after the checkpoint of step 6
    with pytest.raises(RuntimeError, match="killed"):
        run_train(config(data, tmp_path / "resumed", **options), progress=False)
    saved = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert (saved["step"], saved["monitor"]["best_step"], saved["monitor"]["bad"]) == (6, 4, 1)
    scripted_forces(monkeypatch, CURVE)
    summary = run_train(config(data, tmp_path / "resumed", **options), progress=False)
    assert summary["stopped"] == {"step": 10, "reason": "early_stopping", "best_step": 4, "best": 80.0}
    run_train(config(data, tmp_path / "reference", **{**options, "checkpoint_every": 100}), progress=False)
    resumed, reference = (_student_weights(tmp_path / name / "student.pt") for name in ("resumed", "reference"))
    assert all(torch.equal(resumed[key], reference[key]) for key in reference)
    # a larger patience may be given on resume: the stopped run continues to the step cap
    summary = run_train(config(data, tmp_path / "resumed", **{**options, "early_stopping": 10}), progress=False)
    assert summary["stopped"] == {"step": 16, "reason": "max_steps", "best_step": 16, "best": 60.0}


def test_plateau_schedule_multiplies_the_lr_by_gamma_after_patience_validations(data, tmp_path, monkeypatch):
    scripted_forces(monkeypatch, CURVE)
    run_train(config(data, tmp_path, val=(data["val"],), val_every=2, max_steps=12, schedule="plateau",
                     plateau_patience=2, lr_gamma=0.5, warmup_steps=2), progress=False)
    lr = {r["step"]: r["lr"] for r in read_log(tmp_path) if "lr" in r}
    # validations: 2 (warmup, not counted), 4 best, 6 and 8 without improvement -> x0.5 from step 9; 10, 12 -> x0.25
    assert lr[3] == pytest.approx(1e-3) and lr[8] == pytest.approx(1e-3)
    assert lr[9] == pytest.approx(5e-4) and lr[12] == pytest.approx(5e-4)
    summary = read_log(tmp_path)[-1]["stopped"]
    assert summary == {"step": 12, "reason": "max_steps", "best_step": 4, "best": 80.0}


def test_improvement_is_relative_and_strict():
    assert improves(1.0, None)
    assert improves(0.99, 1.0) and not improves(1.0 * (1 - MIN_DELTA), 1.0) and not improves(1.0, 1.0)
    monitor = ValidationMonitor("l0", LossWeights(1.0, 100.0))
    entry = monitor.update(5, {"energy_mae_mev": 200.0, "force_mae_mev_per_ang": 30.0}, {})
    assert entry == {"name": "l0", "value": pytest.approx(0.2 + 3.0), "best": pytest.approx(3.2), "best_step": 5,
                     "bad": 0}


@pytest.mark.parametrize("changes, expected", [
    ({"early_stopping": 3}, "--early-stopping 3: expected --val data to monitor"),
    ({"schedule": "plateau"}, "--schedule plateau: expected --val data to monitor for plateau"),
    ({"early_stopping": 0, "val": ("x",)}, "--early-stopping 0: expected a positive number of validations"),
])
def test_early_stopping_and_plateau_need_validation_data(data, tmp_path, changes, expected):
    with pytest.raises(KdaugError, match=expected):
        config(data, tmp_path, **changes)
