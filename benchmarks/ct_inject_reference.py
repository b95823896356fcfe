"""Why BTD+'s CT-injection calibration misses: what the benign reference (real tumours) varies with.

The calibration check (05_evaluate) finds every BTD+ variant's test FPR on the CT injection sets
above the 95 % interval around the target. The last note guessed tumour size; this measures it and
the alternative, the patient:

- Spearman of the one-step window energy (BTD's injection statistic) with the tumour diameter, on
  the validation reference (real TM patches of validation patients);
- the spread of per-patient means against the spread inside a patient (log10 energy), per scanner;
- the shift of the test reals against that reference, per scanner;
- a patient-normalised reading: each tumour's log energy minus the median over the SAME patient's
  healthy (TB) patches, which a scan reader has; the test FPR of the pooled two-sided reading of
  raw and normalised statistics at the validation threshold;
- how many holdout patients the test FPR rests on: the flags' intra-patient correlation, the
  design effect it implies, and a 95 % interval of the test FPR from resampling patients (the
  binomial interval of the calibration check treats the 54 reals as independent draws).

A diagnosis only: the test reals are read to explain a failure, nothing here is chosen on them.
Run from the repo root after the score stage, alone (one torch job):

    python benchmarks/ct_inject_reference.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from scipy.stats import spearmanr

from btd import runinfo
from btd.atomic import write_json
from btd.attacks.testsets import load_testset
from btd.data.dataset import load_patch_dataset
from btd.detect.plus import tail_score
from btd.diffusion.checkpoint import load_detector
from btd.pipeline.score import _energy_and_ratio

OUT = Path(__file__).resolve().parent / "results" / "ct_inject_reference.json"
SCENARIOS = ("CTGAN-CT-Inject", "LDM-CT-Inject")


def log_energy(detector, split: str, window: int) -> pd.DataFrame:
    """Manifest rows of one CT split with log10 window energy at the patch centre."""
    x, man = load_patch_dataset(Path("data/processed/ct"), split)
    energy, _ = _energy_and_ratio(detector, np.asarray(x), None, window, "inject")
    return man.assign(log_e=np.log10(energy))


def flags_at_validation_threshold(ref: np.ndarray, test: np.ndarray, target: float) -> np.ndarray:
    """Which test reals the pooled two-sided reading flags at the threshold that gives `target` on
    `ref` (their mean is the test FPR)."""
    thr = np.quantile(tail_score(ref, ref), 1.0 - target)
    return tail_score(test, ref) > thr


def patient_clustering(flags: np.ndarray, patients: np.ndarray, seed: int = 0) -> dict:
    """Intra-patient correlation of the flags (one-way ANOVA estimator), the design effect
    1 + (m - 1) ICC at the mean patches per patient m, and the patient-bootstrap 95 % interval of
    the flag rate (2,000 resamples of whole patients)."""
    df = pd.DataFrame({"f": flags.astype(float), "p": patients})
    g = df.groupby("p")["f"]
    k, n, m = g.ngroups, len(df), len(df) / g.ngroups
    msb = (g.size() * (g.mean() - df["f"].mean()) ** 2).sum() / max(k - 1, 1)
    msw = ((df["f"] - g.transform("mean")) ** 2).sum() / max(n - k, 1)
    icc = float((msb - msw) / (msb + (m - 1) * msw)) if msb + (m - 1) * msw > 0 else 0.0
    rng, ids = np.random.default_rng(seed), g.size().index.to_numpy()
    sums, sizes = g.sum().to_numpy(), g.size().to_numpy()
    draws = rng.integers(0, k, (2000, k))
    rates = sums[draws].sum(1) / sizes[draws].sum(1)
    return {"patients": int(len(ids)), "patches_per_patient": round(m, 1), "icc": round(icc, 3),
            "design_effect": round(1 + (m - 1) * max(icc, 0.0), 2),
            "fpr_patient_bootstrap_95": [round(float(q), 3) for q in np.quantile(rates, [0.025, 0.975])]}  # fmt: skip


def main() -> dict:
    torch.manual_seed(0)
    params = yaml.safe_load(Path("params.yaml").read_text())["detect"]
    window, target = int(params["ct_window"]), float(params["target_fpr"])
    detector = load_detector("models/ddpm/ct/checkpoint.pt")[0]
    val, hold = log_energy(detector, "val", window), log_energy(detector, "holdout", window)
    ref = val[val["label"] == "TM"]
    healthy_val = val[val["label"] == "TB"].groupby("patient")["log_e"].median()
    healthy_hold = hold[hold["label"] == "TB"].groupby("patient")["log_e"].median()
    rho = spearmanr(ref["log_e"], ref["diameter_mm"])
    per_patient = ref.groupby(["scanner", "patient"])["log_e"].agg(["size", "mean", "std"])
    spread = per_patient.groupby("scanner").agg(
        patients=("mean", "size"), between_patient_sd=("mean", "std"),
        within_patient_sd=("std", "mean"))  # fmt: skip
    report = {"cpu": runinfo.cpu_model(), "target_fpr": target, "window": window,
              "validation_tumours": int(len(ref)),
              "spearman_energy_vs_diameter": {"rho": round(float(rho.statistic), 3),
                                              "p": round(float(rho.pvalue), 3)},
              "spread_log10_energy": spread.round(3).to_dict(orient="index"), "scenarios": {}}  # fmt: skip
    norm_ref = (ref["log_e"] - ref["patient"].map(healthy_val)).to_numpy()
    for name in SCENARIOS:
        _, _, meta = load_testset(Path("data/deepfakes") / name)
        reals = meta[meta["fake"] == 0].reset_index(drop=True)
        key = ["patient", "slice", "cy", "cx"]
        test = reals.merge(hold[key + ["log_e"]], on=key, how="left")
        if test["log_e"].isna().any():
            raise SystemExit(f"{name}: a real sample is not in the holdout manifest")
        shift = test.groupby("scanner")["log_e"].mean() - ref.groupby("scanner")["log_e"].mean()
        norm_test = (test["log_e"] - test["patient"].map(healthy_hold)).to_numpy()
        raw = flags_at_validation_threshold(
            ref["log_e"].to_numpy(), test["log_e"].to_numpy(), target
        )
        report["scenarios"][name] = {
            "n_real": int(len(test)),
            "spearman_energy_vs_diameter": round(float(spearmanr(test["log_e"], test["diameter_mm"]).statistic), 3),
            "mean_shift_log10_test_minus_val": shift.round(3).to_dict(),
            "test_fpr_raw": round(float(raw.mean()), 3),
            "test_fpr_patient_normalised": round(float(flags_at_validation_threshold(norm_ref, norm_test, target).mean()), 3),
            "raw_reading_by_patient": patient_clustering(raw, test["patient"].to_numpy()),
        }  # fmt: skip
    write_json(OUT, report)
    print(yaml.safe_dump(report, sort_keys=False))
    return report


if __name__ == "__main__":
    main()
