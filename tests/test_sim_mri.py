"""Known-answer physics checks of the virtual breast MRI scanners and the breast phantom."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from btd.data.simulate import mri, mri_phantom
from btd.data.simulate.protocols import load_protocols
from btd.errors import BTDConfigError, BTDInputError

ROOT = Path(__file__).resolve().parents[1]
SCANNERS = load_protocols(ROOT / "data/raw/virtual_scanners/mri.yaml", "mri")
N = 128  # grid for the fast physics checks
FULL = 256  # default-profile grid: every scanner's real matrix fits (no clipping to the grid)


def _scanner(name: str = "aster-15", **changes) -> mri.MRIScanner:
    return dataclasses.replace(SCANNERS[name], **changes)


def _uniform_slice(n: int = N, label: int = mri.FAT, half: float = 0.35) -> dict[str, np.ndarray]:
    """A centred square of one tissue in air (edges far from the wrap-around)."""
    lab = np.zeros((n, n), np.uint8)
    lo, hi = int(n * (0.5 - half)), int(n * (0.5 + half))
    lab[lo:hi, lo:hi] = label
    return {k: mri_phantom._LUT[lab, i].copy() for i, k in enumerate(mri.MAP_KEYS)}


def _air_magnitudes(scanner, n: int = FULL, n_images: int = 2, step: int = 4) -> np.ndarray:
    """Pure-noise magnitudes of an empty field of view, thinned so samples are ~independent
    (zero-filled or filtered k-space correlates neighbouring pixels)."""
    air = _uniform_slice(n, label=mri.AIR)
    rng = np.random.default_rng(1)
    flat = np.ones((n, n), np.float32)
    imgs = [mri.scan_mri_slice(air, scanner, rng, 1.4, bias=flat) for _ in range(n_images)]
    return np.concatenate([im[::step, ::step].ravel() for im in imgs]).astype(np.float64)


def _noise_rois(scanner, roi: int = 16, n_images: int = 4, n: int = N) -> tuple[np.ndarray, float]:
    """Noise-only ROIs (noisy minus noise-free reconstruction) inside a uniform fat square."""
    maps = _uniform_slice(n)
    flat = np.ones((n, n), np.float32)
    rng = np.random.default_rng(7)
    clean = mri.scan_mri_slice(maps, scanner, rng, 1.4, bias=flat, noise=False)
    c0, c1 = n // 2 - 32, n // 2 + 32
    rois = []
    for _ in range(n_images):
        diff = mri.scan_mri_slice(maps, scanner, rng, 1.4, bias=flat) - clean
        win = diff[c0:c1, c0:c1]
        rois += [
            win[i : i + roi, j : j + roi] for i in range(0, 64, roi) for j in range(0, 64, roi)
        ]
    return np.stack(rois).astype(np.float64), float(clean[c0:c1, c0:c1].mean())


# ------------------------------------------------------------------ noise distributions
def test_background_one_coil_is_rayleigh():
    sc = SCANNERS["aster-15"]
    assert sc.n_coils == 1 and sc.matrix < FULL  # truncated k-space: correlated noise
    sigma = mri.image_noise_std(sc, FULL)
    x = _air_magnitudes(sc)
    assert stats.kstest(x, stats.rayleigh(scale=sigma).cdf).pvalue > 0.01
    assert x.mean() == pytest.approx(stats.rayleigh.mean(scale=sigma), rel=0.03)
    # the test has power: a 2-coil chi or a 20 % wrong sigma is rejected outright
    assert stats.kstest(x, stats.chi(df=4, scale=sigma).cdf).pvalue < 1e-6
    assert stats.kstest(x, stats.rayleigh(scale=1.2 * sigma).cdf).pvalue < 1e-6


@pytest.mark.parametrize("name", ["aster-30", "boreal-15", "boreal-30"])
def test_background_multicoil_is_central_chi(name):
    sc = SCANNERS[name]
    assert sc.n_coils > 1
    sigma = mri.image_noise_std(sc, FULL)
    x = _air_magnitudes(sc)
    law = stats.chi(df=2 * sc.n_coils, scale=sigma)
    assert stats.kstest(x, law.cdf).pvalue > 0.01
    assert x.mean() == pytest.approx(law.mean(), rel=0.03)
    assert stats.kstest(x, stats.rayleigh(scale=sigma).cdf).pvalue < 1e-6


def test_background_sigma_of_a_real_phantom_matches_theory():
    """Air above the breasts of a scanned phantom: Rayleigh with the predicted sigma."""
    maps, _ = mri.make_breast_phantom(np.random.default_rng(3), 1, N, 2.8, 2.0, 0)
    sc = SCANNERS["aster-15"]
    rng = np.random.default_rng(0)
    img = mri.scan_mri_slice({k: maps[k][0] for k in mri.MAP_KEYS}, sc, rng, 2.8)
    corner = np.concatenate([img[:12, :12].ravel(), img[:12, -12:].ravel()])
    assert (maps["label"][0][:12, :12] == mri.AIR).all()
    sigma_hat = np.sqrt(np.mean(corner.astype(np.float64) ** 2) / 2)  # Rayleigh ML estimate
    assert sigma_hat == pytest.approx(mri.image_noise_std(sc, N), rel=0.12)


def test_noise_std_scales_linearly_with_noise_sigma():
    base = _scanner("aster-15", bias_strength=0.0)
    stds = []
    for factor in (1.0, 2.0, 4.0):
        sc = dataclasses.replace(base, noise_sigma=base.noise_sigma * factor)
        rois, _ = _noise_rois(sc)
        stds.append(rois.std())
    assert stds[1] / stds[0] == pytest.approx(2.0, rel=0.15)
    assert stds[2] / stds[0] == pytest.approx(4.0, rel=0.15)
    # at high SNR the magnitude noise is Gaussian with the per-channel sigma
    assert stds[0] == pytest.approx(mri.image_noise_std(base, N), rel=0.1)


def test_tissue_snr_follows_field_and_sigma():
    """noise_sigma is relative to fat at 1.5 T: fat SNR = 1/noise_sigma at 1.5 T, ~2x at 3 T."""
    sc = _scanner("aster-15", bias_strength=0.0, matrix=N)
    rois, mean = _noise_rois(sc)
    assert mean / rois.std() == pytest.approx(1.0 / sc.noise_sigma, rel=0.1)
    hi = dataclasses.replace(sc, field_T=3.0)
    rois3, mean3 = _noise_rois(hi)
    ratio = (mean3 / rois3.std()) / (mean / rois.std())
    assert 1.5 < ratio < 2.1  # signal x2, partly undone by the longer T1 at 3 T


# ------------------------------------------------------------------ k-space sampling
def _edge_width(profile: np.ndarray) -> float:
    """10-90 % rise distance (pixels) of a rising edge, linearly interpolated."""
    p = (profile - profile[:8].mean()) / (profile[-8:].mean() - profile[:8].mean())
    x = np.arange(len(p))
    return float(np.interp(0.9, p, x) - np.interp(0.1, p, x))


def _edge_scan(scanner) -> np.ndarray:
    maps = _uniform_slice()
    flat = np.ones((N, N), np.float32)
    return mri.scan_mri_slice(maps, scanner, np.random.default_rng(0), 1.4, bias=flat, noise=False)


def test_truncation_blurs_edges_and_rings():
    lo = int(N * 0.15)
    full = _edge_scan(_scanner(matrix=N))
    small = _edge_scan(_scanner(matrix=48))
    row = N // 2
    w_full = _edge_width(full[row, lo - 12 : lo + 12])
    w_small = _edge_width(small[row, lo - 12 : lo + 12])
    assert w_small > 1.8 * w_full
    plateau = small[row, N // 2]
    assert small[row, lo : lo + 10].max() > 1.05 * plateau  # Gibbs overshoot
    hamming = _edge_scan(_scanner(matrix=48, filter="hamming"))
    assert hamming[row, lo : lo + 10].max() < 1.02 * hamming[row, N // 2]
    assert _edge_width(hamming[row, lo - 12 : lo + 12]) > w_small


def test_partial_fourier_blurs_along_phase_only():
    lo, mid = int(N * 0.15), N // 2
    pf1 = _edge_scan(_scanner(matrix=64))
    pf6 = _edge_scan(_scanner(matrix=64, partial_fourier=0.6))
    col_w = lambda im: _edge_width(im[lo - 12 : lo + 12, mid])  # noqa: E731  (phase: rows)
    row_w = lambda im: _edge_width(im[mid, lo - 12 : lo + 12])  # noqa: E731
    assert col_w(pf6) > 1.15 * col_w(pf1)
    assert row_w(pf6) == pytest.approx(row_w(pf1), rel=0.1)


@pytest.mark.parametrize("filt", ["hamming", "tukey"])
def test_apodisation_lowers_noise_as_predicted(filt):
    plain = _scanner(bias_strength=0.0)
    filtered = dataclasses.replace(plain, filter=filt)
    s_plain, _ = _noise_rois(plain)
    s_filt, _ = _noise_rois(filtered)
    assert s_filt.std() < 0.9 * s_plain.std()
    predicted = mri.image_noise_std(filtered, N) / mri.image_noise_std(plain, N)
    assert s_filt.std() / s_plain.std() == pytest.approx(predicted, rel=0.1)


def test_partial_fourier_noise_follows_sampled_fraction():
    plain = _scanner(bias_strength=0.0, matrix=N)
    pf = dataclasses.replace(plain, partial_fourier=0.625)
    assert mri.image_noise_std(pf, N) / mri.image_noise_std(plain, N) == pytest.approx(
        np.sqrt(0.625), rel=0.02
    )
    air_plain, air_pf = _air_magnitudes(plain, N), _air_magnitudes(pf, N)
    assert air_pf.mean() / air_plain.mean() == pytest.approx(np.sqrt(0.625), rel=0.05)


def test_scanners_have_measurably_different_noise():
    try:
        from btd.data.simulate.nps import nps_summary

        summary = lambda rois: nps_summary(rois, 1.4)  # noqa: E731
    except ImportError:  # pragma: no cover - the shared NPS helper is missing
        summary = _inline_nps_summary
    feats = {}
    for name, sc in SCANNERS.items():
        rois, mean = _noise_rois(dataclasses.replace(sc, bias_strength=0.0), n_images=3, n=FULL)
        s = summary(rois)
        feats[name] = (s["std"] / mean, s["mean_freq"])
    names = sorted(feats)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            (ra, fa), (rb, fb) = feats[a], feats[b]
            rel_noise = abs(ra - rb) / min(ra, rb)
            rel_freq = abs(fa - fb) / min(fa, fb)
            assert max(rel_noise, rel_freq) > 0.15, (a, b, feats[a], feats[b])


def _inline_nps_summary(rois: np.ndarray) -> dict[str, float]:
    rois = rois - rois.mean(axis=(1, 2), keepdims=True)
    nps = (np.abs(np.fft.fft2(rois)) ** 2).mean(0)
    f = np.fft.fftfreq(rois.shape[-1], d=1.4)
    radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    return {"std": float(rois.std()), "mean_freq": float((radius * nps).sum() / nps.sum())}


# ------------------------------------------------------------------ signal model
def test_gre_signal_known_answers():
    sc = _scanner(tr_ms=5.0, te_ms=0.0, flip_deg=12.0, field_T=1.5)
    one = np.ones(1, np.float32)
    # fully relaxed (T1 << TR) and no T2* decay: S = PD sin(flip)
    s = mri.gre_signal(one, one * 1e-3, one * 1e6, sc)
    assert s[0] == pytest.approx(np.sin(np.deg2rad(12.0)), rel=1e-4)
    # the Ernst angle maximises the signal
    t1 = 800.0
    ernst = np.rad2deg(np.arccos(np.exp(-5.0 / t1)))
    flips = [ernst * f for f in (0.7, 1.0, 1.3)]
    sig = [
        mri.gre_signal(one, one * t1, one * 1e6, _scanner(te_ms=0.0, flip_deg=a))[0] for a in flips
    ]
    assert sig[1] > sig[0] and sig[1] > sig[2]
    # enhancing mass brighter than fibroglandular tissue
    pd, t1m, t2 = (np.float32(v) for v in mri.TISSUE_PARAMS[mri.MASS])
    pdg, t1g, t2g = (np.float32(v) for v in mri.TISSUE_PARAMS[mri.FGT])
    assert mri.gre_signal(pd, t1m, t2, sc) > 2 * mri.gre_signal(pdg, t1g, t2g, sc)


def test_bias_field_peak_to_peak_and_smoothness():
    b = mri.bias_field(np.random.default_rng(0), (4, 64, 64), 0.3, 1.4, 2.0)
    assert b.max() - b.min() == pytest.approx(0.3, rel=1e-4)
    assert b.mean() == pytest.approx(1.0, abs=0.1)
    assert np.abs(np.diff(b, axis=2)).max() < 0.02  # smooth in-plane
    assert np.abs(np.diff(b, axis=0)).max() < 0.05  # smooth along z


def test_coil_maps_normalised():
    for n_coils in (1, 4, 16):
        c = mri.coil_maps(n_coils, 64)
        assert c.shape == (n_coils, 64, 64) and c.dtype == np.complex64
        rss = np.sqrt((np.abs(c) ** 2).sum(0))
        u = (np.arange(64) + 0.5) / 64 - 0.5  # FOV units, as documented in coil_maps
        centre = (np.abs(u)[None, :] < 0.3) & (np.abs(u + 0.05)[:, None] < 0.3)
        assert rss[centre].mean() == pytest.approx(1.0, rel=1e-4)
        if n_coils > 1:  # loop coils: bright near the elements, darker deep in the body
            assert rss.max() > 1.5 * rss[32, 32]


# ------------------------------------------------------------------ phantom
@pytest.fixture(scope="module")
def phantom():
    return mri.make_breast_phantom(np.random.default_rng(11), 6, 128, 2.8, 2.0, 3)


def test_phantom_shapes_and_ranges(phantom):
    maps, tumours = phantom
    assert maps["label"].dtype == np.uint8 and maps["breast"].dtype == bool
    for k in mri.MAP_KEYS:
        assert maps[k].shape == (6, 128, 128) and maps[k].dtype == np.float32
        assert np.isfinite(maps[k]).all()
    assert 0 <= maps["pd"].min() and maps["pd"].max() < 1.2 and maps["t1"].min() > 0
    present = set(np.unique(maps["label"]))
    assert {mri.AIR, mri.FAT, mri.FGT, mri.SKIN, mri.MUSCLE, mri.MASS} <= present
    assert maps["breast"].sum() > 1000
    assert len(tumours) == 3


def test_tumours_sit_inside_breast_tissue(phantom):
    maps, tumours = phantom
    for t in tumours:
        assert 5.0 <= t.diameter_mm <= 40.0 and t.kind in mri.MASS_KINDS
        assert -0.5 <= t.z <= 5.5
        idx = (round(t.z), round(t.y), round(t.x))
        assert maps["breast"][idx]
        assert maps["label"][idx] in (mri.MASS, mri.NECROSIS)
        if maps["label"][idx] == mri.MASS:
            assert maps["t1"][idx] < mri.TISSUE_PARAMS[mri.FAT][1]  # enhancing
    # masses never replace skin, muscle or the thorax
    mass = np.isin(maps["label"], (mri.MASS, mri.NECROSIS))
    assert maps["breast"][mass].all()


def test_phantom_deterministic_and_varied():
    a, ta = mri.make_breast_phantom(np.random.default_rng(5), 3, 64, 5.6, 2.0, 2)
    b, tb = mri.make_breast_phantom(np.random.default_rng(5), 3, 64, 5.6, 2.0, 2)
    c, _ = mri.make_breast_phantom(np.random.default_rng(6), 3, 64, 5.6, 2.0, 2)
    for k in (*mri.MAP_KEYS, "label"):
        np.testing.assert_array_equal(a[k], b[k])
    assert ta == tb
    assert (a["label"] != c["label"]).mean() > 0.02


def test_phantom_is_smooth_along_z(phantom):
    maps, _ = phantom
    body = maps["label"] != mri.AIR
    changed = (body[1:] != body[:-1]).mean(axis=(1, 2))
    assert changed.max() < 0.02  # body outline moves only a little between 2 mm slices


def test_bad_arguments_raise_readable_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(BTDConfigError, match="mass_diameter_mm"):
        mri.make_breast_phantom(rng, 2, 64, 1.4, 2.0, 1, (10.0, 5.0))
    with pytest.raises(BTDConfigError, match="size"):
        mri.make_breast_phantom(rng, 2, 8, 1.4, 2.0, 1)
    with pytest.raises(BTDInputError, match="missing"):
        mri.scan_mri_slice({"pd": np.zeros((8, 8))}, SCANNERS["aster-15"], rng, 1.4)
    bad = _uniform_slice(32)
    bad["t1"][0, 0] = np.nan
    with pytest.raises(BTDInputError, match="NaN"):
        mri.scan_mri_slice(bad, SCANNERS["aster-15"], rng, 1.4)


# ------------------------------------------------------------------ whole patient
def test_scan_patient_uint8_export():
    sc = SCANNERS["boreal-15"]
    vol = mri.scan_mri_patient("p01", sc, 3, 4, 96, 3.7, 2, slice_mm=2.5)
    assert vol.modality == "mri" and vol.source == "virtual" and vol.scanner == "boreal-15"
    assert vol.volume.dtype == np.uint8 and vol.volume.shape == (4, 96, 96)
    assert vol.spacing == (2.5, 3.7, 3.7)
    assert len(vol.tumours) == 2 and all(-0.5 <= t.z <= 3.5 for t in vol.tumours)
    hist = np.bincount(vol.volume.ravel(), minlength=256)
    assert (hist > 0).sum() > 60  # non-trivial grey-level use
    assert hist[255] < 0.02 * vol.volume.size  # only the brightest tail saturates
    again = mri.scan_mri_patient("p01", sc, 3, 4, 96, 3.7, 2, slice_mm=2.5)
    np.testing.assert_array_equal(vol.volume, again.volume)
    other = mri.scan_mri_patient("p01", SCANNERS["aster-30"], 3, 4, 96, 3.7, 2, slice_mm=2.5)
    assert other.tumours == vol.tumours  # same anatomy, other scanner
    assert not np.array_equal(other.volume, vol.volume)
