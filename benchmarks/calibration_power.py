"""How many CT patients per scanner the calibration check needs: a Monte Carlo on measured spreads.

`ct_inject_reference.py` found that CT injection's calibration misses because the benign reference
(real tumours) clusters by patient: with 3 validation and 2 holdout patients per scanner, the test
FPR of a correctly fitted threshold swings with which patients were drawn. This asks how often the
05_evaluate check (test FPR inside the 95 % binomial interval around the target) can pass at all,
per number of patients per scanner, when each patch's log10 window energy is

    patient effect (sd: between-patient) + patch noise (sd: within-patient),

with the per-scanner spreads measured on the VALIDATION reference (and, since 3 patients per
scanner estimate a between-patient spread poorly, with that spread doubled; and with none) (`spread_log10_energy` in
`results/ct_inject_reference.json`; the test sets are not read). Patients are split by the
pipeline's own `split_patients` at params.yaml's fractions; tumour patches per patient are Poisson
around the validation mean; the test set takes up to `deepfakes.n_per_class` reals; both BTD+
readings (pooled two-sided, scanner-aware) use the library's `tail_score` and flag p <= target as
05_evaluate does; each draw is judged against the binomial interval for its own number of reals.
Idealised where noted: every scanner's mean is 0 (the pooled reading would also pay for per-scanner
mean shifts; the scanner-aware one does not), the between-patient sd is the sd of patient means (it
also holds within-sd^2 / m, so it is slightly conservative), and the reals are a plain random draw
from the holdout tumours (the pipeline's `pick_sites` spreads them over scanners). No torch:

    python benchmarks/calibration_power.py    # spreads of the current split's ct_inject_reference.json
    python benchmarks/calibration_power.py --source benchmarks/results/ct_inject_reference_ct8.json \
        --out benchmarks/results/calibration_power.json   # the run that chose 16 (3 val patients per scanner)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from btd import runinfo
from btd.atomic import write_json
from btd.data.splits import SPLITS, split_patients
from btd.detect.calibrate import plus_threshold
from btd.detect.plus import tail_score
from btd.pipeline.evaluate import fpr_interval

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "results" / "ct_inject_reference.json"
OUT = HERE / "results" / "calibration_power_current.json"
PATIENTS_PER_SCANNER = (8, 10, 13, 16)
REPS = 2000


def split_counts(n: int, fractions: dict[str, float], scanners: list[str]) -> dict[str, int]:
    """Patients per split per scanner that the pipeline's split gives n patients per scanner."""
    pts = pd.DataFrame(
        [(f"{s}-{i}", s) for s in scanners for i in range(n)], columns=["patient", "scanner"]
    )
    split = pd.Series(split_patients(pts, fractions, seed=0))
    counts = split[pts.loc[pts["scanner"] == scanners[0], "patient"]].value_counts()
    return {k: int(counts.get(k, 0)) for k in SPLITS}


def draw_split(rng, spread: dict, n_patients: int, per_patient: float, tag: str) -> pd.DataFrame:
    """Log energy of every tumour patch of `n_patients` new patients per scanner."""
    rows = []
    for s, sd in spread.items():
        for p in range(n_patients):
            effect = rng.normal(0.0, sd["between_patient_sd"])
            k = max(1, rng.poisson(per_patient))
            for v in effect + rng.normal(0.0, sd["within_patient_sd"], k):
                rows.append((s, f"{tag}{s}{p}", v))
    return pd.DataFrame(rows, columns=["scanner", "patient", "log_e"])


def one_check(rng, spread, counts, per_patient, n_real, target, min_count) -> dict[str, float]:
    """Test FPR of both readings for one draw of validation and holdout patients."""
    ref = draw_split(rng, spread, counts["val"], per_patient, "v")
    hold = draw_split(rng, spread, counts["holdout"], per_patient, "h")
    test = hold.sample(n=min(n_real, len(hold)), random_state=int(rng.integers(2**31)))
    thr = plus_threshold(target) - 1e-9  # p <= target is flagged, as in tail_calibration_check
    pooled = tail_score(test["log_e"].to_numpy(), ref["log_e"].to_numpy())
    scanner = tail_score(test["log_e"].to_numpy(), ref["log_e"].to_numpy(), test["scanner"].to_numpy(),
                         ref["scanner"].to_numpy(), min_count)  # fmt: skip
    return {
        "n": len(test),
        "two-sided": float((pooled > thr).mean()),
        "scanner": float((scanner > thr).mean()),
    }


def main(source: Path = SOURCE, out: Path = OUT) -> dict:
    params = yaml.safe_load(Path("params.yaml").read_text())
    measured = yaml.safe_load(Path(source).read_text())
    spread = measured["spread_log10_energy"]
    fractions = {k: params["data"][f"split_{k}"] for k in SPLITS}
    target, min_count = (
        float(params["detect"]["target_fpr"]),
        int(params["detect"]["min_scanner_count"]),
    )
    n_real = int(params["deepfakes"]["n_per_class"])
    val_patients = sum(v["patients"] for v in spread.values())
    per_patient = measured["validation_tumours"] / val_patients
    no_cluster = {s: {"between_patient_sd": 0.0, "within_patient_sd": float(np.hypot(v["between_patient_sd"], v["within_patient_sd"]))}
                  for s, v in spread.items()}  # fmt: skip
    doubled = {
        s: {**v, "between_patient_sd": 2 * v["between_patient_sd"]} for s, v in spread.items()
    }
    variants = {"measured": spread, "between_sd_doubled": doubled, "no_patient_effect": no_cluster}
    report = {"cpu": runinfo.cpu_model(), "source": Path(source).name, "spread_log10_energy": spread, "reps": REPS, "target_fpr": target,
              "tumour_patches_per_patient": round(per_patient, 2), "min_scanner_count": min_count,
              "patients_per_scanner": {}}  # fmt: skip
    for n in PATIENTS_PER_SCANNER:
        counts = split_counts(n, fractions, sorted(spread))
        row = {"split": counts}
        for label, sp in variants.items():
            rng = np.random.default_rng(0)
            runs = pd.DataFrame(
                [
                    one_check(rng, sp, counts, per_patient, n_real, target, min_count)
                    for _ in range(REPS)
                ]
            )
            bounds = np.array([fpr_interval(target, int(k)) for k in runs["n"]])
            lo, hi = bounds[:, 0], bounds[:, 1]
            median_lo, median_hi = fpr_interval(target, int(runs["n"].median()))
            row[label] = {
                "n_real": int(runs["n"].median()),
                "interval": [round(median_lo, 3), round(median_hi, 3)],
            }
            for reading in ("two-sided", "scanner"):
                f = runs[reading]
                row[label][reading] = {"pass_rate": round(float(((f >= lo) & (f <= hi)).mean()), 3),
                                       "fpr_median": round(float(f.median()), 3),
                                       "fpr_95": [round(float(q), 3) for q in f.quantile([0.025, 0.975])]}  # fmt: skip
        report["patients_per_scanner"][str(n)] = row
        print(
            n,
            counts,
            {k: {r: row[k][r]["pass_rate"] for r in ("two-sided", "scanner")} for k in variants},
        )
    write_json(out, report)
    return report


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=SOURCE, help="a ct_inject_reference.py JSON")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    main(args.source, args.out)
