"""Virtual breast MRI: a generated breast (`mri_phantom`) "scanned" by physically modelled MRI
scanners (`mri_scanner`); `scan_mri_patient` assembles the two.

The anatomy is a set of tissue-parameter maps (PD, T1 and T2* at 1.5 T, post-contrast), so that a
tumour exists *before* the acquisition and carries exactly the scanner's noise, blur and ringing;
a fake pasted into the 8-bit export later does not. The scanner chain is
spoiled-GRE signal -> B1 bias -> coil sensitivities -> FFT -> k-space sampling (matrix, partial
Fourier, apodisation) -> complex Gaussian noise per coil -> IFFT -> root-sum-of-squares, which
gives Rician (1 coil) or noncentral-chi (N coils) magnitude noise, then an 8-bit export.

Geometry is in FOV units (1 = image width) so that the operator's FOV always covers the body;
texture, skin, masses and vessels are in millimetres. Image rows run anterior (top) to posterior.
"""

from __future__ import annotations

import zlib

import numpy as np

from btd.data.records import ScanVolume
from btd.data.simulate.mri_phantom import (
    AIR,
    FAT,
    FGT,
    MAP_KEYS,
    MASS,
    MASS_KINDS,
    MUSCLE,
    NECROSIS,
    SKIN,
    TISSUE_PARAMS,
    make_breast_phantom,
)
from btd.data.simulate.mri_scanner import (
    acquire,
    bias_field,
    coil_maps,
    export_window,
    fat_reference,
    gre_signal,
    image_noise_std,
    kspace_noise_std,
    kspace_sampling,
    quantise,
    scan_mri_slice,
)
from btd.data.simulate.protocols import MRIScanner

__all__ = [
    "AIR", "FAT", "FGT", "MASS", "MUSCLE", "NECROSIS", "SKIN", "TISSUE_PARAMS", "fat_reference",
    "MAP_KEYS", "MASS_KINDS", "acquire", "bias_field", "coil_maps", "export_window", "gre_signal",
    "image_noise_std", "kspace_noise_std", "kspace_sampling", "make_breast_phantom", "quantise",
    "scan_mri_patient", "scan_mri_slice",
]  # fmt: skip


def scan_mri_patient(
    patient: str,
    scanner: MRIScanner,
    seed: int,
    n_slices: int,
    size: int,
    pixel_mm: float,
    n_masses: int,
    mass_diameter_mm: tuple[float, float] = (5.0, 40.0),
    slice_mm: float = 2.0,
) -> ScanVolume:
    """Generate one patient (anatomy from `seed` alone) and scan it: uint8 ScanVolume.

    The same seed gives the same anatomy on every scanner; noise and B1 field depend on the
    seed and the scanner name.
    """
    maps, tumours = make_breast_phantom(
        np.random.default_rng([int(seed), 0x4D52]),
        n_slices,
        size,
        pixel_mm,
        slice_mm,
        n_masses,
        tuple(mass_diameter_mm),
    )
    rng = np.random.default_rng([int(seed), 0x5343, zlib.crc32(scanner.name.encode())])
    bias = bias_field(rng, maps["pd"].shape, scanner.bias_strength, pixel_mm, slice_mm)
    vol = np.stack(
        [
            scan_mri_slice({k: maps[k][z] for k in MAP_KEYS}, scanner, rng, pixel_mm, bias[z])
            for z in range(maps["pd"].shape[0])
        ]
    )
    return ScanVolume(
        patient=patient,
        modality="mri",
        scanner=scanner.name,
        volume=quantise(vol, scanner),
        spacing=(float(slice_mm), float(pixel_mm), float(pixel_mm)),
        tumours=tumours,
        source="virtual",
    )
