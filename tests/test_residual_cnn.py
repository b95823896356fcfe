"""The residual CNN learns an easy task, and SHAP attributions land on the evidence."""

from __future__ import annotations

import numpy as np

from btd.explain.entropy import spatial_entropy
from btd.explain.residual_cnn import fit_residual_cnn, predict_proba, shap_values


def _toy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, 16, 16))
    y = np.arange(n) % 2
    x[y == 1, 6:10, 6:10] += 3.0  # fakes carry a bright centre residual
    return x.astype(np.float32), y


def test_cnn_learns_and_shap_focuses_on_the_centre() -> None:
    x, y = _toy(120, 0)
    fit = fit_residual_cnn(x, y, epochs=15, seed=0)
    xt, yt = _toy(40, 1)
    acc = ((predict_proba(fit, xt) > 0.5) == yt).mean()
    assert acc > 0.9
    vals, used = shap_values(fit, x[:20], xt[yt == 1][:5])
    assert vals.shape == (5, 16, 16) and used
    centre = np.abs(vals[:, 6:10, 6:10]).sum() / np.abs(vals).sum()
    assert centre > 16 / 256 * 2  # more than twice the centre's share of pixels
    assert all(spatial_entropy(v) < np.log(256) for v in vals)
