"""The explain stage (paper §5.3.1): CNNs on BTD vs F&B-20 residuals of MRI fakes, SHAP, entropy."""

from __future__ import annotations

import numpy as np
import pandas as pd

from btd.detect.btd import backward, forward_backward
from btd.explain.entropy import histogram_entropy, spatial_entropy
from btd.explain.residual_cnn import fit_residual_cnn, predict_proba, shap_values


def residual_sets(detector, images: np.ndarray, fb_steps: int, seed: int) -> dict[str, np.ndarray]:
    """|x0 - x_-1| (BTD, one backward step) and |x0 - x'_-k| (k forward then k backward steps)."""
    return {
        "BTD": np.abs(backward(detector, images, 1, seed=seed)),
        f"F&B-{fb_steps}": np.abs(forward_backward(detector, images, fb_steps, seed=seed)),
    }


def split_half(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified half/half split: train the CNN on one half, explain the other."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train.append(idx[: len(idx) // 2])
        test.append(idx[len(idx) // 2 :])
    return np.concatenate(train), np.concatenate(test)


def explain_residuals(
    residuals: np.ndarray,
    labels: np.ndarray,
    seed: int,
    epochs: int,
    n_background: int,
    n_explain: int,
) -> dict:
    """Train the CNN, report held-out accuracy, SHAP the held-out fakes, and their entropies."""
    tr, te = split_half(labels, seed)
    fit = fit_residual_cnn(residuals[tr], labels[tr], epochs=epochs, seed=seed)
    acc = float(((predict_proba(fit, residuals[te]) > 0.5) == labels[te]).mean())
    rng = np.random.default_rng(seed)
    bg = residuals[rng.choice(tr, size=min(n_background, len(tr)), replace=False)]
    fakes = te[labels[te] == 1][:n_explain]
    values, explainer = shap_values(fit, bg, residuals[fakes])
    return {
        "accuracy": acc,
        "explainer": explainer,
        "shap": values,
        "residuals": residuals[fakes],
        "spatial_entropy": np.array([spatial_entropy(v) for v in values]),
        "histogram_entropy": np.array([histogram_entropy(v) for v in values]),
        "history": pd.DataFrame(fit.history),
    }
