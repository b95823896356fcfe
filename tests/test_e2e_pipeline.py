"""End to end: `dvc repro` of the whole pipeline on the `tiny` profile, in a temporary copy of the repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from btd import profiles

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def _run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (
        f"{' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh copy of the repository (what a clone has), switched to `tiny`, reproduced once."""
    work = tmp_path_factory.mktemp("repo")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, work / f)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["BTD_ROOT"] = str(work)
    env["OMP_NUM_THREADS"] = (
        "1"  # tiny models: threads only add overhead (and oversubscribe a busy CPU)
    )
    _run(["git", "init", "-q"], work, env)
    profiles.apply("tiny", work / "params.yaml")
    _run(["dvc", "repro", "--pull"], work, env)
    return work


def test_preprocess_outputs_are_sane(tiny_run: Path) -> None:
    for modality in ("ct", "mri"):
        patches = np.load(tiny_run / f"data/processed/{modality}/patches.npy")
        manifest = pd.read_csv(tiny_run / f"data/processed/{modality}/manifest.csv")
        assert len(patches) == len(manifest) > 0
        assert 0.0 <= patches.min() and patches.max() <= 1.0 and np.isfinite(patches).all()
        assert set(manifest["label"]) == {"TM", "TB"}
        assert set(manifest["split"]) == {"train", "val", "holdout"}
        assert (manifest.groupby("patient")["split"].nunique() == 1).all()
        assert (
            len(list((tiny_run / f"data/scans/{modality}").glob("*.npz")))
            == manifest["patient"].nunique()
        )
    metrics = json.loads((tiny_run / "metrics/preprocess.json").read_text())
    assert metrics["ct"]["patients"] == 8 and metrics["mri"]["patients"] == 8
    for png in ("ct_scanners", "ct_nps", "mri_nps", "ct_counts", "mri_patches"):
        assert (tiny_run / f"reports/figures/preprocess/{png}.png").stat().st_size > 1000


def test_train_ddpm_outputs_are_sane(tiny_run: Path) -> None:
    from btd.detect.calibrate import Calibration
    from btd.diffusion.checkpoint import load_detector

    for modality in ("ct", "mri"):
        folder = tiny_run / f"models/ddpm/{modality}"
        detector, config = load_detector(folder / "checkpoint.pt")
        assert config.steps == 20 and detector.image_size[0] in (24, 32)
        log = pd.read_csv(folder / "loss_log.csv")
        assert log["step"].iloc[-1] == 20 and np.isfinite(log["val_loss"]).all()
        for task in ("inject", "remove"):
            cal = Calibration.load(folder / f"calibration_{task}.json")
            assert np.isfinite(cal.threshold) and cal.threshold > 0 and cal.target_fpr == 0.1
        metrics = json.loads((tiny_run / f"metrics/train_ddpm_{modality}.json").read_text())
        params = yaml.safe_load((tiny_run / "params.yaml").read_text())["ddpm"]
        assert metrics["steps"] == 20 and metrics["timestep_sampler"] == params["timestep_sampler"]
        assert metrics["train_seconds"] > 0 and metrics["steps_per_second"] > 0


def test_deepfake_score_and_result_outputs_are_sane(tiny_run: Path) -> None:
    from btd.attacks.testsets import SCENARIOS, load_testset

    for scenario in SCENARIOS:
        images, masks, meta = load_testset(tiny_run / "data/deepfakes" / scenario)
        assert set(meta["fake"]) == {0, 1} and len(images) == len(meta) == len(masks)
        assert (
            masks[meta["fake"].to_numpy() == 1].reshape((meta["fake"] == 1).sum(), -1).sum(1) > 0
        ).all()
    scores = pd.read_csv(tiny_run / "results/scores.csv")
    assert set(scores["scenario"]) == set(SCENARIOS)
    assert {"BTD", "AE", "OOD DDPM", "SpliceBuster"} <= set(scores["method"])
    assert np.isfinite(scores["score"]).all()
    evaluate = json.loads((tiny_run / "metrics/evaluate.json").read_text())
    for scenario in SCENARIOS:
        assert 0.0 <= evaluate[scenario]["BTD"]["auc"] <= 1.0
    roc = list((tiny_run / "metrics/roc").glob("*.csv"))
    assert len(roc) == len(SCENARIOS)
    ablations = json.loads((tiny_run / "metrics/ablations.json").read_text())
    assert {"B-1", "F&B-1", "B-3", "F&B-3"} <= set(ablations["table3"]["DIFF-MRI-Inject"])
    explain = json.loads((tiny_run / "metrics/explain.json").read_text())
    assert {"DIFF-MRI-Inject/BTD", "DIFF-MRI-Inject/F&B-2"} <= set(explain)


def test_executed_notebooks_have_outputs_and_no_errors(tiny_run: Path) -> None:
    for nb_path in sorted((tiny_run / "reports").glob("*.ipynb")):
        nb = json.loads(nb_path.read_text())
        outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
        assert outputs, f"{nb_path.name} has no outputs"
        assert not [o for o in outputs if o.get("output_type") == "error"], nb_path.name
        assert "papermill" not in nb["metadata"] or "start_time" not in nb["metadata"]["papermill"]


def test_repro_again_does_nothing(tiny_run: Path) -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    status = _run(["dvc", "status"], tiny_run, env).stdout
    assert "up to date" in status, status
    again = _run(["dvc", "repro"], tiny_run, env).stdout
    assert "didn't change, skipping" in again or "up to date" in again, again
