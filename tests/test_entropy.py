"""Entropy of attribution maps on known distributions."""

from __future__ import annotations

import numpy as np
import pytest

from btd.explain.entropy import histogram_entropy, spatial_entropy


def test_spatial_entropy_uniform_and_one_hot() -> None:
    assert spatial_entropy(np.ones((8, 8))) == pytest.approx(np.log(64))
    one_hot = np.zeros((8, 8))
    one_hot[3, 4] = -5.0  # sign does not matter
    assert spatial_entropy(one_hot) == 0.0
    half = np.zeros(10)
    half[:2] = 1
    assert spatial_entropy(half) == pytest.approx(np.log(2))
    assert spatial_entropy(np.zeros(5)) == 0.0


def test_histogram_entropy_known_cases() -> None:
    uniform_values = np.repeat(np.arange(20), 5).astype(float)  # one value per bin
    assert histogram_entropy(uniform_values, bins=20) == pytest.approx(np.log(20))
    two_values = np.r_[np.zeros(50), np.ones(50)]
    assert histogram_entropy(two_values, bins=20) == pytest.approx(np.log(2))
    assert histogram_entropy(np.full(10, 3.0)) == 0.0
