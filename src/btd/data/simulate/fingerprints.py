"""Each virtual scanner's noise fingerprint: noise power spectra measured on a uniform phantom.

CT: a 20 cm water cylinder scanned twice, (a - b) / sqrt(2). MRI: a uniform fat disc acquired with and
without noise (same bias field), noisy - clean. Both are tiled into noise-only ROIs and fed to the NPS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from btd.data.simulate import mri
from btd.data.simulate.ct import ct_noise_rois
from btd.data.simulate.nps import noise_power_spectrum, nps_summary, reference_noise_rois
from btd.data.simulate.protocols import MRIScanner, load_protocols, select_scanners


def _roi_size(size: int) -> int:
    return int(min(32, max(8, size // 8)))


def mri_noise_rois(
    scanner: MRIScanner, seed: int, size: int, pixel_mm: float, n_images: int = 2
) -> np.ndarray:
    """Noise-only ROIs of one MRI scanner from a uniform fat disc (the MRI analogue of a water phantom)."""
    yy, xx = (np.mgrid[:size, :size] - (size - 1) / 2.0) * pixel_mm
    radius = 0.4 * size * pixel_mm
    disc = (np.hypot(yy, xx) <= radius).astype(np.float32)
    pd, t1, t2s = mri.TISSUE_PARAMS[mri.FAT]
    maps = {"pd": pd * disc, "t1": np.full_like(disc, t1), "t2s": np.full_like(disc, t2s)}
    maps["label"] = (disc * mri.FAT).astype(np.uint8)
    maps["breast"] = disc.astype(bool)
    rng = np.random.default_rng(seed)
    bias = mri.bias_field(rng, disc.shape, scanner.bias_strength, pixel_mm)
    clean = mri.scan_mri_slice(maps, scanner, rng, pixel_mm, bias=bias, noise=False)
    noisy = np.stack(
        [mri.scan_mri_slice(maps, scanner, rng, pixel_mm, bias=bias) for _ in range(n_images)]
    )
    region = np.hypot(yy, xx) <= 0.7 * radius
    return reference_noise_rois(noisy, clean, region, _roi_size(size)) / mri.fat_reference(scanner)


def noise_rois(modality: str, scanner, seed: int, size: int, pixel_mm: float) -> np.ndarray:
    """Noise-only ROIs of one scanner (CT in HU; MRI relative to the fat signal)."""
    if modality == "ct":
        return ct_noise_rois(
            scanner, seed=seed, size=size, pixel_mm=pixel_mm, roi_size=_roi_size(size)
        )
    return mri_noise_rois(scanner, seed, size, pixel_mm)


def scanner_nps(
    modality: str,
    raw_dir: str | Path,
    names: list[str],
    pixel_mm: float,
    seed: int = 0,
    size: int = 256,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Radial NPS of each named scanner: {name: (frequencies 1/mm, NPS)}."""
    protocols = load_protocols(Path(raw_dir) / "virtual_scanners" / f"{modality}.yaml", modality)
    scanners = select_scanners(protocols, names, f"data.{modality}.scanners")
    return {
        s.name: noise_power_spectrum(noise_rois(modality, s, seed, size, pixel_mm), pixel_mm)
        for s in scanners
    }


def scanner_noise_table(
    modality: str,
    raw_dir: str | Path,
    names: list[str],
    pixel_mm: float,
    seed: int = 0,
    size: int = 256,
) -> dict[str, dict[str, float]]:
    """Noise std and NPS mean/peak frequency per scanner (a table beside the NPS figure)."""
    protocols = load_protocols(Path(raw_dir) / "virtual_scanners" / f"{modality}.yaml", modality)
    scanners = select_scanners(protocols, names, f"data.{modality}.scanners")
    return {
        s.name: nps_summary(noise_rois(modality, s, seed, size, pixel_mm), pixel_mm)
        for s in scanners
    }
