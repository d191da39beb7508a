"""A wheel built from the repository works outside it: packaged model configs, bulks and KD weights are found."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import json, sys
from pathlib import Path
import kdaug
from kdaug.data.lmdb import FrameDataset
from kdaug.models import load_model
from kdaug.models.registry import CONFIG_DIR
from kdaug.sampling.oc import DEFAULT_BULK_DB, load_bulk_db

frames = list(FrameDataset(sys.argv[1]).iter_frames())
print(json.dumps({
    "kdaug": kdaug.__file__, "configs": str(CONFIG_DIR), "bulks": str(DEFAULT_BULK_DB),
    "painn_tiny": load_model("painn-tiny").name,
    "bulk_ids_used": sorted({f.provenance.details["bulk_src_id"] for f in frames}),
    "packaged_bulk_ids": sorted(e["src_id"] for e in load_bulk_db(None)),
}))
"""


def run(args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_wheel_installed_outside_the_repo_runs_generate(tmp_path):
    source = tmp_path / "src"  # build from a copy: the build leaves build/ and *.egg-info behind
    shutil.copytree(ROOT / "kdaug", source / "kdaug", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "configs", source / "configs")
    (source / "data").mkdir()
    shutil.copy(ROOT / "data" / "bulks.pkl", source / "data")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp_path / "wheel"),
         str(source)])
    (wheel,) = (tmp_path / "wheel").glob("kdaug-*.whl")
    site = tmp_path / "site"
    run([*pip, "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    out = elsewhere / "out"
    result = run([sys.executable, "-m", "kdaug", "generate", "--config", str(ROOT / "generators" / "demo.yaml"),
                  "--teacher", "emt", "--n-systems", "1", "--max-steps", "2", "--num-workers", "0",
                  "--frame-fraction", "1", "--out", str(out)], cwd=elsewhere, env=env)
    assert json.loads(result.stdout.splitlines()[-1])["frames"] >= 1

    report = json.loads(run([sys.executable, "-c", CHECK, str(out)], cwd=elsewhere, env=env).stdout)
    for key in ("kdaug", "configs", "bulks"):
        assert Path(report[key]).is_relative_to(site), (key, report[key])  # the wheel's copy, not the repo's
    assert report["painn_tiny"] == "painn-tiny"
    assert report["bulk_ids_used"] and set(report["bulk_ids_used"]) <= set(report["packaged_bulk_ids"])
    assert len(report["packaged_bulk_ids"]) > 100  # the embedded database, not a test fixture

    # --kd n2n on a Table 7 pair (painn-big -> painn-small: lambda 100) without --kd-lambda
    teacher = elsewhere / "painn-big.pt"
    run([sys.executable, "-c", "import sys; from kdaug.models import load_model; "
         "load_model('painn-big').save(sys.argv[1])", str(teacher)], cwd=elsewhere, env=env)
    run_dir = elsewhere / "kd-run"
    run([sys.executable, "-m", "kdaug", "train", "--student", "painn-small", "--teacher", "painn-big",
         "--teacher-checkpoint", str(teacher), "--kd", "n2n", "--train", str(out), "--batch-size", "1",
         "--max-steps", "1", "--out", str(run_dir)], cwd=elsewhere, env=env)
    (record,) = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()
                 if "loss" in json.loads(line)]
    assert record["kd"] > 0
    assert (record["loss"] - record["l0"]) / record["kd"] == pytest.approx(100, rel=1e-3)
