"""Linear CKA: its invariances, a hand-computed value, per-layer features of the fairchem models, `kdaug cka`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from kdaug.cka import cka_map, linear_cka
from kdaug.data.batch import batch_from_frames
from kdaug.data.lmdb import LmdbWriter
from kdaug.models import load_model
from tests.conftest import emt_frames
from tests.test_cli_data import kdaug


@pytest.fixture
def features() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6))
    y = x @ rng.normal(size=(6, 4)) + 0.5 * rng.normal(size=(50, 4))
    return x, y


def test_cka_of_a_representation_with_itself_is_one(features):
    x, y = features
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(y, y) == pytest.approx(1.0, abs=1e-12)
    assert 0 < linear_cka(x, y) < 1


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling(features):
    x, y = features
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(6, 6)))
    reference = linear_cka(x, y)
    assert linear_cka(x @ q, y) == pytest.approx(reference, rel=1e-10)
    assert linear_cka(3.7 * x, 0.02 * y) == pytest.approx(reference, rel=1e-10)
    assert linear_cka(x + 5.0, y) == pytest.approx(reference, rel=1e-10)  # centred: offsets do not matter
    # ... but not to a non-isotropic scaling of the columns
    assert linear_cka(x * np.arange(1, 7), y) != pytest.approx(reference, rel=1e-3)


def test_cka_matches_a_hand_computed_value():
    # X centred: [[1,-2],[-2,1],[1,1]]/3, Y centred: [-4,-1,5]/3; Y^T X = [1/3, 4/3] -> squared norm 17/9;
    # ||X^T X||_F = sqrt(10)/3 (entries 2/3, -1/3, -1/3, 2/3); ||Y^T Y||_F = 14/3.
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = np.array([[1.0], [2.0], [4.0]])
    assert linear_cka(x, y) == pytest.approx(17 / (14 * math.sqrt(10)), rel=1e-12)
    assert cka_map({"a": torch.tensor(x)}, {"b": torch.tensor(y), "c": torch.tensor(x)}) == pytest.approx(
        np.array([[17 / (14 * math.sqrt(10)), 1.0]]))


@pytest.mark.parametrize("name", ["painn-tiny", "schnet-tiny", "gemnet-oc-tiny"])
def test_layer_features_are_the_interaction_block_outputs_and_the_last_is_the_kd_tap(name):
    torch.manual_seed(0)
    model = load_model(name)
    batch = batch_from_frames(emt_frames(2))
    features = model.layer_features(batch)
    assert tuple(features) == model.layer_names and len(features) == 2
    assert all(f.shape[0] == batch.num_nodes and not f.requires_grad for f in features.values())
    node = model(batch, taps=("node",)).taps["node"]
    assert torch.allclose(features[model.tap_layer("node")], node, atol=1e-5)
    first, last = features.values()
    assert not torch.allclose(first, last)


def test_kdaug_cka_writes_the_map_and_heatmap(tmp_path):
    with LmdbWriter(tmp_path / "data") as writer:
        writer.write_batch(emt_frames(4))
    torch.manual_seed(0)
    load_model("painn-tiny").save(tmp_path / "painn.pt")
    load_model("schnet-tiny").save(tmp_path / "schnet.pt")
    result = kdaug("cka", "--teacher", str(tmp_path / "painn.pt"), "--student", str(tmp_path / "painn.pt"),
                   "--data", str(tmp_path / "data"), "--out", str(tmp_path / "self"), "--max-samples", "3")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "self" / "cka.json").read_text())
    assert report["n_samples"] == 3 and report["teacher_layers"] == ["layer0", "layer1"]
    assert np.diag(report["cka"]) == pytest.approx([1.0, 1.0], abs=1e-6)
    assert (tmp_path / "self" / "cka.png").stat().st_size > 0

    result = kdaug("cka", "--teacher", str(tmp_path / "painn.pt"), "--student", str(tmp_path / "schnet.pt"),
                   "--data", str(tmp_path / "data"), "--out", str(tmp_path / "pair"))
    assert result.returncode == 0, result.stderr
    matrix = np.array(json.loads((tmp_path / "pair" / "cka.json").read_text())["cka"])
    assert matrix.shape == (2, 2) and ((0 <= matrix) & (matrix <= 1 + 1e-9)).all()

    result = kdaug("cka", "--teacher", str(tmp_path / "missing.pt"), "--student", str(tmp_path / "schnet.pt"),
                   "--data", str(tmp_path / "data"), "--out", str(tmp_path / "bad"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"kdaug cka: error: --teacher {tmp_path / 'missing.pt'}: no such file (expected a model checkpoint)"]
    assert not (tmp_path / "bad").exists()
