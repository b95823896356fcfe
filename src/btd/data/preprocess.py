"""Intensity normalisation as in the paper: CT clipped to -700..2000 HU, MRI standardised per patient."""

from __future__ import annotations

import numpy as np

CT_HU_MIN = -700.0
CT_HU_MAX = 2000.0


def normalize_ct(hu: np.ndarray) -> np.ndarray:
    """Clip HU to [-700, 2000] (air .. bone) and map linearly to [0, 1], as BTD's CT loader does."""
    hu = np.asarray(hu, dtype=np.float32)
    return ((np.clip(hu, CT_HU_MIN, CT_HU_MAX) - CT_HU_MIN) / (CT_HU_MAX - CT_HU_MIN)).astype(
        np.float32
    )


def normalize_mri_patient(
    volume: np.ndarray, clip_percentiles: tuple[float, float] = (0.5, 99.5)
) -> np.ndarray:
    """Standardise one patient's MRI volume (z-score), then scale to [0, 1].

    The z-score removes the scanner's arbitrary intensity gain; the percentile clip keeps a few bright
    vessels or artefacts from compressing the whole tissue range into a sliver of [0, 1].
    """
    v = np.asarray(volume, dtype=np.float64)
    std = v.std()
    z = (v - v.mean()) / (std if std > 0 else 1.0)
    lo, hi = np.percentile(z, clip_percentiles)
    if hi <= lo:
        return np.zeros_like(z, dtype=np.float32)
    return ((np.clip(z, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def normalize_volume(volume: np.ndarray, modality: str) -> np.ndarray:
    """Dispatch on modality so callers need not know the rule of each one."""
    if modality == "ct":
        return normalize_ct(volume)
    if modality == "mri":
        return normalize_mri_patient(volume)
    raise ValueError(f"unknown modality {modality!r}")
