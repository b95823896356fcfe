"""CT cubes for CT-GAN: cut an isotropic cube at a site, paste an edited one back, training sites.

CT-GAN (Mirsky et al. 2019) works on 32 mm cubes resampled to 1 mm voxels, whatever the scan's own
spacing, so one model serves every scanner. A cube is defined in millimetres around a centre given
in (fractional) scan voxels: cube voxel i sits at (i - (n-1)/2) * step mm from the centre on each
axis. Cutting samples the scan there (linear interpolation); pasting samples the cube at the scan's
voxel centres. Outside the scan the nearest edge voxel is repeated (CT-GAN pads with -1000 HU; with
our short z coverage edge repetition keeps the anatomy continuous) -- a documented deviation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from btd.data.patches import healthy_sites
from btd.data.records import ScanVolume
from btd.errors import BTDConfigError, BTDInputError
from btd.scenarios import ATTACKS

Centre = tuple[float, float, float]
Box = tuple[slice, slice, slice]
ROLES = ATTACKS  # CT-GAN has one model per attack


def check_cube_geometry(cube_mm: float, cube_vox: int, power_of_two: bool = True) -> float:
    """Validate the cube size and return its voxel step in mm (the networks need 2^k >= 8)."""
    if not cube_mm > 0:
        raise BTDConfigError("ctgan.cube_mm", f"must be > 0, got {cube_mm}")
    if not isinstance(cube_vox, int | np.integer) or cube_vox < 2:
        raise BTDConfigError("ctgan.cube_vox", f"must be an integer >= 2, got {cube_vox}")
    if power_of_two and (cube_vox < 8 or cube_vox & (cube_vox - 1)):
        raise BTDConfigError("ctgan.cube_vox", f"must be a power of two >= 8, got {cube_vox}")
    return float(cube_mm) / int(cube_vox)


def _check_site(volume: np.ndarray, spacing: Sequence[float], centre: Centre, source: str) -> None:
    if volume.ndim != 3:
        raise BTDInputError(source, f"volume must be 3-D (Z, Y, X), got shape {volume.shape}")
    if len(spacing) != 3 or not all(float(s) > 0 for s in spacing):
        raise BTDInputError(source, f"spacing must be three positive numbers, got {spacing}")
    if len(centre) != 3 or not all(np.isfinite(c) for c in centre):
        raise BTDInputError(source, f"centre must be three finite numbers, got {centre}")
    if not all(0 <= c <= n - 1 for c, n in zip(centre, volume.shape, strict=True)):
        raise BTDInputError(
            source, f"centre {tuple(centre)} lies outside the volume {volume.shape}"
        )


def cube_coordinates(
    centre: Centre, spacing: Sequence[float], cube_mm: float = 32.0, cube_vox: int = 32
) -> np.ndarray:
    """Scan-voxel coordinates (3, n, n, n) of the cube's voxel centres."""
    step = check_cube_geometry(cube_mm, cube_vox, power_of_two=False)
    offs = (np.arange(cube_vox) - (cube_vox - 1) / 2.0) * step
    axes = [c + offs / float(s) for c, s in zip(centre, spacing, strict=True)]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def cut_cube(
    volume: np.ndarray,
    spacing: Sequence[float],
    centre: Centre,
    cube_mm: float = 32.0,
    cube_vox: int = 32,
    source: str = "volume",
) -> np.ndarray:
    """The isotropic cube (cube_vox^3, float32 HU) of side cube_mm centred on `centre` (voxels)."""
    _check_site(volume, spacing, centre, source)
    coords = cube_coordinates(centre, spacing, cube_mm, cube_vox)
    out = ndimage.map_coordinates(volume.astype(np.float32), coords, order=1, mode="nearest")
    return out.astype(np.float32)


def scan_box(
    shape: Sequence[int], spacing: Sequence[float], centre: Centre, half_mm: float
) -> tuple[Box, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Scan voxels within `half_mm` of the centre on each axis, and their mm offsets."""
    box, offs = [], []
    for c, s, n in zip(centre, spacing, shape, strict=True):
        lo = max(0, int(np.ceil(c - half_mm / s - 1e-9)))
        hi = min(int(n), int(np.floor(c + half_mm / s + 1e-9)) + 1)
        box.append(slice(lo, max(lo, hi)))
        offs.append((np.arange(lo, max(lo, hi)) - c) * s)
    dz, dy, dx = offs
    return (box[0], box[1], box[2]), (dz[:, None, None], dy[None, :, None], dx[None, None, :])


def cube_to_scan(
    cube: np.ndarray,
    shape: Sequence[int],
    spacing: Sequence[float],
    centre: Centre,
    cube_mm: float = 32.0,
) -> tuple[Box, np.ndarray, np.ndarray]:
    """Resample a cube onto the scan's voxel grid: (box, values float32, covered bool) over the box.

    `covered` marks scan voxels whose centre lies inside the cube's sampled extent (no
    extrapolation).
    """
    n = cube.shape[0]
    if cube.ndim != 3 or len(set(cube.shape)) != 1:
        raise BTDInputError("cube", f"must be a cube (n, n, n), got shape {cube.shape}")
    step = check_cube_geometry(cube_mm, n, power_of_two=False)
    half = (n - 1) / 2.0 * step
    box, (dz, dy, dx) = scan_box(shape, spacing, centre, half)
    grids = np.broadcast_arrays(dz, dy, dx)
    coords = np.stack([g / step + (n - 1) / 2.0 for g in grids])
    covered = np.all((coords >= -1e-6) & (coords <= n - 1 + 1e-6), axis=0)
    values = ndimage.map_coordinates(cube.astype(np.float32), coords, order=1, mode="nearest")
    return box, values.astype(np.float32), covered


def paste_cube(
    volume: np.ndarray,
    spacing: Sequence[float],
    centre: Centre,
    cube: np.ndarray,
    cube_mm: float = 32.0,
    base_cube: np.ndarray | None = None,
) -> np.ndarray:
    """The volume (float32 copy) with the cube resampled back and pasted at `centre`.

    Without `base_cube` the covered voxels are replaced (CT-GAN's pasteCube). With `base_cube` (the
    cube as cut, before editing) only the edit `cube - base_cube` is added, so an unedited cube
    leaves the volume exactly unchanged and the scan's own fine detail survives outside the edit.
    """
    _check_site(volume, spacing, centre, "volume")
    out = volume.astype(np.float32, copy=True)
    edit = cube if base_cube is None else cube.astype(np.float32) - base_cube.astype(np.float32)
    box, values, covered = cube_to_scan(edit, volume.shape, spacing, centre, cube_mm)
    region = out[box]
    if base_cube is None:
        region[covered] = values[covered]
    else:
        region[covered] += values[covered]
    return out


def local_mean_hu(
    volume: np.ndarray, spacing: Sequence[float], centre: Centre, radius_mm: float = 4.0
) -> float:
    """Mean HU within `radius_mm` of a site: tells lung (about -850) from soft tissue or wall.

    An injected nodule is only visible in aerated lung, so injection sites can be filtered on it.
    """
    _check_site(volume, spacing, centre, "volume")
    box, (dz, dy, dx) = scan_box(volume.shape, spacing, centre, radius_mm)
    inside = dz**2 + dy**2 + dx**2 <= radius_mm**2
    region = volume[box].astype(np.float64)
    values = region[np.broadcast_to(inside, region.shape)]
    if values.size == 0:  # radius below the voxel size: the nearest voxel
        return float(volume[tuple(int(round(c)) for c in centre)])
    return float(values.mean())


# ---------------------------------------------------------------------------------------------
# Training sites and cubes
# ---------------------------------------------------------------------------------------------


def select_patients(
    scans: list[ScanVolume], split_of: dict[str, str], splits: Sequence[str] = ("train", "val")
) -> list[ScanVolume]:
    """The scans whose patient is in `splits` (attackers never see holdout patients)."""
    missing = sorted({s.patient for s in scans} - set(split_of))
    if missing:
        raise BTDInputError("manifest", f"no split for patients {missing[:5]}")
    return [s for s in scans if split_of[s.patient] in splits]


def tumour_centres(
    scans: list[ScanVolume], min_diameter_mm: float = 0.0
) -> list[tuple[int, Centre]]:
    """(scan index, (z, y, x)) of the annotated tumours at least `min_diameter_mm` wide."""
    return [
        (i, (t.z, t.y, t.x))
        for i, s in enumerate(scans)
        for t in s.tumours
        if t.diameter_mm >= min_diameter_mm
    ]


def healthy_centres(
    scans: list[ScanVolume],
    per_scan: int,
    rng: np.random.Generator,
    margin_mm: float = 20.0,
    pool_scans: list[ScanVolume] | None = None,
) -> list[tuple[int, Centre]]:
    """Healthy sites: (y, x) of other patients' tumours, any slice, away from own tumours.

    As for the TB patches, the pool of tumour locations makes the healthy sites plausible tumour
    sites (inside the lungs); `margin_mm` keeps them clear of the patient's real tumours.
    """
    pool_scans = scans if pool_scans is None else pool_scans
    out: list[tuple[int, Centre]] = []
    for i, scan in enumerate(scans):
        pool = np.array(
            [(t.y, t.x) for s in pool_scans if s.patient != scan.patient for t in s.tumours],
            dtype=np.float64,
        ).reshape(-1, 2)
        if len(pool) == 0:
            raise BTDInputError(
                scan.patient, "no tumours of other patients to draw healthy sites from"
            )
        sites = healthy_sites(scan, pool, 1, rng, margin_mm)
        if not sites:
            continue
        pick = rng.choice(len(sites), size=min(per_scan, len(sites)), replace=False)
        out += [
            (i, (float(sites[k].z), float(sites[k].cy), float(sites[k].cx))) for k in sorted(pick)
        ]
    return out


def training_cubes(
    scans: list[ScanVolume],
    role: str,
    rng: np.random.Generator,
    *,
    cube_mm: float = 32.0,
    cube_vox: int = 32,
    margin_vox: int = 2,
    per_site: int = 4,
    jitter_mm: float = 1.5,
    healthy_per_scan: int = 8,
    margin_mm: float = 20.0,
    min_diameter_mm: float = 0.0,
) -> np.ndarray:
    """HU cubes (N, m, m, m), m = cube_vox + 2 margin_vox, for the injector or the remover.

    `scans` must be the train/val patients only. Injector: cubes centred on real tumours; remover:
    cubes at healthy sites. Each site is cut `per_site` times, all but the first with a random
    centre jitter of up to `jitter_mm` per axis (sub-voxel resampling = new samples); the margin
    lets training crop random small shifts on top. `min_diameter_mm` keeps the injector to tumours
    at least that wide (what it learns to inject; sub-centimetre nodules blurred by thick slices
    otherwise pull its output towards a faint blob).
    """
    if role not in ROLES:
        raise BTDConfigError("ctgan.role", f"must be one of {ROLES}, got '{role}'")
    if any(s.modality != "ct" for s in scans):
        raise BTDInputError("scans", "CT-GAN cubes need CT scans")
    if per_site < 1 or margin_vox < 0 or jitter_mm < 0:
        raise BTDConfigError(
            "ctgan", "per_site >= 1, margin_vox >= 0 and jitter_mm >= 0 are required"
        )
    step = check_cube_geometry(cube_mm, cube_vox)
    m = cube_vox + 2 * margin_vox
    if role == "inject":
        sites = tumour_centres(scans, min_diameter_mm)
    else:
        sites = healthy_centres(scans, healthy_per_scan, rng, margin_mm)
    if not sites:
        raise BTDInputError("scans", f"no {role} training sites (no tumours annotated?)")
    cubes = []
    for idx, centre in sites:
        scan = scans[idx]
        for k in range(per_site):
            jit = np.zeros(3) if k == 0 else rng.uniform(-jitter_mm, jitter_mm, 3)
            c = tuple(float(np.clip(ci + j / s, 0, n - 1)) for ci, j, s, n in
                      zip(centre, jit, scan.spacing, scan.volume.shape, strict=True))  # fmt: skip
            cubes.append(cut_cube(scan.volume, scan.spacing, c, m * step, m, scan.patient))
    return np.stack(cubes).astype(np.float32)
