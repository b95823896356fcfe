"""The ablations stage's helpers: subsampling and the shared score cache."""

from __future__ import annotations

import numpy as np
import pandas as pd

from btd.pipeline import ablations


def toy_testsets() -> dict:
    rng = np.random.default_rng(0)
    meta = pd.DataFrame({"fake": [0] * 10 + [1] * 10, "scanner": ["a", "b"] * 10})
    return {"DIFF-CT-Inject": (rng.random((20, 1, 8, 8)), None, meta)}


def test_subsample_caps_each_class():
    meta = pd.DataFrame({"fake": [0] * 7 + [1] * 3})
    idx = ablations.subsample(meta, 4, seed=0)
    assert (meta.iloc[idx]["fake"] == 0).sum() == 4 and (meta.iloc[idx]["fake"] == 1).sum() == 3
    assert np.array_equal(idx, ablations.subsample(meta, 4, seed=0))


def test_shared_cache_scores_each_setting_once(monkeypatch):
    calls = []

    def fake_scores(detector, images, meta, attack, window, steps, method, seed):
        calls.append((method, steps))
        return meta["fake"].to_numpy() * steps + np.arange(len(meta)) * 1e-3  # separable

    monkeypatch.setattr(ablations, "btd_scenario_scores", fake_scores)
    sets, dets, wins = toy_testsets(), {"ct": None}, {"ct": 4}
    cache: dict = {}
    t3 = ablations.step_ablation(
        sets, dets, wins, [1, 10], ("backward", "forward_backward"), 10, 5, 0, cache
    )
    f6 = ablations.step_ablation(sets, dets, wins, [1, 2, 10], ("backward",), 10, 5, 0, cache)
    assert sorted(calls) == sorted([("backward", 1), ("backward", 10), ("forward_backward", 1),
                                    ("forward_backward", 10), ("backward", 2)])  # fmt: skip
    again = ablations.step_ablation(sets, dets, wins, [1, 2, 10], ("backward",), 10, 5, 0)
    pd.testing.assert_frame_equal(f6, again)  # the cache changes nothing but the cost
    assert (t3["auc"] == 1.0).all()
