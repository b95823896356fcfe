"""CT-GAN port: cube geometry, equalisation, training, persistence and the tamper's footprint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from btd.attacks.ctgan import (
    CTGANAttacker,
    HistogramEqualizer,
    mask_bounds,
    removal_cube_mm,
    tamper_ct,
)
from btd.attacks.cubes import (
    cube_coordinates,
    cut_cube,
    healthy_centres,
    local_mean_hu,
    paste_cube,
    select_patients,
    training_cubes,
)
from btd.attacks.postprocess import paste_back, spherical_alpha
from btd.data.records import ScanVolume, Tumour
from btd.errors import BTDConfigError, BTDInputError

SPACING = (2.0, 1.5, 1.5)  # anisotropic, like a real CT
CUBE = {"cube_vox": 16, "cube_mm": 32.0}  # the tiny profile: 32 mm at 2 mm


def toy_ct(
    patient: str, tumours: list[tuple[float, float, float, float]], seed: int = 0
) -> ScanVolume:
    """Body (40 HU) with two 'lungs' (-850 HU), noise of std 20 HU and spherical nodules (30 HU)."""
    rng = np.random.default_rng(seed)
    z, h, w = 14, 64, 64
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in (z, h, w)], indexing="ij")
    vol = np.full((z, h, w), 40.0)
    for cx in (18, 46):
        vol[((yy - 32) / 26) ** 2 + ((xx - cx) / 13) ** 2 < 1] = -850.0
    for tz, ty, tx, d in tumours:
        r_mm = np.sqrt(
            ((zz - tz) * SPACING[0]) ** 2
            + ((yy - ty) * SPACING[1]) ** 2
            + ((xx - tx) * SPACING[2]) ** 2
        )
        vol[r_mm < d / 2] = 30.0
    vol += rng.normal(0, 20, vol.shape)
    t = [Tumour(z=a, y=b, x=c, diameter_mm=d) for a, b, c, d in tumours]
    return ScanVolume(patient, "ct", "toy", np.rint(vol).astype(np.int16), SPACING, t)


@pytest.fixture(scope="module")
def cohort() -> list[ScanVolume]:
    return [
        toy_ct("p0", [(7, 32, 18, 12.0)], seed=0),
        toy_ct("p1", [(6, 28, 46, 10.0)], seed=1),
        toy_ct("p2", [(8, 36, 17, 14.0)], seed=2),
    ]


def sphere_cubes(n: int, size: int, bright: bool, seed: int) -> np.ndarray:
    """Tiny synthetic training cubes: lung beside a chest wall, with (bright) or without nodule."""
    rng = np.random.default_rng(seed)
    g = np.arange(size) - (size - 1) / 2
    zz, yy, xx = np.meshgrid(g, g, g, indexing="ij")
    r = np.sqrt(zz**2 + yy**2 + xx**2)
    cubes = np.full((n, size, size, size), -850.0)
    wall = rng.integers(-size // 2, -size // 4, n)  # soft tissue from a random x position down
    cubes[xx[None] < wall[:, None, None, None]] = 40.0
    if bright:
        radii = rng.uniform(2.0, 4.0, n)
        cubes[r[None] < radii[:, None, None, None]] = 30.0
    return cubes.astype(np.float32)  # no noise: equalisation would spread it over [-1, 1]


@pytest.fixture(scope="module")
def trained(cohort) -> CTGANAttacker:
    cubes = training_cubes(
        cohort, "inject", np.random.default_rng(0), margin_vox=1, per_site=3, **CUBE
    )
    model = CTGANAttacker("inject", base_filters=4, seed=0, **CUBE)
    model.fit(cubes, steps=3, batch_size=2)
    return model


# ----------------------------------------------------------------------------- cubes


def test_cube_coordinates_follow_the_spacing():
    c = cube_coordinates((5.0, 10.0, 20.0), SPACING, cube_mm=32.0, cube_vox=16)
    # 2 mm cube voxels: one scan slice (2 mm) and 4/3 rows (1.5 mm) per cube voxel
    np.testing.assert_allclose(np.diff(c[0, :, 0, 0]), 1.0)
    np.testing.assert_allclose(np.diff(c[1, 0, :, 0]), 2.0 / 1.5)
    np.testing.assert_allclose(c.reshape(3, -1).mean(axis=1), (5.0, 10.0, 20.0))


def test_cut_cube_samples_a_linear_volume_exactly():
    z, y, x = np.meshgrid(np.arange(30), np.arange(40), np.arange(40), indexing="ij")
    vol = (3.0 * z + 2.0 * y - x).astype(np.float32)
    cube = cut_cube(vol, SPACING, (15.0, 20.0, 21.5), cube_mm=16.0, cube_vox=8)
    coords = cube_coordinates((15.0, 20.0, 21.5), SPACING, 16.0, 8)
    np.testing.assert_allclose(cube, 3 * coords[0] + 2 * coords[1] - coords[2], atol=1e-3)
    assert cube.mean() == pytest.approx(3 * 15 + 2 * 20 - 21.5, abs=1e-3)


def test_paste_unedited_cube_leaves_volume_unchanged(cohort):
    vol = cohort[0].volume
    centre = (6.3, 27.6, 18.2)
    cube = cut_cube(vol, SPACING, centre, **CUBE)
    same = paste_cube(vol, SPACING, centre, cube, cube_mm=32.0, base_cube=cube)
    assert np.array_equal(same, vol.astype(np.float32))
    # replace mode (CT-GAN's pasteCube) is exact up to interpolation on a smooth volume
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in vol.shape], indexing="ij")
    smooth = 5 * z - 3 * y + 2 * x
    back = paste_cube(
        smooth, SPACING, centre, cut_cube(smooth, SPACING, centre, **CUBE), cube_mm=32.0
    )
    # (the 32 mm cube pokes out of the 28 mm deep volume: edge slices are clamped, check inside)
    np.testing.assert_allclose(back[1:-1], smooth[1:-1], atol=1e-3)
    # an edit lands where it was made: +100 HU in the cube centre raises the scan at the centre
    edited = cube.copy()
    edited[6:10, 6:10, 6:10] += 100.0
    out = paste_cube(vol, SPACING, centre, edited, cube_mm=32.0, base_cube=cube)
    diff = out - vol
    assert diff[6, 28, 18] == pytest.approx(100.0, abs=1e-3)
    assert diff[0, 5, 50] == 0.0 and diff.max() <= 100.0 + 1e-3


def test_cut_cube_rejects_bad_sites(cohort):
    with pytest.raises(BTDInputError, match="outside"):
        cut_cube(cohort[0].volume, SPACING, (99.0, 5.0, 5.0))
    with pytest.raises(BTDConfigError, match="cube_vox"):
        cut_cube(cohort[0].volume, SPACING, (5.0, 5.0, 5.0), cube_vox=1)


def test_training_cubes_are_centred_on_tumours_or_healthy(cohort):
    rng = np.random.default_rng(0)
    inj = training_cubes(cohort, "inject", rng, margin_vox=2, per_site=2, jitter_mm=1.0, **CUBE)
    assert inj.shape == (6, 20, 20, 20)
    centre = inj[:, 9:11, 9:11, 9:11].mean(axis=(1, 2, 3))  # within +-1 mm of the site
    assert np.all(centre > -200)  # nodule (30 HU) in the middle, not lung (-850)
    rem = training_cubes(
        cohort, "remove", rng, margin_vox=0, healthy_per_scan=3, margin_mm=10.0, **CUBE
    )
    assert rem.shape[1:] == (16, 16, 16) and len(rem) >= 3
    sites = healthy_centres(cohort, per_scan=4, rng=rng, margin_mm=10.0)
    for i, (z, y, x) in sites:
        for t in cohort[i].tumours:
            d = np.sqrt(((z - t.z) * 2.0) ** 2 + ((y - t.y) * 1.5) ** 2 + ((x - t.x) * 1.5) ** 2)
            assert d >= t.diameter_mm / 2 + 10.0
    with pytest.raises(BTDConfigError, match="role"):
        training_cubes(cohort, "swap", rng, **CUBE)


def test_injector_sites_can_skip_small_tumours(cohort):
    rng = np.random.default_rng(0)
    big = training_cubes(
        cohort, "inject", rng, margin_vox=0, per_site=1, min_diameter_mm=11.0, **CUBE
    )
    assert len(big) == 2  # the 12 and 14 mm nodules, not the 10 mm one
    with pytest.raises(BTDInputError, match="no inject training sites"):
        training_cubes(cohort, "inject", rng, per_site=1, min_diameter_mm=50.0, **CUBE)


def test_local_mean_hu_tells_lung_from_tissue(cohort):
    scan = cohort[0]
    assert local_mean_hu(scan.volume, SPACING, (7.0, 32.0, 27.0)) < -700  # lung, away from nodule
    assert local_mean_hu(scan.volume, SPACING, (7.0, 32.0, 18.0)) > -100  # on the nodule
    assert local_mean_hu(scan.volume, SPACING, (7.0, 2.0, 32.0), radius_mm=2.5) > -100  # body wall


def test_aerated_sites_keeps_lung_sites_only(cohort):
    import pandas as pd

    from btd.pipeline.deepfakes import aerated_sites

    scans = {s.patient: s for s in cohort}
    rows = pd.DataFrame(
        {"patient": ["p0", "p0", "p0", "p1"], "slice": [7, 7, 7, 6],
         "cy": [32, 32, 2, 28], "cx": [27, 18, 32, 40]}
    )  # fmt: skip
    kept = aerated_sites(rows, scans, radius_mm=2.5)
    assert kept.index.tolist() == [
        0,
        3,
    ]  # lung sites; the nodule (1) and the body wall (2) are dropped
    wall_only = rows.iloc[[1, 2]]
    assert aerated_sites(wall_only, scans, radius_mm=2.5).index.tolist() == [
        1,
        2,
    ]  # fallback: keep all


def test_select_patients_keeps_holdout_out(cohort):
    split_of = {"p0": "train", "p1": "holdout", "p2": "val"}
    assert [s.patient for s in select_patients(cohort, split_of)] == ["p0", "p2"]
    with pytest.raises(BTDInputError, match="no split"):
        select_patients(cohort, {"p0": "train"})


# ----------------------------------------------------------------------------- preprocessing


def test_histogram_equalisation_round_trip():
    rng = np.random.default_rng(0)
    hu = np.concatenate(
        [rng.normal(-850, 30, 20000), rng.normal(40, 20, 20000), rng.uniform(-1000, 1500, 2000)]
    )
    eq = HistogramEqualizer().fit(hu)
    y = eq.equalize(hu)
    assert y.min() >= -1.0 and y.max() <= 1.0
    assert np.all(np.diff(eq.equalize(np.sort(hu))) >= 0)  # monotone
    # equalised values are ~uniform: half of the voxels fall below 0
    assert np.mean(y < 0) == pytest.approx(0.5, abs=0.01)
    bin_width = (hu.max() - hu.min()) / 10_000
    back = eq.dequalize(y)
    # within the two tissue modes the round trip is exact to a bin; sparse tails are coarser
    dense = (np.abs(hu + 850) < 60) | (np.abs(hu - 40) < 40)
    np.testing.assert_allclose(back[dense], hu[dense], atol=2 * bin_width + 1e-3)
    assert np.abs(back - hu).max() < 10.0
    with pytest.raises(BTDConfigError, match="not fitted"):
        HistogramEqualizer().equalize(hu)


def test_mask_bounds_match_ctgan():
    assert mask_bounds(32) == (6, 26)
    assert mask_bounds(16) == (3, 13)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("role", ["inject", "remove"])
def test_losses_drop_on_tiny_cubes(role):
    cubes = sphere_cubes(24, 18, bright=role == "inject", seed=3)
    model = CTGANAttacker(role, base_filters=4, seed=0, g_lr=1e-3, **CUBE)
    hist = model.fit(cubes, steps=40, batch_size=4)
    assert len(hist) == 40 and set(hist[0]) >= {"step", "d_loss", "g_loss", "l1"}
    l1 = np.array([h["l1"] for h in hist])
    g = np.array([h["g_loss"] for h in hist])
    assert l1[-10:].mean() < 0.5 * l1[:10].mean()
    assert g[-10:].mean() < g[:10].mean()
    assert all(np.isfinite(h["d_loss"]) for h in hist)


def test_training_is_deterministic(cohort):
    cubes = sphere_cubes(8, 18, bright=True, seed=0)
    runs = []
    for _ in range(2):
        m = CTGANAttacker("inject", base_filters=4, seed=7, **CUBE)
        runs.append((m.fit(cubes, 4, 2), m.inpaint(cubes[:2, 1:17, 1:17, 1:17])))
    assert [h["l1"] for h in runs[0][0]] == [h["l1"] for h in runs[1][0]]
    assert np.array_equal(runs[0][1], runs[1][1])
    other = CTGANAttacker("inject", base_filters=4, seed=8, **CUBE)
    assert [h["l1"] for h in other.fit(cubes, 4, 2)] != [h["l1"] for h in runs[0][0]]


def test_fit_rejects_bad_input():
    model = CTGANAttacker("inject", base_filters=4, **CUBE)
    with pytest.raises(BTDInputError, match="cubes"):
        model.fit(np.zeros((4, 8, 8, 8)), 1)
    with pytest.raises(BTDConfigError, match="batch_size"):
        model.fit(np.zeros((4, 16, 16, 16)), 1, batch_size=1)
    with pytest.raises(BTDConfigError, match="role"):
        CTGANAttacker("swap")


def test_save_load_round_trip(trained, tmp_path):
    path = trained.save(tmp_path / "injector.pt")
    loaded = CTGANAttacker.load(path)
    assert loaded.config == trained.config and loaded.steps_trained == trained.steps_trained
    cube = sphere_cubes(1, 16, bright=False, seed=5)[0]
    np.testing.assert_array_equal(loaded.inpaint(cube), trained.inpaint(cube))
    torch.load(path, weights_only=True)  # plain tensors and containers only
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(BTDInputError, match="not a readable CT-GAN model"):
        CTGANAttacker.load(tmp_path / "bad.pt")
    with pytest.raises(BTDInputError, match="missing"):
        CTGANAttacker.load(tmp_path / "none.pt")


def test_inpaint_keeps_shape_and_range(trained):
    cubes = sphere_cubes(3, 16, bright=False, seed=1)
    out = trained.inpaint(cubes)
    assert out.shape == cubes.shape and out.dtype == np.float32
    lo, hi = trained.equalizer.bins[0], trained.equalizer.bins[-1]
    assert out.min() >= lo - 1e-3 and out.max() <= hi + 1e-3


# ----------------------------------------------------------------------------- tamper


def test_spherical_alpha_is_exactly_zero_outside():
    g = np.arange(-20, 21, dtype=float)
    offs = (g[:, None, None], g[None, :, None], g[None, None, :])
    a = spherical_alpha(offs, 5.0, 12.0)
    r = np.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)
    assert np.all(a[r >= 12.0] == 0) and np.all(a[r <= 5.0] == 1)
    assert np.all((a >= 0) & (a <= 1)) and 0 < a[20, 20, 28] < 1


@pytest.mark.parametrize("attack", ["inject", "remove"])
def test_tamper_touches_only_the_blend_region(trained, cohort, attack):
    scan = cohort[1]
    if attack == "inject":
        centre = (7.0, 32.0, 18.0)  # healthy lung of p1
    else:
        t = scan.tumours[0]
        centre = (t.z, t.y, t.x)
    out, mask = tamper_ct(
        scan, *centre, trained, np.random.default_rng(0), attack=attack, outer_mm=14.0
    )
    assert out.dtype == np.int16 and out.shape == scan.volume.shape and mask.dtype == bool
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij")
    r = np.sqrt(
        ((zz - centre[0]) * 2.0) ** 2
        + ((yy - centre[1]) * 1.5) ** 2
        + ((xx - centre[2]) * 1.5) ** 2
    )
    outside = r >= 14.0
    assert np.array_equal(out[outside], scan.volume[outside])  # bit-identical
    assert np.array_equal(mask, out != scan.volume)
    assert mask.sum() > 50 and not mask[outside].any()
    if attack == "inject":
        assert np.all(out >= scan.volume)  # CT-GAN's injection can only add density


def test_zoomed_cube_for_large_tumours(trained, cohort):
    assert trained.mask_mm == pytest.approx(20.0)
    assert removal_cube_mm(8.0, trained) == 32.0  # fits CT-GAN's 20 mm centre: unchanged
    assert removal_cube_mm(26.0, trained) == pytest.approx(30.0 / 20.0 * 32.0)
    scan = cohort[2]
    t = scan.tumours[0]
    out, mask = tamper_ct(scan, t.z, t.y, t.x, trained, np.random.default_rng(0), cube_mm=40.0)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij")
    r = np.sqrt(((zz - t.z) * 2.0) ** 2 + ((yy - t.y) * 1.5) ** 2 + ((xx - t.x) * 1.5) ** 2)
    assert mask.any() and not mask[r >= 15.0 * 40.0 / 32.0].any()  # blend radii scale with the cube


def test_removal_with_a_healthy_cube_erases_the_nodule(cohort):
    """Paste-back alone (no network): a lung-only cube in place of the nodule removes it."""
    scan = cohort[0]
    t = scan.tumours[0]
    centre = (t.z, t.y, t.x)
    gen = np.full((16, 16, 16), -850.0, np.float32)
    out, mask = paste_back(
        scan.volume,
        SPACING,
        centre,
        gen,
        "remove",
        np.random.default_rng(0),
        cube_mm=32.0,
        inner_mm=9.0,
        outer_mm=14.0,
    )
    z, y, x = (int(round(c)) for c in centre)
    assert scan.volume[z, y - 2 : y + 3, x - 2 : x + 3].mean() > -100
    assert out[z, y - 2 : y + 3, x - 2 : x + 3].mean() < -700
    # noise touch-up: the erased core has noise of the surrounding std (20 HU), not a flat -850
    core = out[z - 1 : z + 2, y - 3 : y + 4, x - 3 : x + 4].astype(float)
    assert 8.0 < core.std() < 45.0
    flat, _ = paste_back(
        scan.volume,
        SPACING,
        centre,
        gen,
        "remove",
        np.random.default_rng(0),
        cube_mm=32.0,
        inner_mm=9.0,
        outer_mm=14.0,
        noise="none",
    )
    assert flat[z - 1 : z + 2, y - 3 : y + 4, x - 3 : x + 4].std() < 2.0


def test_tamper_rejects_bad_requests(trained, cohort):
    mri = ScanVolume("m", "mri", "toy", np.zeros((4, 16, 16), np.uint8), (2.0, 1.0, 1.0))
    with pytest.raises(BTDInputError, match="CT"):
        tamper_ct(mri, 2, 8, 8, trained, np.random.default_rng(0))
    with pytest.raises(BTDConfigError, match="noise"):
        tamper_ct(cohort[0], 7, 28, 17, trained, np.random.default_rng(0), noise="pink")
    with pytest.raises(BTDConfigError, match="outer_mm"):
        tamper_ct(cohort[0], 7, 28, 17, trained, np.random.default_rng(0), outer_mm=40.0)
