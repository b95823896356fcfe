"""AUC/EER and the scanner-balanced bootstrap against scikit-learn and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from btd.evaluate.metrics import auc, balanced_resample, bootstrap, bootstrap_table, eer


def test_auc_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = rng.normal(size=300) + y
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s))


def test_eer_hand_computed() -> None:
    # negatives 0.1, 0.2, 0.3, 0.4 ; positives 0.35, 0.5, 0.6, 0.7
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.35, 0.5, 0.6, 0.7])
    # threshold between 0.35 and 0.4: FPR = 1/4 (0.4), FNR = 1/4 (0.35) -> EER = 0.25
    assert eer(y, s) == pytest.approx(0.25)
    assert eer(y, np.array([0, 0, 0, 0, 1, 1, 1, 1.0])) == pytest.approx(0.0)
    assert eer(y, -s) > 0.7  # inverted detector


def test_eer_of_gaussians_matches_theory() -> None:
    from scipy.stats import norm

    rng = np.random.default_rng(1)
    n = 20000
    y = np.r_[np.zeros(n), np.ones(n)]
    s = np.r_[rng.normal(0, 1, n), rng.normal(2, 1, n)]
    assert eer(y, s) == pytest.approx(norm.cdf(-1.0), abs=0.01)  # crossing at the midpoint


def test_balanced_resample_equal_classes_per_scanner() -> None:
    rng = np.random.default_rng(2)
    groups = np.array(["a"] * 30 + ["b"] * 50 + ["c"] * 10)
    labels = np.r_[np.ones(5), np.zeros(25), np.ones(40), np.zeros(10), np.ones(10)].astype(int)
    idx = balanced_resample(labels, groups, rng)
    df = pd.DataFrame({"g": groups[idx], "y": labels[idx]})
    counts = df.groupby(["g", "y"]).size().unstack(fill_value=0)
    assert set(counts.index) == {"a", "b"}  # c has one class only
    assert (counts[0] == counts[1]).all()
    assert counts.loc["a", 1] == 5 and counts.loc["b", 1] == 10


def test_bootstrap_perfect_and_random() -> None:
    y = np.array([0, 1] * 50)
    groups = np.array(["a", "a", "b", "b"] * 25)
    perfect = bootstrap(y, y.astype(float), groups, n_iter=20)
    assert perfect.auc == 1.0 and perfect.eer == 0.0
    rng = np.random.default_rng(3)
    rand = bootstrap(y, rng.normal(size=100), groups, n_iter=100, seed=1)
    assert rand.auc_lo < 0.5 < rand.auc_hi
    assert rand.auc_lo <= rand.auc <= rand.auc_hi


def test_bootstrap_table_groups() -> None:
    df = pd.DataFrame(
        {
            "method": ["m"] * 8 + ["n"] * 8,
            "fake": [0, 1] * 8,
            "score": [10 * (i % 2) + i / 100 for i in range(16)],
            "scanner": ["s"] * 16,
        }
    )
    t = bootstrap_table(df, ["method"], n_iter=5)
    assert list(t["method"]) == ["m", "n"] and (t["auc"] == 1.0).all()
