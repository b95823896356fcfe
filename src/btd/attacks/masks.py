"""Tamper masks for the diffusion in-painting attack (1 = pixel the attacker may change).

The paper (section 5.3.3) used a *uniform* 32x32 mask for CT (at ~0.7 mm pixels) and, for MRI, a mask that
*follows the tumour size* (which is why large MRI tumours are harder to detect: less context is left).
We scale the CT square with the pixel size (32 px at 0.7 mm = 16 px at 1.4 mm) and draw the MRI mask as
a disc (or ellipse) of the tumour's diameter plus a margin. An injection at a healthy site has no tumour,
so its size is drawn from the training tumour sizes, as an attacker would pick a plausible one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from btd.errors import BTDConfigError, BTDInputError

PAPER_CT_MASK_PX = 32  # paper: uniform 32x32 CT mask
PAPER_PIXEL_MM = 0.7  # ~LIDC in-plane pixel size the 32 px refer to


def scaled_mask_px(
    pixel_mm: float, paper_px: int = PAPER_CT_MASK_PX, paper_pixel_mm: float = PAPER_PIXEL_MM
) -> int:
    """Side in pixels covering the same field of view as the paper's mask (>= 3 px)."""
    if pixel_mm <= 0:
        raise BTDConfigError("pixel_mm", f"must be > 0, got {pixel_mm}")
    return max(3, int(round(paper_px * paper_pixel_mm / pixel_mm)))


def _check_site(size: int, cy: float, cx: float) -> None:
    if not (0 <= cy < size and 0 <= cx < size):
        raise BTDInputError("mask site", f"centre ({cy}, {cx}) outside a {size}x{size} patch")


def square_mask(size: int, cy: int, cx: int, side: int) -> np.ndarray:
    """A `side` x `side` square centred on (cy, cx), clipped to the patch (CT masks)."""
    _check_site(size, cy, cx)
    if side < 1:
        raise BTDConfigError("ct_mask_px", f"must be >= 1, got {side}")
    mask = np.zeros((size, size), dtype=np.uint8)
    y0, x0 = int(cy) - side // 2, int(cx) - side // 2
    mask[max(y0, 0) : max(y0 + side, 0), max(x0, 0) : max(x0 + side, 0)] = 1
    return mask


def disc_mask(
    size: int, cy: float, cx: float, diameter_px: float, aspect: float = 1.0
) -> np.ndarray:
    """A disc of `diameter_px` centred on (cy, cx); `aspect` != 1 stretches it along x (ellipse)."""
    _check_site(size, cy, cx)
    if diameter_px <= 0 or aspect <= 0:
        raise BTDConfigError("mri mask", f"diameter {diameter_px} and aspect {aspect} must be > 0")
    ry = diameter_px / 2.0
    rx = ry * aspect
    yy, xx = np.mgrid[:size, :size]
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    inside[int(round(cy)), int(round(cx))] = True  # never empty, even for sub-pixel tumours
    return inside.astype(np.uint8)


def tumour_mask_diameter_px(diameter_mm: float, pixel_mm: float, margin_mm: float) -> float:
    """Mask diameter in pixels: the tumour plus `margin_mm` on each side (>= 3 px)."""
    if pixel_mm <= 0 or margin_mm < 0:
        raise BTDConfigError(
            "mri_margin_mm", f"pixel {pixel_mm} must be > 0 and margin {margin_mm} >= 0"
        )
    return max(3.0, (float(diameter_mm) + 2.0 * margin_mm) / pixel_mm)


def sample_tumour_diameters(
    train_diameters_mm: Sequence[float], n: int, rng: np.random.Generator
) -> np.ndarray:
    """Sizes for injections at healthy sites, drawn (with replacement) from real training tumours."""
    pool = np.asarray(train_diameters_mm, dtype=np.float64)
    pool = pool[np.isfinite(pool) & (pool > 0)]
    if pool.size == 0:
        raise BTDInputError(
            "training manifest", "no tumour diameters > 0 to draw injection sizes from"
        )
    return rng.choice(pool, size=n, replace=True)


def site_masks(
    modality: str,
    size: int,
    centres: np.ndarray,
    diameters_mm: Sequence[float],
    pixel_mm: float,
    ct_mask_px: int | None = None,
    mri_margin_mm: float = 2.0,
) -> np.ndarray:
    """(N, size, size) uint8 masks: CT = uniform square, MRI = disc following each tumour's size.

    `centres` are (py, px) inside the patch; `ct_mask_px=None` scales the paper's 32 px to `pixel_mm`.
    """
    centres = np.asarray(centres).reshape(-1, 2)
    if len(diameters_mm) != len(centres):
        raise BTDInputError(
            "site_masks", f"{len(centres)} centres but {len(diameters_mm)} diameters"
        )
    if modality == "ct":
        side = scaled_mask_px(pixel_mm) if ct_mask_px is None else int(ct_mask_px)
        masks = [square_mask(size, int(cy), int(cx), side) for cy, cx in centres]
    elif modality == "mri":
        masks = [
            disc_mask(size, cy, cx, tumour_mask_diameter_px(d, pixel_mm, mri_margin_mm))
            for (cy, cx), d in zip(centres, diameters_mm, strict=True)
        ]
    else:
        raise BTDConfigError("modality", f"must be 'ct' or 'mri', got {modality!r}")
    return np.stack(masks).astype(np.uint8) if masks else np.zeros((0, size, size), np.uint8)


def soft_blend(mask: np.ndarray, border_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Feather a binary mask: alpha = 1 inside, raised-cosine fall-off to 0 over `border_px` outside.

    Returns (alpha float32, region uint8) where `region` (alpha > 0) is every pixel that may change,
    i.e. the tamper mask to record. `border_px = 0` returns the mask itself (hard edge).
    """
    mask = np.asarray(mask).astype(bool)
    if mask.ndim == 3:  # a stack: feather each mask on its own
        if len(mask) == 0:
            return mask.astype(np.float32), mask.astype(np.uint8)
        pairs = [soft_blend(m, border_px) for m in mask]
        return np.stack([a for a, _ in pairs]), np.stack([r for _, r in pairs])
    if border_px < 0:
        raise BTDConfigError("blend_border_px", f"must be >= 0, got {border_px}")
    if border_px == 0 or not mask.any():
        return mask.astype(np.float32), mask.astype(np.uint8)
    dist = ndimage.distance_transform_edt(~mask)  # 0 inside, distance to the mask outside
    ramp = np.clip(dist / (border_px + 1.0), 0.0, 1.0)
    alpha = np.where(mask, 1.0, 0.5 * (1.0 + np.cos(np.pi * ramp))).astype(np.float32)
    alpha[dist >= border_px + 1.0] = 0.0
    return alpha, (alpha > 0).astype(np.uint8)
