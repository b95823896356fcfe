"""The ablations stage: B vs F&B for several step counts (Table 3) and AUC vs backward steps d (Fig. 6)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from tqdm import tqdm

from btd.evaluate.metrics import bootstrap
from btd.pipeline.score import btd_scenario_scores
from btd.scenarios import attack_of, modality_of


def subsample(meta: pd.DataFrame, per_class: int, seed: int) -> np.ndarray:
    """Row indices with at most `per_class` real and fake samples (multi-step scoring is costly)."""
    rng = np.random.default_rng(seed)
    idx = []
    for _, g in meta.groupby("fake"):
        rows = g.index.to_numpy()
        idx.append(rng.choice(rows, size=min(per_class, len(rows)), replace=False))
    return np.sort(np.concatenate(idx))


def step_ablation(
    testsets: dict[str, tuple],
    detectors: dict[str, object],
    windows: dict[str, int],
    steps: list[int],
    methods: tuple[str, ...],
    per_class: int,
    n_iter: int,
    seed: int,
    cache: dict | None = None,
) -> pd.DataFrame:
    """AUC/EER of each (method, steps) on each scenario; method is 'backward' (B) or 'forward_backward'.

    `cache` (a dict shared between calls) keeps the scores of each (scenario, method, steps), so
    Table 3 and Fig. 6 score their common settings once (k-step scoring costs k U-Net calls).
    """
    cache = {} if cache is None else cache
    rows = []
    jobs = [(s, m, k) for s in testsets for m in methods for k in steps]
    for scenario, method, k in tqdm(jobs, desc="ablation"):
        images, _, meta = testsets[scenario]
        idx = subsample(meta, per_class, seed)
        sub_meta = meta.iloc[idx].reset_index(drop=True)
        key = (scenario, method, k, per_class, seed)
        if key not in cache:
            cache[key] = btd_scenario_scores(
                detectors[modality_of(scenario)], images[idx], sub_meta, attack_of(scenario),
                windows[modality_of(scenario)], steps=k, method=method, seed=seed,
            )  # fmt: skip
        scores = cache[key]
        res = bootstrap(
            sub_meta["fake"].to_numpy(), scores, sub_meta["scanner"].to_numpy(), n_iter, seed
        )
        rows.append({"scenario": scenario, "method": "B" if method == "backward" else "F&B",
                     "steps": k, **res.as_dict()})  # fmt: skip
    return pd.DataFrame(rows)


def metrics_json(table: pd.DataFrame) -> dict:
    """{scenario: {'B-1': auc, 'F&B-10': auc, ...}} for `dvc metrics show/diff`."""
    out: dict = {}
    for r in table.itertuples():
        out.setdefault(r.scenario, {})[f"{r.method}-{r.steps}"] = {
            "auc": round(r.auc, 4),
            "eer": round(r.eer, 4),
        }
    return out
