"""Intensity normalisation as in the paper: CT clipped to -700..2000 HU, MRI standardised per patient."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CT_HU_MIN = -700.0
CT_HU_MAX = 2000.0


def normalize_ct(hu: np.ndarray) -> np.ndarray:
    """Clip HU to [-700, 2000] (air .. bone) and map linearly to [0, 1], as BTD's CT loader does."""
    hu = np.asarray(hu, dtype=np.float32)
    return ((np.clip(hu, CT_HU_MIN, CT_HU_MAX) - CT_HU_MIN) / (CT_HU_MAX - CT_HU_MIN)).astype(
        np.float32
    )


@dataclass(frozen=True)
class MRINormaliser:
    """One patient's MRI standardisation (z-score, percentile clip, [0, 1]), applicable to any array
    of that patient's stored values: reals and an attacker's re-quantised fakes share the same grid."""

    mean: float
    std: float
    lo: float
    hi: float

    @classmethod
    def fit(
        cls, volume: np.ndarray, clip_percentiles: tuple[float, float] = (0.5, 99.5)
    ) -> MRINormaliser:
        v = np.asarray(volume, dtype=np.float64)
        std = v.std()
        std = float(std if std > 0 else 1.0)
        z = (v - v.mean()) / std
        lo, hi = np.percentile(z, clip_percentiles)
        return cls(float(v.mean()), std, float(lo), float(hi))

    def __call__(self, stored: np.ndarray) -> np.ndarray:
        z = (np.asarray(stored, dtype=np.float64) - self.mean) / self.std
        if self.hi <= self.lo:
            return np.zeros_like(z, dtype=np.float32)
        return ((np.clip(z, self.lo, self.hi) - self.lo) / (self.hi - self.lo)).astype(np.float32)

    def stored(self, x01: np.ndarray) -> np.ndarray:
        """The stored values (float, not yet rounded) that normalise to `x01`."""
        z = np.asarray(x01, dtype=np.float64) * (self.hi - self.lo) + self.lo
        return z * self.std + self.mean


def normalize_mri_patient(
    volume: np.ndarray, clip_percentiles: tuple[float, float] = (0.5, 99.5)
) -> np.ndarray:
    """Standardise one patient's MRI volume (z-score), then scale to [0, 1].

    The z-score removes the scanner's arbitrary intensity gain; the percentile clip keeps a few bright
    vessels or artefacts from compressing the whole tissue range into a sliver of [0, 1].
    """
    return MRINormaliser.fit(volume, clip_percentiles)(volume)


def to_stored_grid(x01: np.ndarray, modality: str, volume: np.ndarray | None = None) -> np.ndarray:
    """Normalised pixels as they are after a round trip through the scanner's stored type.

    An attacker who writes a scan back (DICOM) writes the scanner's integers (int16 HU for CT, the
    MRI scanner's 8-bit magnitude); a fake left between those values is separable by its number
    format alone. CT: round HU to integers; MRI: round to the integers of the patient's `volume`.
    """
    x01 = np.asarray(x01, dtype=np.float32)
    if modality == "ct":
        hu = x01.astype(np.float64) * (CT_HU_MAX - CT_HU_MIN) + CT_HU_MIN
        return normalize_ct(np.rint(hu))
    if modality == "mri":
        if volume is None:
            raise ValueError("MRI re-quantisation needs the patient's stored volume")
        norm = MRINormaliser.fit(volume)
        info = np.iinfo(volume.dtype) if np.issubdtype(volume.dtype, np.integer) else None
        stored = np.rint(norm.stored(x01))
        if info is not None:
            stored = np.clip(stored, info.min, info.max)
        return norm(stored)
    raise ValueError(f"unknown modality {modality!r}")


def normalize_volume(volume: np.ndarray, modality: str) -> np.ndarray:
    """Dispatch on modality so callers need not know the rule of each one."""
    if modality == "ct":
        return normalize_ct(volume)
    if modality == "mri":
        return normalize_mri_patient(volume)
    raise ValueError(f"unknown modality {modality!r}")
