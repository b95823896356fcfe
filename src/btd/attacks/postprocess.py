"""CT-GAN's paste-back: HU fix-up, noise touch-up and alpha blending of a generated cube.

Follows `attack_pipeline.py :: scan_manipulator.tamper` of the CT-GAN reference (see
reference/attacks_baselines.md, section 1.5), with one deliberate change the BTD tests rely on: the
blend weight is a smooth *spherical* mask in mm (1 inside `inner_mm`, raised-cosine fall-off,
exactly 0 from `outer_mm` on) instead of CT-GAN's xy-only Gaussian over a 1.3x larger cube, so
every voxel outside the blend sphere is bit-identical to the original scan.

- injection (CT-GAN): factor = alpha * sigmoid((gen + 700) / 70) -- only dense generated voxels are
  blended in -- and the result is max(blend, original): an injection can only add density.
- removal (CT-GAN): result = alpha * gen + (1 - alpha) * original.
- noise touch-up: before blending, noise is added to the generated region, because the generator's
  output is smoother than a real scan. CT-GAN copies a noise cube from a lung location of the same
  scan (`copynoise=True`); here `noise="copy"` takes the in-plane high-pass residual of the most
  homogeneous window of the same slices (so it carries this scanner's noise texture), scaled to
  the robust noise std of the tissue around the site. `noise="gaussian"` adds white noise of that
  std (CT-GAN's `copynoise=False`), `noise="none"` adds nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage, special

from btd.attacks.cubes import Centre, check_cube_geometry, cube_to_scan, scan_box
from btd.errors import BTDConfigError, BTDInputError

HU_MIN, HU_MAX = -1024, 3071  # int16 HU range the virtual scanners write
NOISE_MODES = ("copy", "gaussian", "none")
_HIGHPASS_SIGMA_MM = 3.0  # in-plane smoothing that separates noise from anatomy


def fix_hu(cube: np.ndarray) -> np.ndarray:
    """CT-GAN's artefact fix: > 2000 HU takes the 5^3 neighbourhood mean, < -1000 becomes -1000."""
    out = np.asarray(cube, dtype=np.float32).copy()
    hot = out > 2000
    if hot.any():
        out[hot] = ndimage.uniform_filter(out, size=5, mode="nearest")[hot]
    return np.maximum(out, -1000.0)


def spherical_alpha(
    offsets_mm: tuple[np.ndarray, np.ndarray, np.ndarray], inner_mm: float, outer_mm: float
) -> np.ndarray:
    """Blend weight: 1 within inner_mm, raised cosine down to exactly 0 at outer_mm and beyond."""
    if not 0 <= inner_mm < outer_mm:
        raise BTDConfigError(
            "ctgan.blend", f"need 0 <= inner_mm < outer_mm, got {inner_mm}, {outer_mm}"
        )
    dz, dy, dx = offsets_mm
    r = np.sqrt(dz**2 + dy**2 + dx**2)
    t = np.clip((r - inner_mm) / (outer_mm - inner_mm), 0.0, 1.0)
    alpha = 0.5 * (1.0 + np.cos(np.pi * t))
    alpha[r >= outer_mm] = 0.0
    return alpha.astype(np.float32)


def highpass(region: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """In-plane high-pass residual (noise + fine texture): CT slices are reconstructed singly."""
    sig = (0.0, _HIGHPASS_SIGMA_MM / spacing[1], _HIGHPASS_SIGMA_MM / spacing[2])
    region = region.astype(np.float32)
    return region - ndimage.gaussian_filter(region, sig, mode="nearest")


def robust_std(values: np.ndarray) -> float:
    """1.4826 x median absolute deviation: the noise std, insensitive to edges in the residual."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def local_noise_std(region: np.ndarray, spacing: Sequence[float], where: np.ndarray) -> float:
    """Noise std of the tissue around the site: robust std of the high-pass residual on flat voxels.

    Edges leave large residuals, so only the flatter half of the `where` voxels (by in-plane
    gradient magnitude of the smoothed region) is used.
    """
    if not where.any():
        where = np.ones(region.shape, dtype=bool)
    res = highpass(region, spacing)
    smooth = region - res
    grad = np.hypot(ndimage.sobel(smooth, axis=1), ndimage.sobel(smooth, axis=2))
    flat = where & (grad <= np.median(grad[where]))
    return robust_std(res[flat])


def _noise_source(
    volume: np.ndarray,
    box: tuple[slice, slice, slice],
    avoid: list[tuple[float, float]],
    avoid_px: float,
    rng: np.random.Generator,
) -> tuple[slice, slice, slice] | None:
    """An in-plane window of the box's size in the same slices: homogeneous, inside the body.

    Candidates on a half-window grid; the 3 with the least smoothed structure (std of the
    Gaussian-smoothed window) among those with mean HU in [-950, 300] and away from the site and the
    tumours (`avoid`, (y, x) voxels) are kept and one is drawn at random (CT-GAN's lung noise cube).
    """
    zs, ys, xs = box
    h, w = ys.stop - ys.start, xs.stop - xs.start
    _, ny, nx = volume.shape
    if h < 2 or w < 2 or h > ny or w > nx:
        return None
    cands = []
    for y0 in range(0, ny - h + 1, max(1, h // 2)):
        for x0 in range(0, nx - w + 1, max(1, w // 2)):
            cy, cx = y0 + h / 2, x0 + w / 2
            if any(np.hypot(cy - ay, cx - ax) < avoid_px for ay, ax in avoid):
                continue
            win = volume[zs, y0 : y0 + h, x0 : x0 + w].astype(np.float32)
            mean = float(win.mean())
            if not -950.0 <= mean <= 300.0:
                continue
            structure = float(ndimage.gaussian_filter(win, (0, 2, 2)).std())
            cands.append((structure, y0, x0))
    if not cands:
        return None
    cands.sort()
    _, y0, x0 = cands[int(rng.integers(min(3, len(cands))))]
    return zs, slice(y0, y0 + h), slice(x0, x0 + w)


def noise_field(
    volume: np.ndarray,
    spacing: Sequence[float],
    box: tuple[slice, slice, slice],
    target_std: float,
    mode: str,
    rng: np.random.Generator,
    avoid: list[tuple[float, float]],
) -> np.ndarray:
    """Zero-mean noise over the box with robust std `target_std` (see the module docstring)."""
    shape = tuple(s.stop - s.start for s in box)
    if mode == "none" or target_std <= 0:
        return np.zeros(shape, np.float32)
    if mode == "gaussian":
        return rng.normal(0.0, target_std, shape).astype(np.float32)
    avoid_px = (box[1].stop - box[1].start) * 1.0
    src = _noise_source(volume, box, avoid, avoid_px, rng)
    if src is None:  # no homogeneous window (tiny test volumes): fall back to white noise
        return rng.normal(0.0, target_std, shape).astype(np.float32)
    res = highpass(volume[src], spacing)
    s = robust_std(res)
    if s <= 0:
        return rng.normal(0.0, target_std, shape).astype(np.float32)
    res = np.clip(res - np.median(res), -3 * s, 3 * s)  # vessel edges are anatomy, not noise
    scale = float(np.clip(target_std / s, 0.5, 2.0))
    return (res * scale).astype(np.float32)


def blend(
    original: np.ndarray,
    generated: np.ndarray,
    alpha: np.ndarray,
    attack: str,
    noise: np.ndarray | None = None,
) -> np.ndarray:
    """CT-GAN's blending of the generated (+ noise touch-up) values into the original (float HU).

    For injection the density factor is computed on the generated values before the noise, as in
    CT-GAN, so the noise cannot switch voxels on.
    """
    original = original.astype(np.float32)
    touched = generated if noise is None else generated + noise
    if attack == "inject":
        factor = alpha * special.expit((generated + 700.0) / 70.0)
        return np.maximum(touched * factor + original * (1.0 - factor), original)
    if attack == "remove":
        return touched * alpha + original * (1.0 - alpha)
    raise BTDConfigError("ctgan.attack", f"must be 'inject' or 'remove', got '{attack}'")


def paste_back(
    volume: np.ndarray,
    spacing: Sequence[float],
    centre: Centre,
    generated_cube: np.ndarray,
    attack: str,
    rng: np.random.Generator,
    *,
    cube_mm: float = 32.0,
    inner_mm: float = 10.0,
    outer_mm: float = 15.0,
    noise: str = "copy",
    avoid: list[tuple[float, float]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Paste a generated HU cube into an int16 CT volume: (tampered volume, changed-voxel mask).

    Only voxels within `outer_mm` of the centre can change; everything else is copied bit for bit.
    `avoid` lists (y, x) voxels (e.g. real tumours) the copied noise must not come from.
    """
    if noise not in NOISE_MODES:
        raise BTDConfigError("ctgan.noise", f"must be one of {NOISE_MODES}, got '{noise}'")
    if volume.ndim != 3:
        raise BTDInputError("volume", f"must be 3-D (Z, Y, X), got shape {volume.shape}")
    step = check_cube_geometry(cube_mm, generated_cube.shape[0], power_of_two=False)
    limit = (generated_cube.shape[0] - 1) / 2.0 * step
    if outer_mm > limit:
        raise BTDConfigError(
            "ctgan.blend_outer_mm", f"must be <= {limit} (inside the cube), got {outer_mm}"
        )
    box, gen, covered = cube_to_scan(generated_cube, volume.shape, spacing, centre, cube_mm)
    _, offsets = scan_box(volume.shape, spacing, centre, limit)
    alpha = spherical_alpha(offsets, inner_mm, outer_mm) * covered
    original = volume[box].astype(np.float32)
    target_std = local_noise_std(original, spacing, (alpha < 1.0) & covered)
    site = (float(centre[1]), float(centre[2]))
    touch = noise_field(volume, spacing, box, target_std, noise, rng, [site] + list(avoid or []))
    new = blend(original, gen, alpha, attack, touch)
    new = np.rint(np.clip(new, HU_MIN, HU_MAX)).astype(volume.dtype)
    region = volume[box]
    new = np.where(alpha > 0, new, region)
    out = volume.copy()
    out[box] = new
    mask = np.zeros(volume.shape, dtype=bool)
    mask[box] = new != region
    return out, mask
