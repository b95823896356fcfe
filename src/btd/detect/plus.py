"""BTD+: the paper's residual, read two-sided, per scanner and against its own context.

The paper's score is one-sided (a larger one-step residual = fake) and pooled over scanners. A fake
that is *smoother* than the scanner (an in-painter that removes noise) has a smaller residual than a
real patch and is ranked as real; a pooled distribution mixes scanners whose noise levels differ more
than a fake differs from its scanner. BTD+ keeps the residual and changes how it is read:

- two-sided: the score is -log10 of the two-sided tail probability of the residual energy under the
  benign (validation) distribution, so improbably small residuals count as much as large ones;
- scanner-aware: that distribution is fitted per scanner when the scanner has at least
  `min_count` benign samples, pooled otherwise;
- self-referenced: the statistic is log(window energy / context energy) inside the same patch, which
  cancels dose and patient size; read two-sided and per scanner like the above.

The paper's score (`btd.detect.btd.score`) is left exactly as published; these are extra rows.
"""

from __future__ import annotations

import numpy as np

from btd.detect.btd import check_window, window_origin, window_scores
from btd.errors import BTDInputError

MIN_COUNT = 20  # params.yaml detect.min_scanner_count: benign samples a scanner needs for its own
# distribution (else: pooled); the library's and `btd calibrate --min-count`'s default
VARIANTS = ("BTD+ two-sided", "BTD+ scanner", "BTD+ self-ref")


def has_own_reference(n_benign: int, min_count: int = MIN_COUNT) -> bool:
    """The one rule for whether a scanner's benign samples form its own reference (else: pooled).

    Scoring, calibration and the reference table all ask this, so they cannot disagree.
    """
    if isinstance(min_count, bool) or not isinstance(min_count, int | np.integer) or min_count < 1:
        raise BTDInputError("min_count", f"must be a positive integer, got {min_count!r}")
    return int(n_benign) >= int(min_count)


def two_sided_tail(values: np.ndarray, benign: np.ndarray) -> np.ndarray:
    """Two-sided empirical tail probability of each value under the benign sample, in (0, 1].

    p = 2 min(P(B <= v), P(B >= v)) with the (k + 1) / (n + 1) estimate, so no value gets p = 0 and
    a value in the middle of the benign sample gets p = 1.
    """
    benign = np.sort(np.asarray(benign, dtype=np.float64))
    if benign.size == 0 or not np.isfinite(benign).all():
        raise BTDInputError("benign scores", "need at least one finite benign score")
    v = np.asarray(values, dtype=np.float64)
    n = benign.size
    below = np.searchsorted(benign, v, side="right")  # benign <= v
    above = n - np.searchsorted(benign, v, side="left")  # benign >= v
    p = 2.0 * np.minimum(below + 1, above + 1) / (n + 1)
    return np.minimum(p, 1.0)


def tail_score(
    values: np.ndarray,
    benign: np.ndarray,
    groups: np.ndarray | None = None,
    benign_groups: np.ndarray | None = None,
    min_count: int = MIN_COUNT,
) -> np.ndarray:
    """-log10 two-sided tail probability (higher = less like the benign data).

    With `groups` (e.g. the scanner of each value) each value is read against the benign samples of
    its own group when that group has >= `min_count` of them, else against all benign samples.
    """
    values = np.asarray(values, dtype=np.float64)
    if groups is None:
        return -np.log10(two_sided_tail(values, benign))
    groups, benign_groups = np.asarray(groups), np.asarray(benign_groups)
    benign = np.asarray(benign, dtype=np.float64)
    if benign_groups.shape != benign.shape or groups.shape != values.shape:
        raise BTDInputError("groups", "one group label per value and per benign score")
    out = -np.log10(two_sided_tail(values, benign))  # pooled fallback
    for g in np.unique(groups):
        own = benign[benign_groups == g]
        if has_own_reference(own.size, min_count):
            sel = groups == g
            out[sel] = -np.log10(two_sided_tail(values[sel], own))
    return out


def self_reference_ratio(
    residual_maps: np.ndarray, window: int, centres: np.ndarray | None = None
) -> np.ndarray:
    """log(mean r^2 in the window at each centre / mean r^2 in the rest of the patch)."""
    r2 = np.square(np.asarray(residual_maps, dtype=np.float64))
    if r2.ndim != 3:
        raise BTDInputError("residual_maps", f"expected shape (B, P, P), got {r2.shape}")
    n, h, w = r2.shape
    centres = check_window(n, h, w, window, centres)
    out = np.empty(n, dtype=np.float64)
    tiny = np.finfo(np.float64).tiny
    for i, (cy, cx) in enumerate(centres):
        y0, x0 = window_origin(h, window, cy), window_origin(w, window, cx)
        inside = np.zeros((h, w), dtype=bool)
        inside[y0 : y0 + window, x0 : x0 + window] = True
        win, ctx = r2[i][inside].mean(), r2[i][~inside].mean() if (~inside).any() else np.nan
        out[i] = np.log(max(win, tiny) / max(ctx, tiny))
    return out


def residual_statistics(
    residual_maps: np.ndarray, window: int, attack: str, centres: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The two statistics BTD+ reads from one backward step's residual maps (B, P, P).

    energy: BTD's own score region (the window at `centres`, or the patch centre without them, for
    injection; the whole patch for removal, as the paper); ratio: `self_reference_ratio` at the same
    window for injection, at the patch centre for removal (where no site is known, as in `btd
    scan`). The pipeline and the CLI both call this, so a calibration fitted by one reads the
    other's scores, and a benign reference (no centres) is read over the same region as a test set.
    """
    if attack == "inject":
        return window_scores(residual_maps, window, centres), self_reference_ratio(
            residual_maps, window, centres
        )
    return window_scores(residual_maps), self_reference_ratio(residual_maps, window)
