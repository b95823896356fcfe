"""Tables and curves built from the tidy score table: Table 1/2/3, ROC points, size analysis, calibration."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve


def roc_points(labels: np.ndarray, scores: np.ndarray, max_points: int = 200) -> pd.DataFrame:
    """ROC curve (fpr, tpr) thinned to at most `max_points` rows, for DVC plots and figures."""
    fpr, tpr, _ = roc_curve(labels, scores)
    if len(fpr) > max_points:
        keep = np.unique(np.r_[np.linspace(0, len(fpr) - 1, max_points).astype(int), len(fpr) - 1])
        fpr, tpr = fpr[keep], tpr[keep]
    return pd.DataFrame({"fpr": np.round(fpr, 5), "tpr": np.round(tpr, 5)})


def threshold_at_fpr(real_scores: np.ndarray, fpr: float) -> float:
    """The score above which a fraction `fpr` of real samples lies."""
    return float(np.quantile(np.asarray(real_scores), 1.0 - fpr))


def normalise_at_fpr(scores: np.ndarray, real_scores: np.ndarray, fpr: float = 0.1) -> np.ndarray:
    """Scores divided by the threshold at the given FPR (Fig. 7): > 1 means 'flagged at that FPR'."""
    return np.asarray(scores) / threshold_at_fpr(real_scores, fpr)


def rates_at_threshold(
    labels: np.ndarray, scores: np.ndarray, threshold: float
) -> dict[str, float]:
    """FPR and TPR of `score > threshold` on a labelled set (1 = fake)."""
    labels, flags = np.asarray(labels), np.asarray(scores) > threshold
    return {
        "fpr": float(flags[labels == 0].mean()) if (labels == 0).any() else float("nan"),
        "tpr": float(flags[labels == 1].mean()) if (labels == 1).any() else float("nan"),
    }


def format_interval(mean: float, lo: float, hi: float) -> str:
    """'0.91 [0.88, 0.94]'."""
    return f"{mean:.2f} [{lo:.2f}, {hi:.2f}]"


def wide_table(boot: pd.DataFrame, index: str, columns: str, metric: str = "auc") -> pd.DataFrame:
    """Methods x scenarios (or scanners) with 'mean [lo, hi]' cells."""
    cells = boot.assign(
        cell=[
            format_interval(m, lo, hi)
            for m, lo, hi in zip(
                boot[metric], boot[f"{metric}_lo"], boot[f"{metric}_hi"], strict=True
            )
        ]
    )
    return cells.pivot(index=index, columns=columns, values="cell")
