"""The evaluate stage: Table 1, Table 2, ROC curves, tumour size analysis and the calibration check."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from scipy import stats

from btd.atomic import write_atomic
from btd.detect.calibrate import Calibration, calibration_path
from btd.detect.plus import VARIANTS as PLUS_VARIANTS
from btd.evaluate.analysis import normalise_at_fpr, rates_at_threshold, roc_points
from btd.evaluate.metrics import auc, bootstrap_table
from btd.scenarios import (
    CONTROL,
    CONTROL_TWO_SIDED,
    PAPER_SCENARIOS,
    attack_of,
    is_control,
    modality_of,
)
from btd.viz import save


def table1(scores: pd.DataFrame, n_iter: int, seed: int) -> pd.DataFrame:
    """Bootstrap AUC/EER of every method on every scenario (long form)."""
    return bootstrap_table(scores, ["method", "scenario"], n_iter, seed)


def table2(scores: pd.DataFrame, n_iter: int, seed: int) -> pd.DataFrame:
    """AUC/EER per scanner and scenario of BTD and every BTD+ variant (scanners with both classes)."""
    sub = scores[scores["method"].str.startswith("BTD")]
    usable = sub.groupby(["method", "scenario", "scanner"])["fake"].transform("nunique") == 2
    return bootstrap_table(sub[usable], ["method", "scenario", "scanner"], n_iter, seed)


def metrics_json(t1: pd.DataFrame) -> dict:
    """{scenario: {method: {auc, eer}}} for `dvc metrics show/diff`."""
    out: dict = {}
    for r in t1.itertuples():
        out.setdefault(r.scenario, {})[r.method] = {"auc": round(r.auc, 4), "eer": round(r.eer, 4)}
    return out


def roc_table(scores: pd.DataFrame, scenario: str) -> pd.DataFrame:
    """ROC points of every method on one scenario, labelled 'method (AUC x.xx)', plus the chance line."""
    frames = []
    for method, g in scores[scores["scenario"] == scenario].groupby("method", sort=False):
        labels, values = g["fake"].to_numpy(), g["score"].to_numpy()
        pts = roc_points(labels, values)
        frames.append(pts.assign(method=f"{method} (AUC {auc(labels, values):.2f})"))
    frames.append(
        pd.DataFrame({"fpr": [0.0, 1.0], "tpr": [0.0, 1.0], "method": "chance (AUC 0.50)"})
    )
    return pd.concat(frames, ignore_index=True)[["method", "fpr", "tpr"]]


def write_roc_data(scores: pd.DataFrame, folder: str | Path) -> None:
    """One CSV (method, fpr, tpr) per scenario for `dvc plots` (template roc_step)."""
    for scenario in sorted(scores["scenario"].unique()):
        table = roc_table(scores, scenario)
        write_atomic(Path(folder) / f"{scenario}.csv", lambda p, d=table: d.to_csv(p, index=False))


def roc_figure(scores: pd.DataFrame, path: str | Path) -> plt.Figure:
    """Fig. 4: ROC curves of every method (AUC in the legend), one panel per scenario."""
    scenarios = sorted(scores["scenario"].unique())
    cols = min(3, len(scenarios))
    rows = -(-len(scenarios) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.4 * rows), squeeze=False)
    for ax in axes.ravel()[len(scenarios) :]:
        ax.axis("off")
    for ax, scenario in zip(axes.ravel(), scenarios, strict=False):
        table = roc_table(scores, scenario)
        for label, g in table.groupby("method", sort=False):
            if label.startswith("chance"):
                ax.plot(g["fpr"], g["tpr"], ":", color="grey", label=label)
            else:
                lw = 2.4 if label.startswith("BTD ") else 1.0
                ax.step(g["fpr"], g["tpr"], where="post", lw=lw, label=label)
        ax.set_title(scenario, fontsize=10)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    save(fig, path)
    return fig


def size_analysis(
    scores: pd.DataFrame, fpr: float = 0.1, method: str = "BTD", scenarios=PAPER_SCENARIOS
) -> pd.DataFrame:
    """Fig. 7 data: each fake's score over the threshold at `fpr` of its scenario's reals, by tumour
    size, on the paper's scenarios (`scenarios`)."""
    rows = []
    keep = (scores["method"] == method) & scores["scenario"].isin(scenarios)
    for _, g in scores[keep].groupby("scenario", sort=False):
        real = g.loc[g["fake"] == 0, "score"].to_numpy()
        fakes = g[g["fake"] == 1]
        rows.append(
            fakes.assign(normalised_score=normalise_at_fpr(fakes["score"].to_numpy(), real, fpr))
        )
    return pd.concat(rows, ignore_index=True)


def size_figure(sizes: pd.DataFrame, path: str | Path) -> plt.Figure:
    """Fig. 7: tumour diameter vs normalised BTD score (> 1 = detected at the FPR), per scenario.

    Scenarios whose fakes have no diameter (CT-GAN injects a tumour of its own choosing; the site
    has no annotation) get no panel; the title says which were left out.
    """
    known = sizes.dropna(subset=["diameter_mm", "normalised_score"])
    left_out = sorted(set(sizes["scenario"]) - set(known["scenario"]))
    grid = sns.lmplot(
        data=known, x="diameter_mm", y="normalised_score", col="scenario", col_wrap=3, height=2.8,
        scatter_kws={"s": 10, "alpha": 0.6}, facet_kws={"sharey": False}, seed=0,
    )  # fmt: skip
    for ax in grid.axes.ravel():
        ax.axhline(1.0, color="red", lw=0.8, ls="--")
    grid.set_axis_labels("tumour diameter (mm)", "score / threshold at FPR")
    grid.set_titles("{col_name}")
    if left_out:
        grid.figure.suptitle(f"no diameters (not shown): {', '.join(left_out)}", fontsize=9, y=1.02)
    save(grid.figure, path)
    return grid.figure


def calibration_check(
    scores: pd.DataFrame, model_dir: str | Path, method: str = "BTD"
) -> pd.DataFrame:
    """FPR/TPR on each test set at the threshold calibrated on validation data (train_ddpm stage)."""
    rows = []
    for scenario, g in scores[scores["method"] == method].groupby("scenario"):
        attack = attack_of(scenario)
        ckpt = Path(model_dir) / modality_of(scenario) / "checkpoint.pt"
        cal = Calibration.load(calibration_path(ckpt, attack))
        rates = rates_at_threshold(g["fake"].to_numpy(), g["score"].to_numpy(), cal.threshold)
        n_real = int((g["fake"] == 0).sum())
        lo, hi = fpr_interval(cal.target_fpr, n_real)
        rows.append({"method": method, "scenario": scenario, "target_fpr": cal.target_fpr,
                     "family": cal.family,
                     "threshold": cal.threshold, "test_fpr": rates["fpr"], "test_tpr": rates["tpr"],
                     "n_real": n_real, "fpr_lo": lo, "fpr_hi": hi,
                     "holds": bool(lo <= rates["fpr"] <= hi)})  # fmt: skip
    return pd.DataFrame(rows)


#: Methods whose score is -log10 of a two-sided tail probability under validation benign data.
TAIL_METHODS = (*PLUS_VARIANTS, CONTROL_TWO_SIDED)


def tail_calibration_check(scores: pd.DataFrame, target_fpr: float) -> pd.DataFrame:
    """FPR/TPR on each test set of every tail-probability method, flagging p <= `target_fpr`.

    BTD+ and the two-sided control score -log10 p, with p the tail probability under the
    validation patients' benign scores, so their validation-calibrated threshold is -log10(target)
    by construction; this checks that it holds on the test patients, as `calibration_check` does
    for BTD's fitted CDF. Same columns as `calibration_check` (family "empirical tail").
    """
    threshold = -np.log10(target_fpr)
    rows = []
    present = [m for m in TAIL_METHODS if m in set(scores["method"])]
    for (method, scenario), g in scores[scores["method"].isin(present)].groupby(
        ["method", "scenario"], sort=False
    ):
        # flags p <= target: score > threshold less a hair, so p == target (a ratio of counts)
        # is not lost to float rounding
        rates = rates_at_threshold(g["fake"].to_numpy(), g["score"].to_numpy(), threshold - 1e-9)
        n_real = int((g["fake"] == 0).sum())
        lo, hi = fpr_interval(target_fpr, n_real)
        rows.append({"method": method, "scenario": scenario, "target_fpr": target_fpr,
                     "family": "empirical tail", "threshold": threshold,
                     "test_fpr": rates["fpr"], "test_tpr": rates["tpr"], "n_real": n_real,
                     "fpr_lo": lo, "fpr_hi": hi,
                     "holds": bool(lo <= rates["fpr"] <= hi)})  # fmt: skip
    return pd.DataFrame(rows)


def calibration_summary(calibration: pd.DataFrame) -> pd.DataFrame:
    """Per method: on how many test sets the validation threshold's test FPR holds, and the range
    of test FPRs (the table `05_evaluate` shows and `metrics/evaluate.json` records)."""
    g = calibration.groupby("method", sort=False)
    return pd.DataFrame({
        "held": g["holds"].sum().astype(int), "test_sets": g.size(),
        "fpr_min": g["test_fpr"].min(), "fpr_max": g["test_fpr"].max(),
        "fpr_mean": g["test_fpr"].mean(),
    }).reset_index()  # fmt: skip


def calibration_metrics(calibration: pd.DataFrame) -> dict:
    """{method: {held, test_sets, scenarios: {scenario: {test_fpr, test_tpr, holds}}}} for DVC."""
    out: dict = {}
    summary = calibration_summary(calibration).set_index("method")
    for method, g in calibration.groupby("method", sort=False):
        out[method] = {
            "held": int(summary.loc[method, "held"]),
            "test_sets": int(summary.loc[method, "test_sets"]),
            "scenarios": {
                r.scenario: {
                    "test_fpr": round(r.test_fpr, 4),
                    "test_tpr": round(r.test_tpr, 4),
                    "holds": int(r.holds),
                }
                for r in g.itertuples()
            },  # fmt: skip
        }
    return out


def fpr_interval(target: float, n_real: int, level: float = 0.95) -> tuple[float, float]:
    """Central binomial interval of the FPR a calibrated threshold shows on `n_real` real samples:
    a test FPR outside it says the calibration does not hold on that test set."""
    if n_real < 1:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0
    return (
        float(stats.binom.ppf(tail, n_real, target) / n_real),
        float(stats.binom.ppf(1.0 - tail, n_real, target) / n_real),
    )


def best_baselines(t1: pd.DataFrame) -> pd.DataFrame:
    """Per scenario: BTD's AUC, the no-learning control's, and the best baseline (by mean AUC)."""
    rows = []
    for scenario, g in t1.groupby("scenario"):
        btd = g[g["method"] == "BTD"].iloc[0]
        control = g[g["method"] == CONTROL]
        others = g[~g["method"].str.startswith("BTD") & ~g["method"].map(is_control).astype(bool)]
        best = others.loc[others["auc"].idxmax()] if len(others) else None
        plus = {f"{m}_auc": a for m, a in zip(g["method"], g["auc"], strict=True)
                if m.startswith("BTD+")}  # fmt: skip
        rows.append({"scenario": scenario, "BTD_auc": btd["auc"], "BTD_eer": btd["eer"],
                     "BTD_auc_lo": btd["auc_lo"], "BTD_auc_hi": btd["auc_hi"], **plus,
                     "control_auc": control["auc"].iloc[0] if len(control) else np.nan,
                     "best_baseline": None if best is None else best["method"],
                     "best_baseline_auc": np.nan if best is None else best["auc"]})  # fmt: skip
    return pd.DataFrame(rows)
