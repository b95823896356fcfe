"""End to end: `dvc repro` of the whole pipeline on the `tiny` profile, in a temporary copy of the repo."""

from __future__ import annotations

import json
import os
import re
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
    env["PYTHONPATH"] = str(work / "src")  # the copy's code, not the checkout's (which may change)
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
        assert metrics["steps"] == 20 and params["steps"] == 20
        assert not [k for k in metrics if "second" in k], "timings are run info, not DVC metrics"
        run = json.loads((tiny_run / f"runs/train_ddpm_{modality}.json").read_text())
        assert run["timings"]["train_seconds"] > 0 and run["timings"]["steps_per_second"] > 0
        assert run["environment"]["packages"]["torch"] and run["environment"]["cpu"]


def test_deepfake_score_and_result_outputs_are_sane(tiny_run: Path) -> None:
    from btd.attacks.testsets import load_testset
    from btd.scenarios import SCENARIOS

    for scenario in SCENARIOS:
        images, masks, meta = load_testset(tiny_run / "data/deepfakes" / scenario)
        assert set(meta["fake"]) == {0, 1} and len(images) == len(meta) == len(masks)
        assert (
            masks[meta["fake"].to_numpy() == 1].reshape((meta["fake"] == 1).sum(), -1).sum(1) > 0
        ).all()
    # fakes are written in the scanner's stored type, like the reals: one value grid
    from btd.data.preprocess import MRINormaliser
    from btd.data.scans import load_scans

    mri_scans = {v.patient: v for v in load_scans(tiny_run / "data/scans/mri")}
    for scenario in SCENARIOS:
        images, _, meta = load_testset(tiny_run / "data/deepfakes" / scenario)
        if "-CT-" in scenario:
            hu = images.astype(np.float64) * 2700.0 - 700.0
            assert np.abs(hu - np.rint(hu)).max() < 2e-3, f"{scenario}: not integer HU"
        else:
            for i in np.flatnonzero(meta["fake"].to_numpy() == 1)[:3]:
                vol = mri_scans[meta["patient"].iloc[i]].volume
                grid = set(MRINormaliser.fit(vol)(np.arange(256)).tolist())
                assert set(images[i].ravel().tolist()) <= grid, f"{scenario}: off the 8-bit grid"
    scores = pd.read_csv(tiny_run / "results/scores.csv")
    assert set(scores["scenario"]) == set(SCENARIOS)
    assert {"BTD", "AE", "OOD DDPM", "SpliceBuster", "Laplacian (control)"} <= set(scores["method"])
    assert {"BTD+ two-sided", "BTD+ scanner", "BTD+ self-ref",
            "Laplacian (control) two-sided"} <= set(scores["method"])  # fmt: skip
    assert np.isfinite(scores["score"]).all()
    evaluate = json.loads((tiny_run / "metrics/evaluate.json").read_text())
    for scenario in SCENARIOS:
        assert 0.0 <= evaluate[scenario]["BTD"]["auc"] <= 1.0
    roc = list((tiny_run / "metrics/roc").glob("*.csv"))
    assert len(roc) == len(SCENARIOS)
    ablations = json.loads((tiny_run / "metrics/ablations.json").read_text())
    assert {"B-1", "F&B-1", "B-3", "F&B-3"} <= set(ablations["table3"]["LDM-MRI-Inject"])
    explain = json.loads((tiny_run / "metrics/explain.json").read_text())
    assert {"LDM-MRI-Inject/BTD", "LDM-MRI-Inject/F&B-2"} <= set(explain)


def test_executed_notebooks_have_outputs_and_no_errors(tiny_run: Path) -> None:
    for nb_path in sorted((tiny_run / "reports").glob("*.ipynb")):
        nb = json.loads(nb_path.read_text())
        outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
        assert outputs, f"{nb_path.name} has no outputs"
        assert not [o for o in outputs if o.get("output_type") == "error"], nb_path.name
        assert "papermill" not in nb["metadata"] or "start_time" not in nb["metadata"]["papermill"]


def test_executed_reports_show_their_figures_and_no_machine_paths(tiny_run: Path) -> None:
    from btd.report.notebook import absolute_paths, image_outputs

    for nb_path in sorted((tiny_run / "reports").glob("*.ipynb")):
        nb = json.loads(nb_path.read_text())
        source = nb_path.name.replace("_ct", "").replace("_mri", "")
        draws = (
            "viz." in (tiny_run / "notebooks" / source).read_text()
            or "figure" in (tiny_run / "notebooks" / source).read_text()
        )
        if draws:
            assert image_outputs(nb) > 0, f"{nb_path.name}: draws figures but shows none"
        assert not absolute_paths(nb), f"{nb_path.name}: {absolute_paths(nb)[:3]}"
        streams = [
            o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "stream"
        ]
        assert not [o for o in streams if "\r" in "".join(o["text"])], "progress-bar redraws kept"


def _git(args: list[str], cwd: Path, env: dict) -> str:
    return _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd, env).stdout


def test_repro_again_does_nothing_and_reruns_are_identical(tiny_run: Path) -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env["BTD_ROOT"] = str(tiny_run)
    env["PYTHONPATH"] = str(tiny_run / "src")
    status = _run(["dvc", "status"], tiny_run, env).stdout
    assert "up to date" in status, status
    again = _run(["dvc", "repro"], tiny_run, env).stdout
    assert "didn't change, skipping" in again or "up to date" in again, again
    _git(["add", "-A"], tiny_run, env)
    _git(["commit", "-qm", "tiny run"], tiny_run, env)
    assert _git(["status", "--porcelain"], tiny_run, env) == ""
    # a forced re-run of a stage gives the same metrics, tables and lock (no timings in them)
    _run(["dvc", "repro", "-f", "-s", "evaluate"], tiny_run, env)
    changed = _git(["status", "--porcelain", "--", "dvc.lock", "metrics", "results"], tiny_run, env)
    assert changed == "", changed
    # a runtime knob is not a tracked param: changing it reruns nothing
    params = tiny_run / "params.yaml"
    text = params.read_text()
    params.write_text(text.replace("threads: 2", "threads: 1"))
    assert "up to date" in _run(["dvc", "status"], tiny_run, env).stdout
    params.write_text(text)


def test_readme_dvc_examples_run(tiny_run: Path) -> None:
    """Every `dvc exp run -S`, `dvc metrics show` and `dvc plots show` example in the README works."""
    import shlex

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env["BTD_ROOT"] = str(tiny_run)
    env["PYTHONPATH"] = str(tiny_run / "src")
    readme = (ROOT / "README.md").read_text()
    examples = re.findall(r"`(dvc (?:exp run -S|metrics show|plots show)[^`]*)`", readme)
    assert any(e.startswith("dvc exp run -S") for e in examples), examples
    for example in dict.fromkeys(examples):
        _run(shlex.split(example), tiny_run, env)
    assert (tiny_run / "dvc_plots" / "index.html").is_file()
