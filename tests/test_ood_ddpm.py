"""OOD-DDPM on a tiny untrained BTD DDPM: z-scoring, U-Net call count, determinism, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from btd.baselines import load_baseline, make_baseline, save_baseline
from btd.baselines.ood_ddpm import OODDDPM, ddim_times, distances, ssim
from btd.diffusion.checkpoint import save_checkpoint
from btd.diffusion.train import TrainConfig, build_from_config
from btd.errors import BTDConfigError, BTDInputError

T_STARTS = (20, 300, 700)
STRIDE = 300  # -> 1 + 1 + 3 = 5 U-Net calls per patch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: extra intra-op threads only contend on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def config() -> TrainConfig:
    return TrainConfig(image_size=16, dim=8, dim_mults=(1, 2), seed=0)


@pytest.fixture(scope="module")
def diffusion(config):
    return build_from_config(config).eval()


@pytest.fixture(scope="module")
def val() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(0.2, 0.8, (24, 1, 16, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def fitted(diffusion, val) -> OODDDPM:
    ood = OODDDPM(diffusion=diffusion, t_starts=T_STARTS, ddim_stride=STRIDE, batch_size=10)
    history = ood.fit(val[:4], val)
    assert {(r["t"], r["metric"]) for r in history} == {
        (t, m) for t in T_STARTS for m in ("mse", "ssim")
    }
    return ood


def test_ddim_times():
    assert ddim_times(750, 250) == [750, 500, 250]
    assert ddim_times(25, 250) == [25]
    assert ddim_times(700, 300) == [700, 467, 233]
    assert ddim_times(5, 2) == [5, 3, 2]


def test_distances_known_answers():
    torch.manual_seed(0)
    a = torch.rand(3, 1, 16, 16)
    assert torch.allclose(ssim(a, a), torch.ones(3))
    d = distances(a, a + 0.1, ("mse", "ssim"))
    assert torch.allclose(d[:, 0], torch.full((3,), 0.01))
    assert (d[:, 1] > 0).all() and (d[:, 1] < 0.1).all()  # a shift barely changes structure
    noisy = (a + 0.3 * torch.randn_like(a)).clamp(0, 1)
    assert (distances(a, noisy, ("ssim",))[:, 0] > d[:, 1]).all()


def test_zscores_are_standardised_on_validation(fitted, val):
    z = fitted.z_scores(val)
    assert z.shape == (24, 3, 2)
    assert np.abs(z.mean(0)).max() < 0.1
    assert np.allclose(z.std(0, ddof=1), 1.0, atol=0.05)
    assert abs(fitted.score(val).mean()) < 0.1


def test_unet_calls_per_patch(fitted, diffusion, val):
    assert fitted.unet_calls_per_patch == 5
    seen = []
    hook = diffusion.model.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    try:
        fitted.score(val[:7])
    finally:
        hook.remove()
    assert sum(seen) == 5 * 7  # U-Net evaluations, counted per patch
    default = OODDDPM(diffusion=diffusion)
    assert default.schedule() == {25: [25], 100: [100], 250: [250], 500: [500, 250]}
    assert default.unet_calls_per_patch == 5  # the CPU-budget default
    from_yaml = OODDDPM(diffusion=diffusion, t_starts="25, 100,250,500", metrics="mse")
    assert from_yaml.t_starts == (25, 100, 250, 500) and from_yaml.metrics == ("mse",)


def test_scores_are_deterministic(fitted, val, diffusion):
    s = fitted.score(val)
    assert np.array_equal(s, fitted.score(val))
    other = OODDDPM(diffusion=diffusion, t_starts=T_STARTS, ddim_stride=STRIDE, batch_size=3)
    other.load_state(fitted.state())
    assert np.allclose(other.score(val), s, atol=1e-4)  # per-patch noise: batch size irrelevant
    reseeded = OODDDPM(diffusion=diffusion, t_starts=T_STARTS, ddim_stride=STRIDE, seed=1)
    reseeded.load_state(fitted.state())
    assert not np.allclose(reseeded.score(val), s)


class ConstantOracle(nn.Module):
    """The exact noise predictor when the data distribution is one fixed image `target`."""

    def __init__(self, diffusion, target01: torch.Tensor):
        super().__init__()
        self.self_condition = False
        self.register_buffer("target", diffusion.normalize(target01))
        self.register_buffer("sab", diffusion.sqrt_alphas_cumprod.clone())
        self.register_buffer("s1mab", diffusion.sqrt_one_minus_alphas_cumprod.clone())

    def forward(self, x, t, x_self_cond=None):
        return (x - self.sab[t].view(-1, 1, 1, 1) * self.target) / self.s1mab[t].view(-1, 1, 1, 1)


def test_out_of_distribution_patches_score_higher_with_an_oracle_model(diffusion):
    """With a perfect model of 'the data is one image', every reconstruction is that image."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:16, 0:16] / 16.0
    target = (0.3 + 0.4 * xx * yy).astype(np.float32)
    oracle = copy.deepcopy(diffusion)
    oracle.model = ConstantOracle(oracle, torch.from_numpy(target)[None, None])
    inliers = (target + rng.normal(0, 0.01, (30, 1, 16, 16))).astype(np.float32)
    outliers = inliers[:10].copy()
    outliers[:, :, 5:11, 5:11] += 0.3  # a bright blob the model never saw
    ood = OODDDPM(diffusion=oracle, t_starts=T_STARTS, ddim_stride=STRIDE)
    ood.fit(inliers[:2], inliers[10:])
    rec_err = ood.distances(inliers[10:])[:, :, 0]
    assert np.allclose(rec_err, 1e-4, rtol=0.3)  # reconstruction = target: MSE = noise variance
    assert ood.score(outliers).min() > ood.score(inliers[10:]).max() + 5


def test_checkpoint_and_roundtrip(fitted, diffusion, config, val, tmp_path):
    ckpt = tmp_path / "ddpm.pt"
    weights = diffusion.state_dict()
    save_checkpoint(ckpt, {"config": config.to_dict(), "step": 0, "model": weights, "ema": weights})
    path = save_baseline(fitted, tmp_path / "ood.pt")
    with pytest.raises(BTDConfigError, match="needs the BTD DDPM"):
        load_baseline(path)  # the model itself is not stored with the baseline
    again = load_baseline(path, diffusion=diffusion)
    assert np.array_equal(again.score(val[:5]), fitted.score(val[:5]))
    from_ckpt = make_baseline(
        "ood_ddpm", checkpoint=str(ckpt), t_starts=list(T_STARTS), ddim_stride=STRIDE
    )
    from_ckpt.load_state(fitted.state())
    assert np.allclose(from_ckpt.score(val[:5]), fitted.score(val[:5]), atol=1e-5)


def test_errors(diffusion, fitted):
    with pytest.raises(BTDConfigError, match="needs the BTD DDPM"):
        OODDDPM()
    with pytest.raises(BTDConfigError, match="t_starts"):
        OODDDPM(diffusion=diffusion, t_starts=(10, 1000))
    with pytest.raises(BTDConfigError, match="t_starts"):
        OODDDPM(diffusion=diffusion, t_starts=())
    with pytest.raises(BTDConfigError, match="metrics"):
        OODDDPM(diffusion=diffusion, metrics=("lpips",))
    with pytest.raises(BTDConfigError, match="t_starts"):
        OODDDPM(diffusion=diffusion, t_starts=7)
    with pytest.raises(BTDConfigError, match="t_starts"):
        OODDDPM(diffusion=diffusion, t_starts="10,abc")
    with pytest.raises(BTDConfigError, match="not fitted"):
        OODDDPM(diffusion=diffusion).score(np.zeros((1, 1, 16, 16), np.float32))
    with pytest.raises(BTDInputError, match="16x16"):
        fitted.score(np.zeros((1, 1, 24, 24), np.float32))
    with pytest.raises(BTDInputError, match=r"\[0, 1\]"):
        fitted.score(np.full((1, 1, 16, 16), 2.0, np.float32))
    with pytest.raises(BTDInputError, match="file not found"):
        OODDDPM(checkpoint="/nonexistent/ddpm.pt", t_starts=(10,)).distances(
            np.zeros((1, 1, 16, 16), np.float32)
        )
