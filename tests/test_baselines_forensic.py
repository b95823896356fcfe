"""SpliceBuster and SpliceRadar: known-answer checks and localisation of a pasted noise texture."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score

from btd.baselines import load_baseline, make_baseline, save_baseline
from btd.baselines.splicebuster import (
    SpliceBuster,
    blocks_to_pixels,
    central_window_mean,
    em_gauss_uniform,
    residuals,
    symbol_classes,
)
from btd.baselines.spliceradar import ConstrainedConv2d, SpliceRadar, em_two_gaussians
from btd.errors import BTDConfigError, BTDInputError

KINDS = ("white", "smooth", "horiz")


def textured(rng: np.random.Generator, n: int, size: int, kind: str) -> np.ndarray:
    """(n, size, size) images: smooth anatomy-like background + a scanner-like noise texture."""
    base = gaussian_filter(rng.normal(size=(n, size, size)), (0, 6, 6))
    base = 0.5 + 0.15 * base / base.std()
    z = rng.normal(size=(n, size, size))
    if kind == "smooth":  # low-pass noise (soft reconstruction kernel)
        z = gaussian_filter(z, (0, 1.0, 1.0))
    elif kind == "horiz":  # noise correlated along rows (anisotropic detector blur)
        z = gaussian_filter(z, (0, 0, 1.5))
    return np.clip(base + 0.02 * z / z.std(), 0, 1)


def spliced(rng: np.random.Generator, n: int, size: int, lo: int, hi: int) -> tuple:
    """Host images with white noise whose [lo:hi, lo:hi] square comes from a smooth-noise image."""
    host = textured(rng, n, size, "white")
    donor = textured(rng, n, size, "smooth")
    mask = np.zeros((size, size), bool)
    mask[lo:hi, lo:hi] = True
    host[:, mask] = donor[:, mask]
    return host[:, None].astype(np.float32), mask


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: extra intra-op threads only contend on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pixel_auc(maps: np.ndarray, mask: np.ndarray) -> float:
    labels = np.broadcast_to(mask, maps.shape).ravel()
    return float(roc_auc_score(labels, maps.ravel()))


# -- SpliceBuster: known answers -------------------------------------------------------------------


def test_symbol_classes_merge_mirror_and_sign():
    lut, k = symbol_classes(1)
    assert k == 25 and lut.shape == (81,)
    code = lambda d: int(np.dot(d, [27, 9, 3, 1]))  # noqa: E731
    # (0,1,2,2), its reverse (2,2,1,0), negation (2,1,0,0) and reversed negation are one class
    same = [code([0, 1, 2, 2]), code([2, 2, 1, 0]), code([2, 1, 0, 0]), code([0, 0, 1, 2])]
    assert len({int(lut[c]) for c in same}) == 1
    assert lut[code([1, 1, 1, 1])] != lut[code([0, 1, 2, 2])]


def test_third_order_residual_kills_quadratics():
    yy, xx = np.mgrid[0:20, 0:20] / 20.0
    img = (0.2 + 0.3 * xx**2 + 0.1 * yy**2 + 0.05 * xx * yy)[None]
    r_h, r_v = residuals(img)
    assert np.abs(r_h).max() < 1e-12 and np.abs(r_v).max() < 1e-12
    cubic = (xx**3)[None]
    r_h, _ = residuals(cubic)
    assert np.allclose(r_h, -6 / 20**3)  # -1, 3, -3, 1 applied to x^3 with step 1/20


def test_em_flags_far_outliers():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(1, 100, 3))
    z[0, :8] += 12.0  # 8 % far-away blocks
    mu, cov = em_gauss_uniform(z, np.ones((1, 100), bool), rng, threshold=11.3)
    assert np.abs(mu[0]).max() < 0.5  # the pristine Gaussian ignores the outliers
    d = np.einsum("ni,ij,nj->n", z[0] - mu[0], np.linalg.inv(cov[0]), z[0] - mu[0])
    assert d[:8].min() > 50 > d[8:].max()


def test_blocks_to_pixels_and_window():
    values = np.zeros((1, 2, 2))
    values[0, 1, 1] = 1.0
    valid = np.ones((1, 2, 2), bool)
    valid[0, 0, 0] = False
    m = blocks_to_pixels(values, valid, np.array([0, 4]), 4, 1, 10)
    assert m.shape == (1, 10, 10)
    assert m[0, 6, 6] == pytest.approx(1.0) and m[0, 2, 2] == 0.0  # invalid block ignored
    assert m[0, 0, 0] == 0.0  # no block covers the border
    maps = np.zeros((1, 8, 8))
    maps[0, 2:6, 2:6] = 1.0
    assert central_window_mean(maps, 0.5)[0] == pytest.approx(1.0)
    assert central_window_mean(maps, 1.0)[0] == pytest.approx(0.25)


# -- SpliceBuster: behaviour -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def splicebuster() -> SpliceBuster:
    rng = np.random.default_rng(1)
    train = textured(rng, 80, 64, "white")[:, None].astype(np.float32)
    sb = SpliceBuster()
    history = sb.fit(train, train[:4])
    assert history[0]["q_step"] > 0
    return sb


def test_splicebuster_localises_pasted_texture(splicebuster):
    rng = np.random.default_rng(2)
    x, mask = spliced(rng, 16, 64, 20, 44)
    maps = splicebuster.anomaly_map(x)
    assert maps.shape == (16, 64, 64) and maps.dtype == np.float32
    assert pixel_auc(maps, mask) > 0.9
    pristine = textured(rng, 16, 64, "white")[:, None].astype(np.float32)
    scores = np.r_[splicebuster.score(pristine), splicebuster.score(x)]
    assert roc_auc_score(np.r_[np.zeros(16), np.ones(16)], scores) > 0.9


def test_splicebuster_deterministic_and_roundtrip(splicebuster, tmp_path):
    rng = np.random.default_rng(3)
    x, _ = spliced(rng, 6, 64, 20, 44)
    s = splicebuster.score(x)
    assert np.array_equal(s, splicebuster.score(x))
    path = save_baseline(splicebuster, tmp_path / "sb.pt")
    again = load_baseline(path)
    assert isinstance(again, SpliceBuster)
    assert np.array_equal(again.score(x), s)


def test_splicebuster_small_patches_and_saturation():
    rng = np.random.default_rng(4)
    train = textured(rng, 30, 24, "white")
    train[:, :8] = 0.0  # clipped (saturated) rows, like CT lung below the window
    sb = SpliceBuster()
    sb.fit(train[:, None].astype(np.float32), train[:2, None].astype(np.float32))
    maps = sb.anomaly_map(train[:3, None].astype(np.float32))
    assert maps.shape == (3, 24, 24) and np.isfinite(maps).all()
    assert np.all(maps[:, :2] == 0.0)  # only saturated blocks cover the top rows


def test_splicebuster_errors(splicebuster):
    with pytest.raises(BTDConfigError, match="not fitted"):
        SpliceBuster().score(np.zeros((1, 1, 64, 64), np.float32))
    with pytest.raises(BTDInputError, match="shape"):
        splicebuster.score(np.zeros((2, 64, 64), np.float32))
    with pytest.raises(BTDInputError, match="64x64"):
        splicebuster.score(np.zeros((2, 1, 48, 48), np.float32))
    with pytest.raises(BTDInputError, match="no unsaturated"):
        SpliceBuster().fit(np.zeros((4, 1, 32, 32), np.float32), np.zeros((2, 1, 32, 32)))
    with pytest.raises(BTDConfigError, match="block"):
        SpliceBuster(block=40).fit(np.random.rand(4, 1, 32, 32), np.random.rand(2, 1, 32, 32))
    with pytest.raises(BTDConfigError, match="pca_dim"):
        make_baseline("splicebuster", pca_dim=0)


# -- SpliceRadar -----------------------------------------------------------------------------------


def test_constrained_conv_projection():
    torch.manual_seed(0)
    conv = ConstrainedConv2d(1, 3, 5)
    with torch.no_grad():
        conv.weight.add_(torch.randn_like(conv.weight))
    conv.project_()
    w = conv.weight.detach()
    assert torch.allclose(w[:, :, 2, 2], torch.full((3, 1), -1.0))
    assert torch.allclose(w.sum(dim=(2, 3)), torch.zeros(3, 1), atol=1e-5)  # others sum to 1
    flat = torch.full((1, 1, 9, 9), 0.7)
    assert conv(flat).abs().max() < 1e-5  # a high-pass: constant images give zero response


def test_two_gaussian_em_separates_clusters():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 60, 2))
    z[0, :15] += 8.0
    weights, means, _, resp = em_two_gaussians(z, rng)
    minority = int(np.argmin(weights[0]))
    assert weights[0, minority] == pytest.approx(0.25, abs=0.02)
    assert resp[0, :15, minority].min() > 0.99 and resp[0, 15:, minority].max() < 0.01


@pytest.fixture(scope="module")
def spliceradar() -> SpliceRadar:
    rng = np.random.default_rng(5)
    n = 60
    train = np.concatenate([textured(rng, n, 64, k) for k in KINDS])[:, None].astype(np.float32)
    meta = pd.DataFrame({"scanner": np.repeat(KINDS, n), "patient": np.arange(3 * n) % 5})
    sr = SpliceRadar(segment=12, stride=4, steps=120, seed=0)
    history = sr.fit(train, train[::6], meta, meta.iloc[::6])
    assert history[-1]["val_acc"] > 0.9  # the fingerprint tells the three textures apart
    return sr


def test_spliceradar_localises_pasted_texture(spliceradar):
    rng = np.random.default_rng(6)
    x, mask = spliced(rng, 16, 64, 20, 44)
    maps = spliceradar.anomaly_map(x)
    assert maps.shape == (16, 64, 64)
    assert pixel_auc(maps, mask) > 0.9
    pristine = textured(rng, 16, 64, "white")[:, None].astype(np.float32)
    scores = np.r_[spliceradar.score(pristine), spliceradar.score(x)]
    assert roc_auc_score(np.r_[np.zeros(16), np.ones(16)], scores) > 0.9


def test_spliceradar_deterministic_and_roundtrip(spliceradar, tmp_path):
    rng = np.random.default_rng(7)
    x, _ = spliced(rng, 4, 64, 20, 44)
    s = spliceradar.score(x)
    assert np.array_equal(s, spliceradar.score(x))
    w = spliceradar.net.constrained.weight.detach()
    assert torch.allclose(w[:, :, 2, 2], torch.full((3, 1), -1.0))  # constraint kept in training
    again = load_baseline(save_baseline(spliceradar, tmp_path / "sr.pt"))
    assert np.allclose(again.score(x), s, rtol=1e-6, atol=1e-9)


def test_spliceradar_labels_and_errors():
    rng = np.random.default_rng(8)
    x = textured(rng, 8, 24, "white")[:, None].astype(np.float32)
    sr = SpliceRadar(steps=2, batch_size=4)
    with pytest.raises(BTDInputError, match="manifest"):
        sr.fit(x, x)
    with pytest.raises(BTDInputError, match="rows"):
        sr.fit(x, x, pd.DataFrame({"scanner": ["a", "b"]}))
    with pytest.raises(BTDInputError, match="distinct"):
        sr.fit(x, x, pd.DataFrame({"scanner": ["a"] * 8, "patient": ["p"] * 8}))
    meta = pd.DataFrame({"scanner": ["a"] * 8, "patient": ["p", "q"] * 4})
    history = sr.fit(x, x, meta, meta)  # one scanner: falls back to the patient id
    assert history[-1]["label_column"] == "patient" and sr.classes == ["p", "q"]
    assert sr.anomaly_map(x[:2]).shape == (2, 24, 24)  # tiny-profile CT patch size works
    with pytest.raises(BTDConfigError, match="not fitted"):
        SpliceRadar().score(x)
    with pytest.raises(BTDConfigError, match="segment"):
        SpliceRadar(segment=22).fit(x, x, meta)
