"""The score stage: BTD and every baseline score every test set into one tidy table."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from btd.attacks.testsets import VALIDATION_DIR, load_testset
from btd.data.dataset import load_patch_dataset
from btd.detect.btd import score as btd_score
from btd.detect.control import laplacian_score
from btd.detect.plus import (
    MIN_COUNT,
    VARIANTS,
    has_own_reference,
    residual_statistics,
    tail_score,
)
from btd.errors import BTDInputError
from btd.evaluate.metrics import auc
from btd.scenarios import (
    BENIGN_LABEL,
    CONTROL,
    CONTROL_TWO_SIDED,
    PAPER_SCENARIOS,
    SCENARIOS,
    attack_of,
    modality_of,
)

SCORE_COLUMNS = [
    "method",
    "scenario",
    "sample_id",
    "scanner",
    "label",
    "fake",
    "diameter_mm",
    "score",
]


def load_testsets(folder: str | Path, scenarios: tuple[str, ...] | None = None) -> dict[str, tuple]:
    """(images, masks, meta) of `scenarios`, each required; by default the paper's six (required)
    and every extra scenario the deepfakes stage wrote (the DIFF sets are optional)."""
    if scenarios is None:
        scenarios = PAPER_SCENARIOS + tuple(
            s for s in SCENARIOS if s not in PAPER_SCENARIOS and (Path(folder) / s).is_dir()
        )
    return {s: load_testset(Path(folder) / s) for s in scenarios}


def load_validation_sets(folder: str | Path) -> dict[str, tuple]:
    """The validation-patient fakes the deepfakes stage writes under `folder/validation` (the LDM
    scenarios): what BTD+'s default variant is chosen on. An empty or missing folder is an error,
    not an empty choice."""
    root = Path(folder) / VALIDATION_DIR
    names = [s for s in SCENARIOS if (root / s).is_dir()]
    if not names:
        raise BTDInputError(root, "no validation fakes (run the deepfakes stage)")
    return load_testsets(root, tuple(names))


def validation_auc(scores: pd.DataFrame) -> pd.DataFrame:
    """Plain AUC of every (method, scenario) on the validation fakes (no bootstrap: a choice, not a
    result to report with an interval)."""
    rows = [
        {"method": m, "scenario": s, "auc": auc(g["fake"].to_numpy(), g["score"].to_numpy())}
        for (m, s), g in scores.groupby(["method", "scenario"], sort=False)
    ]
    return pd.DataFrame(rows, columns=["method", "scenario", "auc"])


def choose_plus_variant(val_auc: pd.DataFrame) -> str:
    """The BTD+ variant with the highest mean validation AUC over the paper's LDM scenarios (the
    SD-faithful attack); ties go to the earlier of `btd.detect.plus.VARIANTS`."""
    paper = val_auc[val_auc["scenario"].isin(PAPER_SCENARIOS)]
    means = paper[paper["method"].isin(VARIANTS)].groupby("method")["auc"].mean()
    if means.empty:
        raise BTDInputError("validation scores", "no BTD+ scores on the paper's LDM scenarios")
    best = means.max()
    return next(v for v in VARIANTS if v in means.index and means[v] == best)


def btd_scenario_scores(
    detector, images: np.ndarray, meta: pd.DataFrame, attack: str, window: int, **kw
) -> np.ndarray:
    """BTD as in the paper: injection scored in the window at the tumour centre, removal over the patch."""
    if attack == "inject":
        centres = meta[["py", "px"]].to_numpy(dtype=np.float64)
        return btd_score(detector, images, window=window, centres=centres, **kw)[0]
    return btd_score(detector, images, **kw)[0]


def control_scenario_scores(
    images: np.ndarray, meta: pd.DataFrame, attack: str, window: int
) -> np.ndarray:
    """The Laplacian control over exactly the region BTD scores (window at the centre / patch)."""
    if attack == "inject":
        return laplacian_score(images, window, meta[["py", "px"]].to_numpy(dtype=np.float64))
    return laplacian_score(images)


def control_reference(images: np.ndarray, attack: str, window: int) -> np.ndarray:
    """The control on benign reference patches (no sites): the injection window at the patch
    centre, the whole patch for removal -- the region `control_scenario_scores` reads a test set in."""
    return laplacian_score(images, window) if attack == "inject" else laplacian_score(images)


def tidy(method: str, scenario: str, meta: pd.DataFrame, scores: np.ndarray) -> pd.DataFrame:
    """Rows of the score table for one method on one scenario."""
    return pd.DataFrame(
        {
            "method": method,
            "scenario": scenario,
            "sample_id": meta["sample_id"].to_numpy(),
            "scanner": meta["scanner"].to_numpy(),
            "label": meta["label"].to_numpy(),
            "fake": meta["fake"].to_numpy().astype(int),
            "diameter_mm": meta["diameter_mm"].to_numpy(),
            "score": np.asarray(scores, dtype=np.float64),
        },
        columns=SCORE_COLUMNS,
    )


def score_all(
    testsets: dict[str, tuple],
    detectors: dict[str, object],
    baselines: dict[str, dict[str, object]],
    windows: dict[str, int],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score every scenario with BTD, the Laplacian control and every baseline; also return seconds
    per (method, scenario)."""
    frames, timing = [], []
    for scenario, (images, _, meta) in tqdm(testsets.items(), desc="scoring test sets"):
        m = modality_of(scenario)
        t0 = time.perf_counter()
        s = btd_scenario_scores(detectors[m], images, meta, attack_of(scenario), windows[m])
        timing.append({"method": "BTD", "scenario": scenario, "seconds": time.perf_counter() - t0})
        frames.append(tidy("BTD", scenario, meta, s))
        t0 = time.perf_counter()
        s = control_scenario_scores(images, meta, attack_of(scenario), windows[m])
        timing.append(
            {"method": CONTROL, "scenario": scenario, "seconds": time.perf_counter() - t0}
        )
        frames.append(tidy(CONTROL, scenario, meta, s))
        for name, baseline in baselines.get(m, {}).items():
            t0 = time.perf_counter()
            s = baseline.score(images)
            timing.append(
                {"method": name, "scenario": scenario, "seconds": time.perf_counter() - t0}
            )
            frames.append(tidy(name, scenario, meta, s))
    return pd.concat(frames, ignore_index=True), pd.DataFrame(timing)


def _energy_and_ratio(
    detector, images: np.ndarray, centres: np.ndarray | None, window: int, attack: str
) -> tuple[np.ndarray, np.ndarray]:
    """BTD+'s two statistics (`btd.detect.plus.residual_statistics`) from one backward step."""
    return residual_statistics(btd_score(detector, images)[1], window, attack, centres)


def benign_references(
    detectors: dict[str, object], processed_dir: str | Path, windows: dict[str, int]
) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """BTD+'s benign distributions: validation patients' real patches of each task's benign class
    (never test data), per (modality, attack), with their scanners."""
    out = {}
    for m, detector in detectors.items():
        x, man = load_patch_dataset(Path(processed_dir) / m, "val")
        for attack, label in BENIGN_LABEL.items():
            sel = (man["label"] == label).to_numpy()
            images = np.asarray(x[sel])
            energy, ratio = _energy_and_ratio(detector, images, None, windows[m], attack)
            out[(m, attack)] = {
                "energy": energy,
                "ratio": ratio,
                "control": control_reference(images, attack, windows[m]),
                "scanner": man.loc[sel, "scanner"].to_numpy(),
                "patient": man.loc[sel, "patient"].to_numpy(),
            }  # fmt: skip
    return out


def reference_counts(
    references: dict[tuple[str, str], dict[str, np.ndarray]], min_count: int = MIN_COUNT
) -> pd.DataFrame:
    """What each scanner's BTD+ reference rests on: validation patients and benign patches, and
    whether it is the scanner's own (>= `min_count` patches) or the pooled one.

    Patches of one patient share dose and anatomy, so a reference from two patients is two draws of
    a scanner, however many patches it holds: this is what the calibration check is read against.
    """
    rows = []
    for (m, attack), ref in references.items():
        scanners, patients = np.asarray(ref["scanner"]), np.asarray(ref["patient"])
        for scanner in sorted(set(scanners)):
            sel = scanners == scanner
            rows.append({"modality": m, "attack": attack, "scanner": scanner,
                         "val_patients": int(len(set(patients[sel]))),
                         "benign_patches": int(sel.sum()),
                         "reference": "own" if has_own_reference(sel.sum(), min_count) else "pooled"})  # fmt: skip
    return pd.DataFrame(rows)


def btd_plus_all(
    testsets: dict[str, tuple],
    detectors: dict[str, object],
    references: dict[tuple[str, str], dict[str, np.ndarray]],
    windows: dict[str, int],
    min_count: int = MIN_COUNT,
) -> pd.DataFrame:
    """Every BTD+ variant (btd.detect.plus) on every scenario, in the score table's format, and the
    Laplacian control read the same two-sided way (`CONTROL_TWO_SIDED`, its matched floor).
    `min_count` is the per-scanner rule of the scanner-aware variants (`has_own_reference`)."""
    frames = []
    for scenario, (images, _, meta) in tqdm(testsets.items(), desc="BTD+ scoring"):
        m, attack = modality_of(scenario), attack_of(scenario)
        centres = meta[["py", "px"]].to_numpy(dtype=np.float64)
        energy, ratio = _energy_and_ratio(detectors[m], images, centres, windows[m], attack)
        ref, scanners = references[(m, attack)], meta["scanner"].to_numpy()
        variants = dict(zip(VARIANTS, (  # two-sided, scanner, self-ref
            tail_score(energy, ref["energy"]),
            tail_score(energy, ref["energy"], scanners, ref["scanner"], min_count),
            tail_score(ratio, ref["ratio"], scanners, ref["scanner"], min_count),
        ), strict=True))  # fmt: skip
        frames += [tidy(name, scenario, meta, s) for name, s in variants.items()]
        if "control" in ref:
            control = control_scenario_scores(images, meta, attack, windows[m])
            frames.append(tidy(CONTROL_TWO_SIDED, scenario, meta,
                               tail_score(control, ref["control"])))  # fmt: skip
    return pd.concat(frames, ignore_index=True)


def score_metrics(scores: pd.DataFrame) -> dict:
    """DVC metrics of the stage: how many scores, and that every one is finite."""
    return {
        "n_scores": int(len(scores)),
        "n_finite": int(np.isfinite(scores["score"].to_numpy(dtype=float)).sum()),
        "methods": int(scores["method"].nunique()),
        "scenarios": int(scores["scenario"].nunique()),
    }
