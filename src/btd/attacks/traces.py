"""The traces an attack leaves, measured: noise power spectra and high-pass energy, in and out of the mask.

Forensics work on latent-diffusion in-painting (AEROBLADE, CVPR 2024; Mandelli et al. 2024) finds the
autoencoder's round trip in the *whole* image: SD's pipeline decodes every pixel, so the unmasked part
changes too, unless the original is pasted back. These functions put numbers on that for every
scenario, fake vs real: the radially averaged noise power spectrum (NPS) of the region inside the
tamper mask and of the rest of the patch, and the ratio of high-pass energy fake / real in each.
Reals have no mask; they are measured in the same reference region as `testsets.realism_stats`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

from btd.attacks.testsets import highpass_residual, reference_regions
from btd.scenarios import attacker_of, is_paste_back, modality_of

REGIONS = ("inside mask", "outside mask")


def _outside(regions: np.ndarray, band: int = 2) -> np.ndarray:
    """Everything beyond a `band`-pixel ring around each region (its edge blends both sides)."""
    return np.stack([~ndimage.binary_dilation(r, iterations=band) for r in regions])


def radial_nps(
    images: np.ndarray, regions: np.ndarray, n_bins: int = 12
) -> tuple[np.ndarray, np.ndarray]:
    """Mean radially averaged NPS of each image's de-meaned `region`: (frequencies in cycles/px, NPS).

    The region acts as the window (NPS = |FFT(region * (x - mean))|^2 / area), the standard estimate
    for an irregular region of interest; bins run from 0 to the Nyquist frequency 0.5.
    """
    imgs = np.asarray(images, dtype=np.float64).reshape(regions.shape)
    p = imgs.shape[-1]
    f = np.fft.fftfreq(p)
    radius = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    edges = np.linspace(0, 0.5, n_bins + 1)
    which = np.digitize(radius, edges) - 1
    keep = (which >= 0) & (which < n_bins)
    total, count = np.zeros(n_bins), 0
    for img, reg in zip(imgs, regions, strict=True):
        area = reg.sum()
        if area < 4:
            continue
        x = np.where(reg, img - img[reg].mean(), 0.0)
        power = np.abs(np.fft.fft2(x)) ** 2 / area
        total += np.bincount(which[keep], power[keep], n_bins) / np.maximum(
            np.bincount(which[keep], minlength=n_bins), 1
        )
        count += 1
    return 0.5 * (edges[1:] + edges[:-1]), total / max(count, 1)


def nps_log_ratio(
    images: np.ndarray, reference: np.ndarray, n_bins: int = 12
) -> tuple[np.ndarray, np.ndarray]:
    """log10 of the whole-patch radial NPS of `images` over that of `reference`, per frequency bin:
    0 everywhere = the same noise texture (how far a DDPM's samples are from the scanner's)."""
    imgs = np.asarray(images, dtype=np.float64).reshape(len(images), *np.shape(images)[-2:])
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), *np.shape(reference)[-2:])
    f, a = radial_nps(imgs, np.ones(imgs.shape, bool), n_bins)
    _, b = radial_nps(ref, np.ones(ref.shape, bool), n_bins)
    tiny = np.finfo(np.float64).tiny
    return f, np.log10(np.maximum(a, tiny) / np.maximum(b, tiny))


def highpass_energy(images: np.ndarray, regions: np.ndarray, sigma: float = 1.0) -> float:
    """Mean squared high-pass residual over the regions of all images."""
    resid = highpass_residual(images, sigma).reshape(regions.shape)
    return float((resid[regions] ** 2).mean()) if regions.any() else float("nan")


def scenario_regions(masks: np.ndarray, meta: pd.DataFrame) -> dict[str, np.ndarray]:
    """Inside (tamper mask, or the reference square for reals) and outside (beyond a ring) per sample."""
    inside = reference_regions(meta, np.asarray(masks))
    return {REGIONS[0]: inside, REGIONS[1]: _outside(inside)}


def _variant(scenario: str) -> str:
    return attacker_of(scenario) + ("-Paste" if is_paste_back(scenario) else "")


def spectra(
    testsets: dict[str, tuple[np.ndarray, np.ndarray, pd.DataFrame]], n_bins: int = 12
) -> pd.DataFrame:
    """Long table: scenario, modality, attacker variant, group (real/fake), region, freq, nps."""
    rows = []
    for name, (images, masks, meta) in testsets.items():
        regions = scenario_regions(masks, meta)
        fake = meta["fake"].to_numpy() == 1
        for group, sel in (("real", ~fake), ("fake", fake)):
            for region, reg in regions.items():
                freq, nps = radial_nps(images[sel], reg[sel], n_bins)
                rows += [
                    {"scenario": name, "modality": modality_of(name), "attacker": _variant(name),
                     "group": group, "region": region, "freq": fr, "nps": v}
                    for fr, v in zip(freq, nps, strict=True)
                ]  # fmt: skip
    return pd.DataFrame(rows)


def energy_ratios(testsets: dict[str, tuple[np.ndarray, np.ndarray, pd.DataFrame]]) -> pd.DataFrame:
    """Per scenario: high-pass energy of fakes / reals inside and outside the mask (1 = no trace)."""
    rows = []
    for name, (images, masks, meta) in testsets.items():
        regions = scenario_regions(masks, meta)
        fake = meta["fake"].to_numpy() == 1
        row = {"scenario": name}
        for region, reg in regions.items():
            real_e = highpass_energy(images[~fake], reg[~fake])
            row[f"highpass ratio {region}"] = highpass_energy(images[fake], reg[fake]) / real_e
        rows.append(row)
    return pd.DataFrame(rows).set_index("scenario")
