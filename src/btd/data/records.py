"""The common in-memory form of a scan, shared by the virtual scanners and the real-data loaders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Modality = Literal["ct", "mri"]


@dataclass
class Tumour:
    """A tumour annotation in voxel coordinates of its volume (z = slice index, y = row, x = column)."""

    z: float
    y: float
    x: float
    diameter_mm: float
    kind: str = "solid"


@dataclass
class ScanVolume:
    """One patient's scan as the scanner wrote it.

    CT volumes are int16 Hounsfield units; MRI volumes are the scanner's magnitude output
    (uint8 for the virtual scanners and the BTD Kaggle sets, any real dtype for DICOM).
    `spacing` is (dz, dy, dx) in millimetres. No patient identifiers from file headers are kept:
    `patient` is a pseudonym chosen by the loader.
    """

    patient: str
    modality: Modality
    scanner: str
    volume: np.ndarray
    spacing: tuple[float, float, float]
    tumours: list[Tumour] = field(default_factory=list)
    source: str = "virtual"

    def __post_init__(self) -> None:
        if self.volume.ndim != 3:
            raise ValueError(
                f"{self.patient}: volume must be 3-D (Z, Y, X), got shape {self.volume.shape}"
            )
