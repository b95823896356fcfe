"""Patient-level splits: no patient ever appears in two splits, every scanner appears in every split."""

from __future__ import annotations

import numpy as np
import pandas as pd

from btd.errors import BTDConfigError

SPLITS = ("train", "val", "holdout")


def check_fractions(fractions: dict[str, float], field: str = "data.split") -> dict[str, float]:
    """Fractions for train/val/holdout must be positive and sum to 1."""
    if set(fractions) != set(SPLITS):
        raise BTDConfigError(field, f"needs exactly the keys {SPLITS}, got {sorted(fractions)}")
    if any(not isinstance(v, int | float) or v <= 0 for v in fractions.values()):
        raise BTDConfigError(field, f"every fraction must be a positive number, got {fractions}")
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise BTDConfigError(field, f"fractions must sum to 1, got {sum(fractions.values()):.3f}")
    return {k: float(fractions[k]) for k in SPLITS}


def split_patients(
    patients: pd.DataFrame, fractions: dict[str, float], seed: int
) -> dict[str, str]:
    """Assign each patient (columns: patient, scanner) to a split, stratified by scanner.

    Each scanner's patients are shuffled and cut by the fractions, with at least one patient per split
    when the scanner has three or more, so per-scanner results exist in every split.
    """
    fractions = check_fractions(fractions)
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    for scanner in sorted(patients["scanner"].unique()):
        ids = sorted(patients.loc[patients["scanner"] == scanner, "patient"].unique())
        ids = [ids[i] for i in rng.permutation(len(ids))]
        n = len(ids)
        counts = {k: int(np.floor(fractions[k] * n)) for k in SPLITS}
        if n >= len(SPLITS):
            for k in SPLITS:
                counts[k] = max(counts[k], 1)
        while sum(counts.values()) < n:  # hand the remainder to the largest fraction deficit
            k = max(SPLITS, key=lambda s: fractions[s] * n - counts[s])
            counts[k] += 1
        while sum(counts.values()) > n:
            k = max(SPLITS, key=lambda s: counts[s] - fractions[s] * n)
            counts[k] -= 1
        start = 0
        for k in SPLITS:
            for pid in ids[start : start + counts[k]]:
                out[pid] = k
            start += counts[k]
    return out
