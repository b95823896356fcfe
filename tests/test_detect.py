"""BTD scoring against a hand-written one-step computation from the library's formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from btd.detect import backward, forward_backward, score, window_scores
from btd.detect.btd import window_origin
from btd.diffusion import build_diffusion
from btd.errors import BTDConfigError, BTDInputError

P = 16


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models run fastest single-threaded; OpenMP spinning on a busy machine costs 10-100x."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def diffusion():
    return build_diffusion(image_size=P, dim=8, dim_mults=(1, 2), seed=0).eval()


@pytest.fixture(scope="module")
def patches() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, P, P, generator=gen)
    x[0, 0, :4, :4] = 0.0  # extremes, so the clamp to [-1, 1] is exercised
    x[1, 0, -4:, -4:] = 1.0
    return x


def hand_one_step(diffusion, x01: torch.Tensor) -> torch.Tensor:
    """x_{-1} = clamp(x/sqrt(abar_0) - sqrt(1/abar_0 - 1) eps(x, 0), -1, 1); residual x - x_{-1}."""
    x = x01 * 2 - 1
    abar0 = diffusion.alphas_cumprod[0].double()
    with torch.no_grad():
        eps = diffusion.model(x, torch.zeros(len(x), dtype=torch.long)).double()
    x_prev = (x.double() / abar0.sqrt() - (1 / abar0 - 1).sqrt() * eps).clamp(-1, 1)
    return (x.double() - x_prev)[:, 0]


def test_sigmoid_schedule_first_step(diffusion):
    # the reference numbers for the library's sigmoid schedule, T = 1000
    assert float(diffusion.alphas_cumprod[0]) == pytest.approx(0.99970, abs=1e-5)
    assert float(diffusion.posterior_mean_coef2[0]) == 0.0
    assert float(diffusion.posterior_mean_coef1[0]) == pytest.approx(1.0, abs=1e-6)


def test_score_matches_hand_computation(diffusion, patches):
    scores, maps = score(diffusion, patches)
    expected = hand_one_step(diffusion, patches).numpy()
    assert maps.shape == (len(patches), P, P)
    np.testing.assert_allclose(maps, expected, atol=2e-6, rtol=0)
    np.testing.assert_allclose(scores, (expected**2).mean(axis=(1, 2)), rtol=1e-4)
    assert np.abs(maps).max() > 0
    # pixels at 0 map to -1; where the prediction falls below -1 the clamp makes x_{-1} = x exactly
    assert (maps[0, :4, :4] == 0).any() and (maps[1, -4:, -4:] == 0).any()


def test_scores_are_deterministic_and_batch_independent(diffusion, patches):
    a, _ = score(diffusion, patches, batch_size=64)
    b, _ = score(diffusion, patches, batch_size=64)
    c, _ = score(diffusion, patches, batch_size=4)
    assert np.array_equal(a, b)
    np.testing.assert_allclose(a, c, rtol=1e-5)
    for method in ("backward", "forward_backward"):
        d, _ = score(diffusion, patches, steps=3, method=method, seed=5, batch_size=64)
        e, _ = score(diffusion, patches, steps=3, method=method, seed=5, batch_size=64)
        f, _ = score(diffusion, patches, steps=3, method=method, seed=5, batch_size=2)
        assert np.array_equal(d, e)
        np.testing.assert_allclose(d, f, rtol=1e-5)


def test_window_score_is_centre_window_mean(diffusion, patches):
    full, maps = score(diffusion, patches)
    win, _ = score(diffusion, patches, window=8)
    np.testing.assert_allclose(win, (maps[:, 4:12, 4:12].astype(np.float64) ** 2).mean(axis=(1, 2)))
    np.testing.assert_allclose(full, (maps.astype(np.float64) ** 2).mean(axis=(1, 2)))
    centres = np.array([[2, 13], [8, 8], [15, 0], [6.4, 9.6], [8, 8], [8, 8]])
    at, _ = score(diffusion, patches, window=8, centres=centres)
    # (2, 13) -> shifted inside: rows 0:8, cols 8:16; (6.4, 9.6) -> rows 2:10, cols 6:14
    assert at[0] == pytest.approx((maps[0, 0:8, 8:16].astype(np.float64) ** 2).mean())
    assert at[2] == pytest.approx((maps[2, 8:16, 0:8].astype(np.float64) ** 2).mean())
    assert at[3] == pytest.approx((maps[3, 2:10, 6:14].astype(np.float64) ** 2).mean())
    assert window_origin(96, 32, 48) == 32  # the paper's 96-px CT patch: r[32:64, 32:64]
    assert window_origin(128, 32, 64) == 48


def test_multistep_and_fb(diffusion, patches):
    one = backward(diffusion, patches, 1)
    _, maps = score(diffusion, patches)
    assert np.array_equal(one, maps)
    b3_a = backward(diffusion, patches, 3, seed=0)
    b3_b = backward(diffusion, patches, 3, seed=1)
    assert not np.allclose(b3_a, b3_b)  # posterior noise for t > 0 is seeded
    fb1 = forward_backward(diffusion, patches, 1, seed=0)
    assert not np.allclose(fb1, one)  # F&B adds forward noise even for one step
    assert np.isfinite(fb1).all() and np.isfinite(b3_a).all()


def test_bad_inputs(diffusion, patches):
    with pytest.raises(BTDInputError, match="32x32|16"):
        score(diffusion, torch.rand(2, 1, 32, 32))
    with pytest.raises(BTDInputError, match=r"\[0, 1\]"):
        score(diffusion, patches * 3)
    bad = patches.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(BTDInputError, match="NaN"):
        score(diffusion, bad)
    with pytest.raises(BTDConfigError, match="steps"):
        score(diffusion, patches, steps=0)
    with pytest.raises(BTDConfigError, match="seed"):
        score(diffusion, patches, steps=2, seed=-1)
    with pytest.raises(BTDConfigError, match="method"):
        score(diffusion, patches, method="sideways")
    with pytest.raises(BTDConfigError, match="window"):
        score(diffusion, patches, window=99)
    with pytest.raises(BTDInputError, match="centres"):
        score(diffusion, patches, window=8, centres=np.zeros((2, 2)))
    with pytest.raises(BTDInputError, match="residual_maps"):
        window_scores(np.zeros((3, 4)))
