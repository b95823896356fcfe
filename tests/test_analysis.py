"""Known answers for the evaluation helpers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from btd.evaluate.analysis import (
    normalise_at_fpr,
    rates_at_threshold,
    roc_points,
    threshold_at_fpr,
    wide_table,
)


def test_threshold_and_rates() -> None:
    real = np.arange(100.0)
    t = threshold_at_fpr(real, 0.1)
    assert (real > t).mean() == pytest.approx(0.1, abs=0.01)
    labels = np.r_[np.zeros(100), np.ones(10)]
    scores = np.r_[real, np.full(10, 1000.0)]
    r = rates_at_threshold(labels, scores, t)
    assert r["tpr"] == 1.0 and r["fpr"] == pytest.approx(0.1, abs=0.01)
    assert normalise_at_fpr(np.array([t, 2 * t]), real, 0.1) == pytest.approx([1.0, 2.0])


def test_roc_points_thinned_and_monotone() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    pts = roc_points(y, rng.normal(size=2000) + y, max_points=50)
    assert len(pts) <= 51 and pts["fpr"].is_monotonic_increasing
    assert pts.iloc[0]["fpr"] == 0 and pts.iloc[-1]["tpr"] == 1


def test_wide_table_cells() -> None:
    boot = pd.DataFrame(
        {
            "method": ["a", "a"],
            "scenario": ["x", "y"],
            "auc": [0.9, 0.5],
            "auc_lo": [0.8, 0.4],
            "auc_hi": [0.95, 0.6],
        }
    )
    t = wide_table(boot, "method", "scenario")
    assert t.loc["a", "x"] == "0.90 [0.80, 0.95]"
