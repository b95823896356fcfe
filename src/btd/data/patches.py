"""Patch extraction around tumours (TM) and around healthy locations drawn from the tumour-location pool (TB)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from btd.data.records import ScanVolume


@dataclass(frozen=True)
class PatchSite:
    """Where a patch is cut: slice, centre (row, col) in the slice, and what is there."""

    z: int
    cy: int
    cx: int
    label: str  # "TM" (real tumour) or "TB" (healthy)
    diameter_mm: float = 0.0


def patch_origin(cy: int, cx: int, size: int, shape: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner of a `size` patch centred on (cy, cx), shifted to stay inside the image.

    Shifting (rather than padding) follows the paper's training loader: every patch is all anatomy.
    """
    h, w = shape
    if size > h or size > w:
        raise ValueError(f"patch size {size} larger than image {shape}")
    y0 = int(np.clip(cy - size // 2, 0, h - size))
    x0 = int(np.clip(cx - size // 2, 0, w - size))
    return y0, x0


def extract_patch(image: np.ndarray, cy: int, cx: int, size: int) -> tuple[np.ndarray, int, int]:
    """Cut the patch; return it with the site's position inside the patch (py, px)."""
    y0, x0 = patch_origin(cy, cx, size, image.shape)
    return image[y0 : y0 + size, x0 : x0 + size], cy - y0, cx - x0


def tumour_sites(scan: ScanVolume, core_fraction: float = 0.5) -> list[PatchSite]:
    """TM sites: every slice through the central part of each tumour (|dz| <= core_fraction * radius)."""
    dz = scan.spacing[0]
    sites = []
    for t in scan.tumours:
        reach = core_fraction * t.diameter_mm / 2.0
        zs = [z for z in range(scan.volume.shape[0]) if abs(z - t.z) * dz <= max(reach, dz / 2)]
        for z in zs:
            sites.append(PatchSite(z, int(round(t.y)), int(round(t.x)), "TM", float(t.diameter_mm)))
    return sites


def _far_from_tumours(scan: ScanVolume, z: int, y: float, x: float, margin_mm: float) -> bool:
    dz, dy, _ = scan.spacing
    for t in scan.tumours:
        dist_mm = np.sqrt(((z - t.z) * dz) ** 2 + ((y - t.y) * dy) ** 2 + ((x - t.x) * dy) ** 2)
        if dist_mm < t.diameter_mm / 2 + margin_mm:
            return False
    return True


def healthy_sites(
    scan: ScanVolume,
    location_pool: np.ndarray,
    per_slice: int,
    rng: np.random.Generator,
    margin_mm: float = 20.0,
    max_tries: int = 50,
) -> list[PatchSite]:
    """TB sites: per slice, locations drawn from the pool of tumour locations (of any patient).

    The paper picks healthy regions "randomly from the list of tumor locations to reflect the potential
    for containing a tumor"; we also keep them `margin_mm` away from this patient's real tumours.
    """
    if len(location_pool) == 0:
        raise ValueError("empty tumour-location pool: no tumours were annotated in this cohort")
    sites = []
    for z in range(scan.volume.shape[0]):
        taken = 0
        for _ in range(max_tries):
            if taken >= per_slice:
                break
            y, x = location_pool[rng.integers(len(location_pool))]
            if _far_from_tumours(scan, z, y, x, margin_mm):
                sites.append(PatchSite(z, int(y), int(x), "TB"))
                taken += 1
    return sites
