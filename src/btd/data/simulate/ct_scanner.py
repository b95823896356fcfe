"""The virtual CT scanner: physics from HU to reconstructed HU (no anatomy here).

The scanner chain follows a real acquisition so that every structure that exists before scanning
(anatomy and real nodules) carries the scanner's noise texture, blur and streaks, while an edit made
after reconstruction does not: HU -> linear attenuation -> line integrals (parallel, or an
equiangular fan rebinned to parallel) -> detector blur -> photon counts with Poisson + electronic
noise -> -log -> filtered back-projection with the scanner's kernel -> HU.

The projector is a pixel-driven "footprint" projector: every non-air pixel is linearly splatted
onto a detector grid 8x finer than the bins, then the square-pixel footprint, the bin integration
and the detector blur are applied as one exact transfer function per view in the Fourier domain.
It is accurate (no moire from point splatting; water reconstructs to 0 +- 1 HU) and several times
faster than skimage's rotate-and-sum `radon`. Back-projection gathers from 8x-upsampled filtered
projections. Both run single-threaded in numpy (~0.3 s per 256^2 slice, ~1.2 s per 512^2).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from btd.data.simulate import portable as pm
from btd.data.simulate.nps import paired_noise_rois
from btd.data.simulate.protocols import CTScanner
from btd.errors import BTDConfigError, BTDInputError

HU_MIN, HU_MAX = -1024, 3071
_SUB = 8  # fine detector samples per detector bin (projector splat and back-projection)
_MARGIN = 8  # detector bins of zero padding on each side of the fine grid
_FAN_RADIUS = 2.2  # source-to-isocentre distance / radius of the field of view (clinical ~2.2)
_VIEW_BATCH = 24  # views per vectorised batch (bounds temporary memory to a few MB at 512^2)

# ---------------------------------------------------------------------------------------------
# Geometry, projector and filtered back-projection (all lengths in image pixels)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    """Parallel-beam sampling of one scanner at one image size (cached: built once per process)."""

    size: int
    n_views: int
    pitch: float  # detector bin width in pixels
    blur: float  # Gaussian detector blur, in detector bins
    theta: np.ndarray  # view angles (rad) over [0, pi)
    n_det: int  # detector bins, centred on the rotation axis, covering the image diagonal

    @property
    def det_centre(self) -> float:
        return (self.n_det - 1) / 2.0


@lru_cache(maxsize=32)
def _geometry(size: int, n_views: int, pitch: float, blur: float) -> _Geometry:
    theta = np.arange(n_views) * (np.pi / n_views)
    n_det = int(np.ceil((size * np.sqrt(2.0) + 4.0) / pitch))
    n_det += (n_det + 1) % 2  # odd: one bin sits exactly on the rotation axis
    return _Geometry(size, n_views, pitch, blur, theta, n_det)


def _pixel_coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x = column, y = row) relative to the rotation axis."""
    c = (size - 1) / 2.0
    ax = np.arange(size, dtype=np.float32) - np.float32(c)
    return np.broadcast_to(ax[None, :], (size, size)), np.broadcast_to(ax[:, None], (size, size))


def _project(mu_px: np.ndarray, geom: _Geometry) -> np.ndarray:
    """Mean line integral over each detector bin (views x bins) of an image of mu in 1/pixel.

    Exact for square pixels up to the linear splat onto a grid 8x finer than the detector.
    """
    theta, n_det, pitch = geom.theta, geom.n_det, geom.pitch
    size = mu_px.shape[0]
    xs, ys = _pixel_coords(size)
    keep = mu_px != 0  # air has mu = 0 and adds nothing: skip it (about half the field of view)
    vals = mu_px[keep].astype(np.float64)
    xs, ys = xs[keep], ys[keep]
    step = pitch / _SUB  # fine-grid spacing in pixels
    n_fine = (n_det + 2 * _MARGIN) * _SUB
    offset = np.float32(((n_det - 1) / 2.0 + _MARGIN) * _SUB)
    n_views = len(theta)
    fine = np.zeros((n_views, n_fine), dtype=np.float64)
    cos = (pm.cos(theta) / step).astype(np.float32)
    sin = (pm.sin(theta) / step).astype(np.float32)
    for v0 in range(0, n_views, _VIEW_BATCH):
        v1 = min(v0 + _VIEW_BATCH, n_views)
        pos = xs[None, :] * cos[v0:v1, None] + ys[None, :] * sin[v0:v1, None] + offset
        idx = pos.astype(np.int32)
        frac = (pos - idx).ravel().astype(np.float64)
        idx += (np.arange(v1 - v0, dtype=np.int32) * n_fine)[:, None]
        idx = idx.ravel()
        mass = np.broadcast_to(vals, (v1 - v0, vals.size)).ravel()
        hi = mass * frac  # linear splat: keeps each pixel's exact position (first moment)
        n = (v1 - v0) * n_fine
        counts = np.bincount(idx, mass - hi, minlength=n) + np.bincount(idx + 1, hi, minlength=n)
        fine[v0:v1] = counts[:n].reshape(v1 - v0, n_fine)
    fine /= step  # mass per fine bin -> line-integral density
    transfer = _projector_transfer(n_views, n_fine, pitch, geom.blur)
    smooth = np.fft.irfft(np.fft.rfft(fine, axis=1) * transfer, n=n_fine, axis=1)
    return smooth[:, _MARGIN * _SUB :: _SUB][:, :n_det]


@lru_cache(maxsize=16)
def _projector_transfer(n_views: int, n_fine: int, pitch: float, blur_bins: float) -> np.ndarray:
    """Per-view transfer on the fine detector grid: square-pixel footprint (two boxes |cos| and
    |sin| pixels wide), integration over the detector bin, and the Gaussian detector blur."""
    theta = np.arange(n_views) * (np.pi / n_views)
    nu = np.fft.rfftfreq(n_fine, d=pitch / _SUB)[None, :]  # cycles per pixel
    return (
        pm.sinc(nu * np.abs(pm.cos(theta))[:, None])
        * pm.sinc(nu * np.abs(pm.sin(theta))[:, None])
        * pm.sinc(nu * pitch)
        * pm.exp(-2.0 * (np.pi * blur_bins * pitch * nu) ** 2)
    )


def _kernel_window(kernel: str, f: np.ndarray) -> np.ndarray:
    """Apodisation of the ramp for each reconstruction kernel (f in cycles/sample, |f| <= 0.5)."""
    if kernel == "ramp":
        return np.ones_like(f)
    if kernel == "shepp-logan":
        return pm.sinc(f)
    if kernel == "cosine":
        return pm.cos(np.pi * f)
    if kernel == "hamming":
        return 0.54 + 0.46 * pm.cos(2 * np.pi * f)
    if kernel == "hann":
        return 0.5 + 0.5 * pm.cos(2 * np.pi * f)
    raise BTDConfigError("kernel", f"unknown CT kernel '{kernel}'")


@lru_cache(maxsize=32)
def _fbp_filter(n_det: int, pitch: float, kernel: str) -> tuple[int, np.ndarray]:
    """Fourier filter of the discrete Ram-Lak ramp (spatial form: correct DC) times the window."""
    n_pad = max(64, int(2 ** np.ceil(pm.log2(2 * n_det))))
    n = np.concatenate([np.arange(0, n_pad // 2 + 1), np.arange(-n_pad // 2 + 1, 0)])
    h = np.zeros(n_pad)
    h[0] = 0.25
    odd = n % 2 == 1
    h[odd] = -1.0 / (np.pi * n[odd]) ** 2
    ramp = np.real(np.fft.rfft(h)) / pitch  # (1/pitch^2 from h) x (pitch from the convolution sum)
    f = np.fft.rfftfreq(n_pad)
    return n_pad, ramp * _kernel_window(kernel, f)


def _fbp(sino: np.ndarray, geom: _Geometry, kernel: str) -> np.ndarray:
    """Filtered back-projection of a parallel sinogram (views x bins) to a size x size image.

    The filtered projections are upsampled 8x by linear interpolation once, so back-projection is
    a single nearest-neighbour gather per pixel and view (4x faster than per-pixel interpolation).
    """
    n_views, n_det = sino.shape
    theta, pitch, size = geom.theta, geom.pitch, geom.size
    n_pad, filt = _fbp_filter(n_det, pitch, kernel)
    q = np.fft.irfft(np.fft.rfft(sino, n=n_pad, axis=1) * filt, n=n_pad, axis=1)[:, :n_det]
    n_up = (n_det - 1) * _SUB + 1
    pos = np.arange(n_up) / _SUB
    i = np.minimum(pos.astype(np.int64), n_det - 2)
    w = pos - i
    width = n_up + 1
    up = np.zeros((n_views, width), dtype=np.float32)  # last column: zero outside the detector
    up[:, :n_up] = q[:, i] * (1.0 - w) + q[:, i + 1] * w
    flat = up.ravel()
    ax = np.arange(size, dtype=np.float32) - np.float32((size - 1) / 2.0)
    scale = np.float32(_SUB / pitch)
    cos = pm.cos(theta).astype(np.float32) * scale
    sin = pm.sin(theta).astype(np.float32) * scale
    centre = np.float32((n_det - 1) / 2.0 * _SUB + 0.5)  # +0.5: truncation rounds to nearest
    out = np.zeros((size, size), dtype=np.float32)
    for v0 in range(0, n_views, _VIEW_BATCH):
        v1 = min(v0 + _VIEW_BATCH, n_views)
        u = (ax[None, None, :] * cos[v0:v1, None, None] + centre) + (
            ax[None, :, None] * sin[v0:v1, None, None]
        )
        idx = u.astype(np.int32)
        idx[(u < 0) | (idx >= n_up)] = n_up
        idx += (np.arange(v0, v1, dtype=np.int32) * width)[:, None, None]
        out += flat[idx].sum(axis=0)
    return out * np.float32(np.pi / n_views)


def _fan_layout(geom: _Geometry) -> tuple[float, float, int, float, int]:
    """Equiangular fan sampling: (radius R, d_gamma, n_gamma, beta_start, n_beta) in pixels/rad.

    The fan's central ray spacing at the isocentre equals the detector pitch; source angles cover a
    short scan (180 degrees + fan angle) at the same angular step as the parallel views.
    """
    r_fov = geom.n_det * geom.pitch / 2.0
    radius = _FAN_RADIUS * r_fov
    d_gamma = geom.pitch / radius
    gamma_max = pm.arcsin(r_fov / radius)
    n_half = int(np.ceil(gamma_max / d_gamma)) + 2
    d_beta = np.pi / geom.n_views
    n_extra = int(np.ceil(gamma_max / d_beta)) + 2
    return radius, d_gamma, 2 * n_half + 1, -n_extra * d_beta, geom.n_views + 2 * n_extra + 1


def _parallel_to_fan(par: np.ndarray, geom: _Geometry) -> np.ndarray:
    """Noise-free fan line integrals p(beta, gamma) = p_par(beta + gamma, R sin gamma)."""
    radius, d_gamma, n_gamma, beta0, n_beta = _fan_layout(geom)
    d_beta = np.pi / geom.n_views
    gamma = (np.arange(n_gamma) - (n_gamma - 1) / 2.0) * d_gamma
    beta = beta0 + np.arange(n_beta) * d_beta
    # p(theta + pi, t) = p(theta, -t): extend the sinogram to theta in [-pi, 2 pi).
    ext = np.concatenate([par[:, ::-1], par, par[:, ::-1]], axis=0)
    theta_idx = (beta[:, None] + gamma[None, :]) / d_beta + geom.n_views
    t_idx = np.broadcast_to(radius * pm.sin(gamma) / geom.pitch + geom.det_centre, theta_idx.shape)
    return ndimage.map_coordinates(ext, [theta_idx, t_idx], order=1, mode="nearest")


def _fan_to_parallel(fan: np.ndarray, geom: _Geometry) -> np.ndarray:
    """Rebin (bilinear) measured fan data onto the parallel grid; this correlates the noise."""
    radius, d_gamma, n_gamma, beta0, _ = _fan_layout(geom)
    d_beta = np.pi / geom.n_views
    t = (np.arange(geom.n_det) - geom.det_centre) * geom.pitch
    gamma = pm.arcsin(np.clip(t / radius, -1.0, 1.0))
    beta = geom.theta[:, None] - gamma[None, :]
    beta_idx = (beta - beta0) / d_beta
    gamma_idx = np.broadcast_to(gamma / d_gamma + (n_gamma - 1) / 2.0, beta_idx.shape)
    return ndimage.map_coordinates(fan, [beta_idx, gamma_idx], order=1, mode="nearest")


def _measure(
    p: np.ndarray, photons: float, electronic: float, rng: np.random.Generator
) -> np.ndarray:
    """Line integrals -> detected counts (Poisson + Gaussian read noise, >= 1) -> -log."""
    expected = photons * pm.exp(-p)
    counts = rng.poisson(expected).astype(np.float64)
    if electronic > 0:
        counts += rng.normal(0.0, electronic, size=counts.shape)
    return pm.log(photons) - pm.log(np.maximum(counts, 1.0))


def hu_to_mu(hu: np.ndarray, mu_water_per_mm: float) -> np.ndarray:
    """Linear attenuation (1/mm) at the scanner's effective energy; air (-1000 HU) is 0."""
    return np.maximum(mu_water_per_mm * (1.0 + hu.astype(np.float64) / 1000.0), 0.0)


def _check_slice(hu: np.ndarray, pixel_mm: float) -> None:
    if hu.ndim != 2 or hu.shape[0] != hu.shape[1] or hu.shape[0] < 16:
        raise BTDInputError("scan_slice", f"needs a square 2-D HU slice >= 16 px, got {hu.shape}")
    if not np.all(np.isfinite(hu)):
        raise BTDInputError("scan_slice", "HU slice contains NaN or inf")
    if not pixel_mm > 0:
        raise BTDConfigError("pixel_mm", f"must be > 0, got {pixel_mm}")


def scan_slice(
    hu: np.ndarray,
    scanner: CTScanner,
    rng: np.random.Generator,
    pixel_mm: float,
    dose_scale: float = 1.0,
    noise: bool = True,
) -> np.ndarray:
    """Acquire and reconstruct one 2-D HU slice with `scanner`; returns float32 HU.

    `noise=False` gives the noise-free reconstruction (same blur, sampling and kernel), used to
    calibrate and to isolate noise. `dose_scale` multiplies the scanner's photons per bin.
    """
    _check_slice(hu, pixel_mm)
    if not dose_scale > 0:
        raise BTDConfigError("dose_scale", f"must be > 0, got {dose_scale}")
    geom = _geometry(hu.shape[0], scanner.n_views, scanner.detector_pitch, scanner.detector_blur)
    mu_px = hu_to_mu(hu, scanner.mu_water_per_mm) * pixel_mm  # per pixel: line integrals in px
    sino = _project(mu_px, geom)
    photons = scanner.dose_photons * dose_scale
    if scanner.geometry == "fan":
        fan = _parallel_to_fan(sino, geom)
        if noise:
            fan = _measure(fan, photons, scanner.electronic_noise, rng)
        sino = _fan_to_parallel(fan, geom)
    elif noise:
        sino = _measure(sino, photons, scanner.electronic_noise, rng)
    mu_rec = _fbp(sino, geom, scanner.kernel) / pixel_mm
    return (1000.0 * (mu_rec / scanner.mu_water_per_mm - 1.0)).astype(np.float32)


def make_water_phantom(
    size: int,
    pixel_mm: float,
    diameter_mm: float | None = None,
    inserts: tuple[tuple[float, float, float, float], ...] = (),
) -> np.ndarray:
    """Water cylinder in air (HU), optionally with round inserts (x_mm, y_mm, radius_mm, HU).

    The reference object for calibration (water 0 HU, air -1000 HU) and for noise power spectra.
    """
    if diameter_mm is None:
        diameter_mm = 0.8 * size * pixel_mm
    x, y = _mm_grid(size, pixel_mm)
    hu = -1000.0 + 1000.0 * _disk(x, y, 0.0, 0.0, diameter_mm / 2.0, pixel_mm)
    for cx, cy, r, value in inserts:
        cov = _disk(x, y, cx, cy, r, pixel_mm)
        hu = hu * (1.0 - cov) + value * cov
    return hu.astype(np.float32)


def ct_noise_rois(
    scanner: CTScanner,
    seed: int = 0,
    size: int = 256,
    pixel_mm: float = 1.4,
    diameter_mm: float = 200.0,
    roi_size: int = 32,
    n_pairs: int = 2,
    dose_scale: float = 1.0,
) -> np.ndarray:
    """Noise-only ROIs of `scanner`: a water cylinder (20 cm, the usual NPS phantom) scanned twice.

    ROIs are tiled inside the central 70% of the cylinder radius, away from edge streaks.
    Feed the result to `btd.data.simulate.nps.noise_power_spectrum(rois, pixel_mm)`.
    """
    diameter_mm = min(diameter_mm, 0.85 * size * pixel_mm)
    phantom = make_water_phantom(size, pixel_mm, diameter_mm)
    x, y = _mm_grid(size, pixel_mm)
    region = np.sqrt(x**2 + y**2) <= 0.35 * diameter_mm

    def scan(rng: np.random.Generator) -> np.ndarray:
        return scan_slice(phantom, scanner, rng, pixel_mm, dose_scale)

    return paired_noise_rois(scan, np.random.default_rng(seed), region, roi_size, n_pairs)


def _mm_grid(size: int, pixel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in mm (x right, y down = posterior), origin at the image centre."""
    ax = (np.arange(size, dtype=np.float32) - np.float32((size - 1) / 2.0)) * np.float32(pixel_mm)
    return ax[None, :], ax[:, None]


def _disk(x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float, pix: float) -> np.ndarray:
    """Anti-aliased disk coverage (partial volume over one pixel width)."""
    d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    return np.clip(0.5 + (r - d) / pix, 0.0, 1.0)
