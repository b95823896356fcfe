"""Known-answer physics checks of the virtual CT scanners and the chest phantom."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest

from btd.data.records import ScanVolume
from btd.data.simulate.ct import (
    HU_MAX,
    HU_MIN,
    NODULE_KINDS,
    ct_noise_rois,
    make_chest_phantom,
    make_water_phantom,
    scan_ct_patient,
    scan_slice,
)
from btd.data.simulate.nps import noise_power_spectrum, nps_summary
from btd.data.simulate.protocols import load_protocols
from btd.errors import BTDConfigError, BTDInputError

CT_YAML = Path(__file__).resolve().parents[1] / "data" / "raw" / "virtual_scanners" / "ct.yaml"
PIX = 1.4  # mm, the default profile's pixel size
SIZE = 128  # small images keep the file fast; the physics does not depend on the matrix


@pytest.fixture(scope="module")
def scanners():
    return load_protocols(CT_YAML, "ct")


def _disk_mask(size: int, pix: float, cx: float, cy: float, r: float) -> np.ndarray:
    ax = (np.arange(size) - (size - 1) / 2.0) * pix
    return (ax[None, :] - cx) ** 2 + (ax[:, None] - cy) ** 2 <= r * r


# ---- scanner physics -----------------------------------------------------------------------


INSERTS = ((-35.0, 0.0, 14.0, 100.0), (35.0, 0.0, 14.0, -800.0), (0.0, 38.0, 12.0, 1000.0))


@pytest.mark.parametrize(
    "name", ["helion-16", "helion-64", "corvan-lowdose", "corvan-sharp", "vireo-soft"]
)
def test_noise_free_fbp_returns_the_phantom_hu(scanners, name):
    """Noise-free scan of water + inserts: central ROIs within 3 HU of truth, air within 3 HU.

    Exercises the whole calibrated chain (HU -> mu -> projection, blur, fan rebinning, FBP -> HU).
    """
    phantom = make_water_phantom(SIZE, PIX, 150.0, INSERTS)
    img = scan_slice(phantom, scanners[name], np.random.default_rng(0), PIX, noise=False)
    assert img.dtype == np.float32 and img.shape == phantom.shape
    checks = [(0.0, -40.0, 8.0, 0.0)] + [(x, y, r - 6.0, hu) for x, y, r, hu in INSERTS]
    for cx, cy, r, truth in checks:
        got = float(img[_disk_mask(SIZE, PIX, cx, cy, r)].mean())
        assert abs(got - truth) < 3.0, f"{name}: ROI ({cx},{cy}) {got:.1f} HU, truth {truth}"
    corner = img[:8, :8].mean()  # air outside the cylinder
    assert abs(corner + 1000.0) < 3.0


def test_noise_std_scales_as_inverse_sqrt_dose(scanners):
    """Quantum-limited (electronic noise 0) noise std ~ 1/sqrt(dose): ratio 2 for 4x dose (+-15%)."""
    sc = dataclasses.replace(scanners["helion-16"], electronic_noise=0.0)
    phantom = make_water_phantom(SIZE, PIX, 150.0)
    clean = scan_slice(phantom, sc, np.random.default_rng(0), PIX, noise=False)
    roi = _disk_mask(SIZE, PIX, 0.0, 0.0, 45.0)
    stds = {}
    for dose in (0.25, 1.0, 4.0):
        rng = np.random.default_rng(1)
        diffs = [scan_slice(phantom, sc, rng, PIX, dose_scale=dose) - clean for _ in range(2)]
        stds[dose] = float(np.std([d[roi] for d in diffs]))
    assert stds[0.25] / stds[1.0] == pytest.approx(2.0, rel=0.15)
    assert stds[1.0] / stds[4.0] == pytest.approx(2.0, rel=0.15)


def test_electronic_noise_adds_variance_at_low_counts(scanners):
    """Read noise adds variance where counts are low: more noise with it than without."""
    base = dataclasses.replace(scanners["corvan-lowdose"], dose_photons=2000.0)
    phantom = make_water_phantom(SIZE, PIX, 150.0)
    roi = _disk_mask(SIZE, PIX, 0.0, 0.0, 45.0)
    std = {}
    for e in (0.0, 30.0):
        sc = dataclasses.replace(base, electronic_noise=e)
        clean = scan_slice(phantom, sc, np.random.default_rng(0), PIX, noise=False)
        std[e] = float(
            np.std((scan_slice(phantom, sc, np.random.default_rng(3), PIX) - clean)[roi])
        )
    assert std[30.0] > 1.1 * std[0.0]


def test_nps_of_white_noise_is_flat_and_integrates_to_variance():
    """Known answer: white noise of std s at pixel a has NPS = s^2 a^2 at every frequency."""
    rng = np.random.default_rng(0)
    rois = rng.normal(0.0, 10.0, size=(64, 32, 32))
    freqs, nps = noise_power_spectrum(rois, 0.5)
    assert freqs[0] > 0 and freqs[-1] == pytest.approx(1.0, abs=0.04)  # Nyquist of 0.5 mm = 1/mm
    assert np.median(nps) == pytest.approx(25.0, rel=0.05)  # 10^2 HU^2 x 0.5^2 mm^2
    assert np.allclose(nps[2:], 25.0, rtol=0.15)  # the lowest bins lose a little to detrending
    assert nps_summary(rois, 0.5)["std"] == pytest.approx(10.0, rel=0.03)


def test_scanners_have_measurably_different_nps(scanners):
    """Each pair of scanners differs by >= 20% in noise variance or >= 0.02 cycles/mm in the NPS
    mean frequency (kernel, blur, pitch and fan rebinning shape the spectrum)."""
    summ = {}
    for name, sc in scanners.items():
        rois = ct_noise_rois(sc, seed=0, size=SIZE, pixel_mm=PIX, diameter_mm=150.0, roi_size=24)
        summ[name] = nps_summary(rois, PIX)
        assert 3.0 < summ[name]["std"] < 80.0, (
            f"{name}: implausible noise {summ[name]['std']:.1f} HU"
        )
    for a, b in itertools.combinations(summ, 2):
        va, vb = summ[a]["variance"], summ[b]["variance"]
        dvar = abs(va - vb) / min(va, vb)
        dfreq = abs(summ[a]["mean_freq"] - summ[b]["mean_freq"])
        assert dvar >= 0.2 or dfreq >= 0.02, f"{a} vs {b}: dvar {dvar:.2f}, dfreq {dfreq:.3f}"


def test_soft_kernel_has_lower_nps_frequency_than_ramp(scanners):
    """Same acquisition, hann vs ramp kernel: hann shifts the NPS to lower frequencies."""
    ramp = scanners["helion-16"]
    hann = dataclasses.replace(ramp, kernel="hann")
    f = {
        k: nps_summary(
            ct_noise_rois(s, size=SIZE, pixel_mm=PIX, diameter_mm=150.0, roi_size=24), PIX
        )
        for k, s in (("ramp", ramp), ("hann", hann))
    }
    assert f["hann"]["mean_freq"] < 0.8 * f["ramp"]["mean_freq"]
    assert f["hann"]["std"] < f["ramp"]["std"]


def test_scan_slice_rejects_bad_input(scanners):
    sc = scanners["helion-16"]
    bad = np.zeros((32, 32), dtype=np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(BTDInputError):
        scan_slice(bad, sc, np.random.default_rng(0), PIX)
    with pytest.raises(BTDInputError):
        scan_slice(np.zeros((32, 40)), sc, np.random.default_rng(0), PIX)
    with pytest.raises(BTDConfigError):
        scan_slice(np.zeros((32, 32)), sc, np.random.default_rng(0), PIX, dose_scale=0.0)


# ---- chest phantom -------------------------------------------------------------------------


def _phantom(seed: int, n_nodules: int = 3):
    # 128 px at 2.8 mm covers a full adult chest (358 mm) cheaply.
    return make_chest_phantom(np.random.default_rng(seed), 16, 128, 2.8, 1.0, n_nodules)


def test_phantom_shape_dtype_and_tissues():
    hu, tumours = _phantom(1)
    assert hu.shape == (16, 128, 128) and hu.dtype == np.float32
    assert hu.min() >= HU_MIN and hu.max() <= HU_MAX
    assert hu[:, 0, 0].max() == pytest.approx(-1000.0)  # air outside the body
    mid = hu[8]
    assert (mid < -700).mean() > 0.05  # lungs
    assert (mid > 300).sum() > 20  # ribs and spine
    assert ((mid > -150) & (mid < -50)).mean() > 0.03  # subcutaneous fat
    assert len(tumours) == 3 and all(t.kind in NODULE_KINDS for t in tumours)


def test_phantom_tumours_lie_inside_the_lungs():
    """Every pixel within radius + 2 mm of a nodule centre (centre slice) is lung in the anatomy
    before the nodule was added; the nodule is there (centre voxel > -750 HU; lung is ~-850);
    the centre slice lies in the middle of the z range."""
    from btd.data.simulate.ct_phantom import _build_chest

    for seed in (1, 2, 3):
        hu, lung, tumours = _build_chest(
            np.random.default_rng(seed), 16, 128, 2.8, 1.0, 3, (3.0, 30.0)
        )
        assert np.array_equal(hu, _phantom(seed)[0])  # the same anatomy as the public function
        for t in tumours:
            assert 0.2 * hu.shape[0] <= t.z <= 0.8 * hu.shape[0]
            assert 3.0 <= t.diameter_mm <= 30.0
            k, r, c = int(round(t.z)), int(round(t.y)), int(round(t.x))
            near = _disk_mask(128, 2.8, (c - 63.5) * 2.8, (r - 63.5) * 2.8, t.diameter_mm / 2 + 2)
            assert lung[k][near].min() > 0.5, f"seed {seed} {t}: not inside a lung"
            centre = hu[k, r, c]
            assert centre > -750, f"seed {seed} {t}: no nodule at the centre ({centre:.0f} HU)"


def test_phantom_is_deterministic_and_seed_dependent():
    a, ta = _phantom(5)
    b, tb = _phantom(5)
    c, tc = _phantom(6)
    assert np.array_equal(a, b) and ta == tb
    assert not np.allclose(a, c) and ta != tc


def test_phantom_rejects_bad_parameters():
    with pytest.raises(BTDConfigError):
        make_chest_phantom(np.random.default_rng(0), 4, 64, 2.0, 1.0, 1, (10.0, 5.0))
    with pytest.raises(BTDConfigError):
        make_chest_phantom(np.random.default_rng(0), 0, 64, 2.0, 1.0, 1)


# ---- whole patient -------------------------------------------------------------------------


def test_scan_ct_patient_volume(scanners):
    sc = scanners["vireo-soft"]
    vol = scan_ct_patient("p007", sc, seed=11, n_slices=4, size=96, pixel_mm=3.6, n_nodules=2)
    assert isinstance(vol, ScanVolume)
    assert vol.modality == "ct" and vol.source == "virtual" and vol.scanner == "vireo-soft"
    assert vol.volume.dtype == np.int16 and vol.volume.shape == (4, 96, 96)
    assert vol.spacing == (sc.slice_thickness_mm, 3.6, 3.6)
    assert vol.volume.min() >= HU_MIN and vol.volume.max() <= HU_MAX
    assert len(vol.tumours) == 2
    for t in vol.tumours:
        assert 0.0 <= t.z <= 3.0 and 0 <= t.y < 96 and 0 <= t.x < 96
    again = scan_ct_patient("p007", sc, seed=11, n_slices=4, size=96, pixel_mm=3.6, n_nodules=2)
    assert np.array_equal(vol.volume, again.volume) and vol.tumours == again.tumours
    air = vol.volume[:, :6, :6].astype(float)
    assert abs(air.mean() + 1000.0) < 15.0  # calibrated: air reads -1000 HU


def test_thick_slices_average_the_fine_anatomy(scanners, monkeypatch):
    """With the scanner bypassed, each thick slice is the mean of its <= 0.5 mm sub-slices and the
    tumour z is mapped from sub-slice to thick-slice coordinates (a 3 mm slice = 6 sub-slices)."""
    import btd.data.simulate.ct as ct

    monkeypatch.setattr(ct, "scan_slice", lambda hu, *args, **kwargs: hu)
    sc = scanners["vireo-soft"]
    vol = ct.scan_ct_patient("p", sc, seed=3, n_slices=3, size=64, pixel_mm=5.6, n_nodules=1)
    anatomy_ss, _ = np.random.SeedSequence(3).spawn(2)
    fine, fine_t = ct.make_chest_phantom(np.random.default_rng(anatomy_ss), 18, 64, 5.6, 0.5, 1)
    expected = np.rint(fine.reshape(3, 6, 64, 64).mean(axis=1))
    assert np.array_equal(vol.volume, expected.astype(np.int16))
    assert vol.tumours[0].z == pytest.approx((fine_t[0].z + 0.5) / 6 - 0.5)
    assert (vol.tumours[0].y, vol.tumours[0].x) == (fine_t[0].y, fine_t[0].x)
