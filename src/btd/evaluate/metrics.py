"""AUC and EER, and the paper's bootstrap: 100 resamples, each balancing classes across scanners."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; label 1 = fake (the positive class)."""
    return float(roc_auc_score(labels, scores))


def eer(labels: np.ndarray, scores: np.ndarray) -> float:
    """Equal error rate: where the false-positive rate equals the false-negative rate (1 - TPR).

    Interpolates linearly between the two ROC points that bracket FPR = FNR, so the value does not
    jump with the sample size.
    """
    fpr, tpr, _ = roc_curve(labels, scores)
    fnr = 1.0 - tpr
    diff = fpr - fnr  # increasing from <= 0 to >= 0 along the curve
    i = int(np.searchsorted(diff, 0.0))
    if i == 0:
        return float(fpr[0])
    if diff[i] == diff[i - 1]:
        return float(fpr[i])
    w = -diff[i - 1] / (diff[i] - diff[i - 1])
    return float(fpr[i - 1] + w * (fpr[i] - fpr[i - 1]))


def balanced_resample(
    labels: np.ndarray, groups: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Indices of one bootstrap sample with equal class counts within every scanner.

    For each scanner holding both classes, draw (with replacement) n = min(class counts) samples of each
    class, so no scanner's class imbalance can tilt the AUC ("the number of samples per class were
    balanced across the scanners", paper section 5). Scanners with one class only are left out.
    """
    picks = []
    for g in np.unique(groups):
        pos = np.flatnonzero((groups == g) & (labels == 1))
        neg = np.flatnonzero((groups == g) & (labels == 0))
        n = min(len(pos), len(neg))
        if n == 0:
            continue
        picks += [rng.choice(pos, n, replace=True), rng.choice(neg, n, replace=True)]
    if not picks:
        raise ValueError("no scanner has samples of both classes")
    return np.concatenate(picks)


@dataclass(frozen=True)
class BootstrapResult:
    """Mean and 95% percentile interval of AUC and EER over the bootstrap iterations."""

    auc: float
    auc_lo: float
    auc_hi: float
    eer: float
    eer_lo: float
    eer_hi: float
    n_iter: int
    n_samples: int

    def as_dict(self) -> dict[str, float]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def bootstrap(
    labels: np.ndarray, scores: np.ndarray, groups: np.ndarray, n_iter: int = 100, seed: int = 0
) -> BootstrapResult:
    """AUC and EER over `n_iter` scanner-balanced bootstrap samples."""
    labels, scores, groups = np.asarray(labels), np.asarray(scores), np.asarray(groups)
    rng = np.random.default_rng(seed)
    aucs, eers = np.empty(n_iter), np.empty(n_iter)
    for i in range(n_iter):
        idx = balanced_resample(labels, groups, rng)
        aucs[i] = auc(labels[idx], scores[idx])
        eers[i] = eer(labels[idx], scores[idx])
    lo, hi = 2.5, 97.5
    return BootstrapResult(
        float(aucs.mean()), float(np.percentile(aucs, lo)), float(np.percentile(aucs, hi)),
        float(eers.mean()), float(np.percentile(eers, lo)), float(np.percentile(eers, hi)),
        n_iter, int(len(labels)),
    )  # fmt: skip


def bootstrap_table(
    scores: pd.DataFrame, by: list[str], n_iter: int = 100, seed: int = 0
) -> pd.DataFrame:
    """Bootstrap every group of a tidy score table (columns: fake, score, scanner, *by)."""
    rows = []
    for key, g in scores.groupby(by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        res = bootstrap(
            g["fake"].to_numpy(), g["score"].to_numpy(), g["scanner"].to_numpy(), n_iter, seed
        )
        rows.append({**dict(zip(by, key, strict=True)), **res.as_dict()})
    return pd.DataFrame(rows)
