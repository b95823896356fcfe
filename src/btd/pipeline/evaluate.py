"""The evaluate stage: Table 1, Table 2, ROC curves, tumour size analysis and the calibration check."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from btd.atomic import write_atomic
from btd.detect.calibrate import Calibration, calibration_path
from btd.evaluate.analysis import normalise_at_fpr, rates_at_threshold, roc_points
from btd.evaluate.metrics import bootstrap_table
from btd.pipeline.score import attack_of, modality_of
from btd.viz import save


def table1(scores: pd.DataFrame, n_iter: int, seed: int) -> pd.DataFrame:
    """Bootstrap AUC/EER of every method on every scenario (long form)."""
    return bootstrap_table(scores, ["method", "scenario"], n_iter, seed)


def table2(scores: pd.DataFrame, n_iter: int, seed: int, method: str = "BTD") -> pd.DataFrame:
    """BTD's AUC/EER per scanner and scenario (scanners with both classes only)."""
    sub = scores[scores["method"] == method]
    usable = sub.groupby(["scenario", "scanner"])["fake"].transform("nunique") == 2
    return bootstrap_table(sub[usable], ["scenario", "scanner"], n_iter, seed)


def metrics_json(t1: pd.DataFrame) -> dict:
    """{scenario: {method: {auc, eer}}} for `dvc metrics show/diff`."""
    out: dict = {}
    for r in t1.itertuples():
        out.setdefault(r.scenario, {})[r.method] = {"auc": round(r.auc, 4), "eer": round(r.eer, 4)}
    return out


def write_roc_data(scores: pd.DataFrame, folder: str | Path, method: str = "BTD") -> None:
    """One CSV (fpr, tpr) per scenario for DVC plots."""
    for scenario, g in scores[scores["method"] == method].groupby("scenario"):
        pts = roc_points(g["fake"].to_numpy(), g["score"].to_numpy())
        write_atomic(Path(folder) / f"{scenario}.csv", lambda p, d=pts: d.to_csv(p, index=False))


def roc_figure(scores: pd.DataFrame, path: str | Path) -> plt.Figure:
    """Fig. 4: ROC curves of every method, one panel per scenario."""
    scenarios = sorted(scores["scenario"].unique())
    fig, axes = plt.subplots(2, 3, figsize=(13, 8), squeeze=False)
    for ax, scenario in zip(axes.ravel(), scenarios, strict=False):
        for method, g in scores[scores["scenario"] == scenario].groupby("method"):
            pts = roc_points(g["fake"].to_numpy(), g["score"].to_numpy())
            ax.plot(pts["fpr"], pts["tpr"], lw=2.2 if method == "BTD" else 1, label=method)
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_title(scenario)
        ax.set_xlabel("FPR")
        ax.set_ylabel("TPR")
    axes.ravel()[0].legend(fontsize=7)
    save(fig, path)
    return fig


def size_analysis(scores: pd.DataFrame, fpr: float = 0.1, method: str = "BTD") -> pd.DataFrame:
    """Fig. 7 data: each fake's score over the threshold at `fpr` of its scenario's reals, by tumour size."""
    rows = []
    for _, g in scores[scores["method"] == method].groupby("scenario"):
        real = g.loc[g["fake"] == 0, "score"].to_numpy()
        fakes = g[g["fake"] == 1]
        rows.append(
            fakes.assign(normalised_score=normalise_at_fpr(fakes["score"].to_numpy(), real, fpr))
        )
    return pd.concat(rows, ignore_index=True)


def size_figure(sizes: pd.DataFrame, path: str | Path) -> plt.Figure:
    """Tumour diameter vs normalised BTD score (> 1 = detected at the FPR), per scenario."""
    grid = sns.lmplot(
        data=sizes, x="diameter_mm", y="normalised_score", col="scenario", col_wrap=3, height=2.8,
        scatter_kws={"s": 10, "alpha": 0.6}, facet_kws={"sharey": False},
    )  # fmt: skip
    for ax in grid.axes.ravel():
        ax.axhline(1.0, color="red", lw=0.8, ls="--")
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
        rows.append({"scenario": scenario, "target_fpr": cal.target_fpr, "family": cal.family,
                     "threshold": cal.threshold, "test_fpr": rates["fpr"], "test_tpr": rates["tpr"]})  # fmt: skip
    return pd.DataFrame(rows)


def best_baselines(t1: pd.DataFrame) -> pd.DataFrame:
    """Per scenario: BTD's AUC and the best baseline (by mean AUC) beside it."""
    rows = []
    for scenario, g in t1.groupby("scenario"):
        btd = g[g["method"] == "BTD"].iloc[0]
        others = g[g["method"] != "BTD"]
        best = others.loc[others["auc"].idxmax()] if len(others) else None
        rows.append({"scenario": scenario, "BTD_auc": btd["auc"], "BTD_eer": btd["eer"],
                     "best_baseline": None if best is None else best["method"],
                     "best_baseline_auc": np.nan if best is None else best["auc"]})  # fmt: skip
    return pd.DataFrame(rows)
