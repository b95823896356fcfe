"""Noise power spectra (NPS): the scanner fingerprint that real tumours carry and fakes lack.

Modality-agnostic: CT passes HU ROIs (NPS in HU^2 mm^2), MRI passes signal ROIs. Noise-only ROIs
come from scanning the same object twice and differencing (the structure cancels, the noise adds
in quadrature, so the difference is divided by sqrt(2)), or from noisy minus noise-free images.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from btd.errors import BTDConfigError, BTDInputError


def _as_stack(noise_rois: np.ndarray) -> np.ndarray:
    rois = np.asarray(noise_rois, dtype=np.float64)
    if rois.ndim == 2:
        rois = rois[None]
    if rois.ndim != 3 or min(rois.shape[1:]) < 4 or rois.shape[0] < 1:
        raise BTDInputError(
            "noise_rois", f"expected (n, h, w) ROIs of at least 4x4, got {rois.shape}"
        )
    if not np.all(np.isfinite(rois)):
        raise BTDInputError("noise_rois", "ROIs contain NaN or inf")
    return rois


def detrend(rois: np.ndarray, method: str = "plane") -> np.ndarray:
    """Remove each ROI's mean ("mean") or best-fit plane ("plane") so low-frequency shading
    (cupping, bias field) does not leak into the lowest NPS bins."""
    rois = _as_stack(rois)
    if method == "mean":
        return rois - rois.mean(axis=(1, 2), keepdims=True)
    if method != "plane":
        raise BTDConfigError("nps.detrend", f"'{method}' is not 'mean' or 'plane'")
    n, h, w = rois.shape
    yy, xx = np.mgrid[:h, :w]
    design = np.stack([np.ones(h * w), yy.ravel() - (h - 1) / 2, xx.ravel() - (w - 1) / 2], 1)
    coef, *_ = np.linalg.lstsq(design, rois.reshape(n, -1).T, rcond=None)
    return rois - (design @ coef).T.reshape(n, h, w)


def nps_2d(
    noise_rois: np.ndarray, pixel_mm: float, detrend_method: str = "plane"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ensemble 2-D NPS (fftshifted): NPS = dx dy / (Nx Ny) <|DFT(roi)|^2>, in units^2 mm^2.

    Returns (fy, fx, nps) with frequencies in cycles/mm; sum(nps) * dfx * dfy = noise variance.
    """
    if not pixel_mm > 0:
        raise BTDConfigError("pixel_mm", f"must be > 0, got {pixel_mm}")
    rois = detrend(noise_rois, detrend_method)
    _, h, w = rois.shape
    power = np.abs(np.fft.fft2(rois)) ** 2
    nps = np.fft.fftshift(power.mean(axis=0)) * (pixel_mm * pixel_mm) / (h * w)
    fy = np.fft.fftshift(np.fft.fftfreq(h, d=pixel_mm))
    fx = np.fft.fftshift(np.fft.fftfreq(w, d=pixel_mm))
    return fy, fx, nps


def noise_power_spectrum(
    noise_rois: np.ndarray, pixel_mm: float, detrend_method: str = "plane"
) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged NPS: (frequencies in cycles/mm, NPS in units^2 mm^2) up to Nyquist.

    Bins are one frequency step (1 / (N pixel_mm)) wide; DC is excluded (removed by detrending).
    """
    fy, fx, nps = nps_2d(noise_rois, pixel_mm, detrend_method)
    df = 1.0 / (max(nps.shape) * pixel_mm)
    radius = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    idx = np.rint(radius / df).astype(int)
    n_bins = int(np.floor(0.5 / pixel_mm / df)) + 1
    sums = np.bincount(idx.ravel(), nps.ravel(), minlength=n_bins)[:n_bins]
    counts = np.bincount(idx.ravel(), minlength=n_bins)[:n_bins]
    freqs = np.arange(n_bins) * df
    radial = sums / np.maximum(counts, 1)
    return freqs[1:], radial[1:]


def nps_summary(noise_rois: np.ndarray, pixel_mm: float) -> dict[str, float]:
    """Scalar descriptors of the noise: std, variance, mean and peak frequency of the NPS."""
    fy, fx, nps = nps_2d(noise_rois, pixel_mm)
    dfy, dfx = fy[1] - fy[0], fx[1] - fx[0]
    variance = float(nps.sum() * dfy * dfx)
    radius = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    freqs, radial = noise_power_spectrum(noise_rois, pixel_mm)
    return {
        "std": float(np.sqrt(variance)),
        "variance": variance,
        "mean_freq": float((radius * nps).sum() / max(nps.sum(), 1e-30)),
        "peak_freq": float(freqs[int(np.argmax(radial))]),
    }


def _windows(region: np.ndarray, roi_size: int, r0: int, c0: int) -> list[tuple[int, int]]:
    h, w = region.shape
    return [
        (r, c)
        for r in range(r0, h - roi_size + 1, roi_size)
        for c in range(c0, w - roi_size + 1, roi_size)
        if region[r : r + roi_size, c : c + roi_size].all()
    ]


def tile_rois(image: np.ndarray, region: np.ndarray, roi_size: int) -> np.ndarray:
    """Non-overlapping roi_size x roi_size windows of `image` that lie wholly inside `region`.

    The grid offset is chosen (in steps of roi_size / 8) to fit the most windows.
    """
    if image.shape != region.shape or image.ndim != 2:
        raise BTDInputError("tile_rois", f"image {image.shape} and region {region.shape} differ")
    step = max(1, roi_size // 8)
    best: list[tuple[int, int]] = []
    for r0 in range(0, roi_size, step):
        for c0 in range(0, roi_size, step):
            found = _windows(region, roi_size, r0, c0)
            if len(found) > len(best):
                best = found
    if not best:
        raise BTDConfigError("nps.roi_size", f"no {roi_size}px ROI fits inside the uniform region")
    return np.stack([image[r : r + roi_size, c : c + roi_size] for r, c in best])


def paired_noise_rois(
    scan: Callable[[np.random.Generator], np.ndarray],
    rng: np.random.Generator,
    region: np.ndarray,
    roi_size: int = 32,
    n_pairs: int = 2,
) -> np.ndarray:
    """Noise-only ROIs: scan the same object twice, (a - b) / sqrt(2), tile inside `region`.

    `scan(rng)` must return one reconstructed image of a fixed object with fresh noise from rng.
    """
    if n_pairs < 1:
        raise BTDConfigError("nps.n_pairs", f"must be >= 1, got {n_pairs}")
    rois = []
    for _ in range(n_pairs):
        diff = (scan(rng).astype(np.float64) - scan(rng).astype(np.float64)) / np.sqrt(2.0)
        rois.append(tile_rois(diff, region, roi_size))
    return np.concatenate(rois)


def reference_noise_rois(
    noisy: np.ndarray, clean: np.ndarray, region: np.ndarray, roi_size: int = 32
) -> np.ndarray:
    """Noise-only ROIs from noisy image(s) minus the noise-free reconstruction of the object."""
    noisy = np.asarray(noisy, dtype=np.float64)
    stack = noisy[None] if noisy.ndim == 2 else noisy
    return np.concatenate([tile_rois(img - clean, region, roi_size) for img in stack])
