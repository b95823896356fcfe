"""Virtual CT patients: a generated chest (`ct_phantom`) scanned slice by slice by the virtual
CT scanner (`ct_scanner`).

`scan_ct_patient` assembles the two: it builds the anatomy on <= 0.5 mm sub-slices, averages them
over the scanner's slice thickness and reconstructs each slice in HU. The scanner chain and the
projector are described in `ct_scanner`, the anatomy in `ct_phantom`; the scanner and phantom
names that callers use are re-exported here.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from btd.data.records import ScanVolume
from btd.data.simulate.ct_phantom import NODULE_KINDS, make_chest_phantom
from btd.data.simulate.ct_scanner import (
    HU_MAX,
    HU_MIN,
    ct_noise_rois,
    hu_to_mu,
    make_water_phantom,
    scan_slice,
)
from btd.data.simulate.protocols import CTScanner
from btd.errors import BTDConfigError

__all__ = [
    "HU_MAX", "HU_MIN", "NODULE_KINDS", "ct_noise_rois", "hu_to_mu", "make_chest_phantom",
    "make_water_phantom", "scan_ct_patient", "scan_slice",
]  # fmt: skip


def _sub_slices(thickness_mm: float) -> int:
    """Thin sub-slices per reconstructed slice (<= 0.5 mm each) for thickness averaging."""
    return max(1, int(np.ceil(thickness_mm / 0.5 - 1e-9)))


def scan_ct_patient(
    patient: str,
    scanner: CTScanner,
    seed: int,
    n_slices: int,
    size: int,
    pixel_mm: float,
    n_nodules: int,
    nodule_diameter_mm: tuple[float, float] = (3.0, 30.0),
) -> ScanVolume:
    """Generate one patient's chest and scan it slice by slice with `scanner` (int16 HU volume).

    The anatomy is built on <= 0.5 mm sub-slices and averaged over the scanner's slice thickness
    before projection, so partial volume and small-nodule contrast depend on the thickness.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise BTDConfigError("ct.seed", f"must be a non-negative integer, got {seed!r}")
    anatomy_ss, noise_ss = np.random.SeedSequence(seed).spawn(2)
    thickness = float(scanner.slice_thickness_mm)
    sub = _sub_slices(thickness)
    fine, fine_tumours = make_chest_phantom(
        np.random.default_rng(anatomy_ss),
        n_slices * sub,
        size,
        pixel_mm,
        thickness / sub,
        n_nodules,
        tuple(nodule_diameter_mm),
    )
    thick = fine.reshape(n_slices, sub, size, size).mean(axis=1)
    noise_rng = np.random.default_rng(noise_ss)
    out = np.empty((n_slices, size, size), dtype=np.int16)
    for k in range(n_slices):
        recon = scan_slice(thick[k], scanner, noise_rng, pixel_mm)
        out[k] = np.clip(np.rint(recon), HU_MIN, HU_MAX).astype(np.int16)
    tumours = [dataclasses.replace(t, z=(t.z + 0.5) / sub - 0.5) for t in fine_tumours]
    return ScanVolume(
        patient=patient,
        modality="ct",
        scanner=scanner.name,
        volume=out,
        spacing=(thickness, float(pixel_mm), float(pixel_mm)),
        tumours=tumours,
        source="virtual",
    )
