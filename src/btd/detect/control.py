"""The no-learning control: how far a plain high-pass filter gets.

A detector that ranks patches by their residual energy may only be ranking edges and noise. The
control scores each patch by the mean squared 4-neighbour Laplacian over the same region BTD uses
(the injection window at the tumour centre, or the whole patch for removal). A learned detector has
shown something only where it beats this.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from btd.detect.btd import window_scores
from btd.errors import BTDInputError
from btd.scenarios import CONTROL

__all__ = ["CONTROL", "laplacian_maps", "laplacian_score"]


def laplacian_maps(x01: np.ndarray) -> np.ndarray:
    """(B, 1, P, P) or (B, P, P) patches -> (B, P, P) 4-neighbour Laplacian (reflecting border)."""
    x = np.asarray(x01, dtype=np.float64)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3:
        raise BTDInputError("patches", f"expected shape (B, 1, P, P), got {np.shape(x01)}")
    return np.stack([ndimage.laplace(p, mode="reflect") for p in x]) if len(x) else x


def laplacian_score(
    x01: np.ndarray, window: int | None = None, centres: np.ndarray | None = None
) -> np.ndarray:
    """Mean squared Laplacian per patch, over the patch or a `window` square at each centre."""
    return window_scores(laplacian_maps(x01), window, centres)
