"""Virtual breast anatomy for the MRI scanner: tissue-parameter maps (PD, T1, T2*) with body, breasts,
gland, vessels and masses (no scanner physics here)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, special

from btd.data.records import Tumour
from btd.data.simulate import portable as pm
from btd.errors import BTDConfigError, BTDInputError

# ---------------------------------------------------------------------------------------------
# Tissues
# ---------------------------------------------------------------------------------------------
AIR, FAT, FGT, SKIN, MUSCLE, LUNG, BLOOD, MYOCARDIUM, BONE, VESSEL, MASS, NECROSIS = range(12)
LABEL_NAMES = (
    "air",
    "fat",
    "fibroglandular",
    "skin",
    "muscle",
    "lung",
    "blood",
    "myocardium",
    "bone",
    "vessel",
    "mass",
    "necrosis",
)
# (PD relative, T1 ms at 1.5 T, T2* ms at 1.5 T) of post-contrast tissue; blood, vessels and
# masses hold gadolinium (short T1), necrotic cores and parenchyma barely enhance.
TISSUE_PARAMS: dict[int, tuple[float, float, float]] = {
    AIR: (0.0, 1000.0, 10.0),
    FAT: (0.90, 270.0, 40.0),
    FGT: (0.80, 1050.0, 32.0),
    SKIN: (0.75, 800.0, 25.0),
    MUSCLE: (0.75, 950.0, 28.0),
    LUNG: (0.15, 1200.0, 1.5),
    BLOOD: (0.90, 220.0, 45.0),
    MYOCARDIUM: (0.80, 480.0, 30.0),
    BONE: (0.08, 800.0, 1.0),
    VESSEL: (0.90, 220.0, 45.0),
    MASS: (0.85, 200.0, 35.0),
    NECROSIS: (0.90, 1500.0, 60.0),
}
_LUT = np.array([TISSUE_PARAMS[i] for i in range(len(LABEL_NAMES))], dtype=np.float32)
MAP_KEYS = ("pd", "t1", "t2s")
MASS_KINDS = ("oval", "lobulated", "irregular", "spiculated", "rim")
_MASS_KIND_P = (0.2, 0.2, 0.25, 0.2, 0.15)
# T1 ~ B0^(1/3) (Bottomley-like dispersion); T2* shortens as susceptibility gradients grow with B0
T1_FIELD_EXP = 1.0 / 3.0
T2S_FIELD_EXP = 0.5
_REF_FOV_MM = 358.0  # nominal body-FOV that the FOV-unit anatomy is drawn for


# ---------------------------------------------------------------------------------------------
# Anatomy
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Breast:
    x: float  # centre (FOV units, + = image right)
    w: float  # half-width
    d: float  # anterior depth
    z: float  # z centre (FOV units)
    c: float  # z half-extent
    shear: float  # lateral tip shift per unit depth (ptosis / rotation)
    gland: float  # gland envelope as a fraction of the breast
    p: float  # profile exponent (< 2: conical, > 2: rounded)


@dataclass(frozen=True)
class _Body:
    yt: float  # thorax centre row
    at: float  # thorax half-width
    bt: float  # thorax half-height
    grow: tuple[float, float, float]  # d(at, bt, yt)/dz
    wobble: tuple[tuple[float, float], ...]  # (amplitude, phase) of outline harmonics 2, 3, ...
    t_sub: float  # subcutaneous fat
    t_pec: float  # pectoral muscle
    t_cw: float  # chest wall (intercostals + ribs)
    t_retro: float  # retromammary fat between gland and pectoral fascia
    breasts: tuple[_Breast, ...]
    heart: tuple[float, ...]  # x, y, z, a, b, c, angle
    lungs: tuple[tuple[float, ...], ...]  # x, y, z, a, b, c
    rib_phase: float
    density: float  # fibroglandular fraction of the breast
    bpe: float  # background parenchymal enhancement (R1 gain)
    skin_mm: float


def _draw_breast(rng: np.random.Generator, side: float, like: _Breast | None) -> _Breast:
    """One breast; the second of a pair resembles the first (mild asymmetry)."""
    if like is not None:
        j = lambda v, s: float(v * rng.uniform(1 - s, 1 + s))  # noqa: E731
        return _Breast(
            side * abs(like.x) * rng.uniform(0.95, 1.05),
            j(like.w, 0.08),
            j(like.d, 0.12),
            like.z + rng.uniform(-0.01, 0.01),
            j(like.c, 0.08),
            -like.shear * rng.uniform(0.7, 1.3),
            like.gland,
            j(like.p, 0.05),
        )
    return _Breast(
        side * rng.uniform(0.19, 0.23),
        rng.uniform(0.14, 0.2),
        rng.uniform(0.13, 0.33),
        rng.uniform(-0.04, 0.04),
        rng.uniform(0.17, 0.25),
        side * rng.uniform(-0.05, 0.35),
        rng.uniform(0.72, 0.88),
        rng.uniform(1.5, 2.6),
    )


def _draw_body(rng: np.random.Generator) -> _Body:
    """Per-patient anatomy: body habitus, breast size/shape, breast density, heart and lungs."""
    bt = rng.uniform(0.26, 0.32)
    at = rng.uniform(0.40, 0.47)
    first = _draw_breast(rng, 1.0, None)
    pair = (first, _draw_breast(rng, -1.0, first)) if rng.random() > 0.1 else (first,)
    surface = rng.uniform(0.0, 0.09)  # anterior chest surface between the breasts
    yt = surface + bt
    heart = (
        rng.uniform(0.02, 0.07),
        surface + rng.uniform(0.19, 0.23),
        rng.uniform(-0.08, 0.04),
        rng.uniform(0.11, 0.14),
        rng.uniform(0.08, 0.11),
        rng.uniform(0.10, 0.14),
        rng.uniform(-0.6, -0.2),
    )
    lungs = tuple(
        (s * rng.uniform(0.16, 0.2), yt + rng.uniform(0.0, 0.05), 0.0, 0.17, 0.22, 0.6)
        for s in (-1.0, 1.0)
    )
    category = rng.choice(4, p=(0.1, 0.4, 0.4, 0.1))  # BI-RADS a-d
    density = rng.uniform(*((0.05, 0.15), (0.15, 0.3), (0.3, 0.5), (0.5, 0.7))[category])
    wobble = tuple((rng.uniform(0, 0.03) / h, rng.uniform(0, 2 * np.pi)) for h in (2, 3, 4, 5))
    return _Body(
        yt=yt,
        at=at,
        bt=bt,
        grow=tuple(rng.uniform(-1.0, 1.0, 3) * (1.0, 1.0, 0.3)),
        wobble=wobble,
        t_sub=rng.uniform(0.012, 0.04),
        t_pec=rng.uniform(0.022, 0.04),
        t_cw=rng.uniform(0.022, 0.03),
        t_retro=rng.uniform(0.004, 0.012),
        breasts=pair,
        heart=heart,
        lungs=lungs,
        rib_phase=rng.uniform(0, 2 * np.pi),
        density=float(density),
        bpe=float(rng.choice([0.0, 0.3, 0.7, 1.2], p=(0.35, 0.35, 0.2, 0.1))),
        skin_mm=rng.uniform(1.4, 2.4),
    )


def _ellipse(X, Y, cx, cy, a, b, rhs=1.0) -> np.ndarray:
    """Points inside an axis-aligned ellipse (rhs: squared radial modulation)."""
    if a <= 0 or b <= 0:
        return np.zeros(X.shape, bool)
    return ((X - cx) / a) ** 2 + ((Y - cy) / b) ** 2 < rhs


def _rot_ellipse(X, Y, cx, cy, a, b, phi) -> np.ndarray:
    """Points inside an ellipse rotated by phi (radians)."""
    if a <= 0 or b <= 0:
        return np.zeros(X.shape, bool)
    c, s = pm.cos(phi), pm.sin(phi)
    u = (X - cx) * c + (Y - cy) * s
    v = -(X - cx) * s + (Y - cy) * c
    return (u / a) ** 2 + (v / b) ** 2 < 1.0


def _wobble(u: np.ndarray, v: np.ndarray, harmonics) -> np.ndarray:
    """Squared radial modulation 1 + sum c_h cos(h theta + phase): a less perfect outline.

    Complex powers in explicit real arithmetic: NumPy's complex multiply fuses (FMA) on some CPUs
    and not on others, which would change the phantom's edge voxels from machine to machine.
    """
    u, v = np.asarray(u, np.float32), np.asarray(v, np.float32)
    r = np.sqrt(u * u + v * v) + np.float32(1e-12)
    er, ei = u / r, v / r
    acc = np.ones(u.shape, np.float32)
    pr, pi = _cmul(er, ei, er, ei)
    for c, ph in harmonics:
        acc += c * (pr * np.float32(np.cos(ph)) - pi * np.float32(np.sin(ph)))
        pr, pi = _cmul(pr, pi, er, ei)
    return acc**2


def _cmul(ar, ai, br, bi) -> tuple[np.ndarray, np.ndarray]:
    """(a * b) of complex numbers held as real pairs, without fused multiply-adds."""
    return ar * br - ai * bi, ar * bi + ai * br


def _box(c: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
    """Row and column slices of the grid (1-D coordinates c) covering [x0, x1] x [y0, y1]."""
    i0, i1 = np.searchsorted(c, [y0, y1])
    j0, j1 = np.searchsorted(c, [x0, x1])
    return slice(int(i0), int(i1) + 1), slice(int(j0), int(j1) + 1)


def _zscale(zn: float, z0: float, c: float) -> float:
    """Cross-section scale of an ellipsoid of z half-extent c at height zn."""
    return float(np.sqrt(max(0.0, 1.0 - ((zn - z0) / c) ** 2)))


def _thorax(body: _Body, zn: float) -> tuple[float, float, float]:
    """Thorax half-axes and centre row at height zn (slowly varying along z)."""
    ga, gb, gy = body.grow
    return body.at * (1 + ga * zn), body.bt * (1 + gb * zn), body.yt + gy * zn


def _chest_slice(body: _Body, zn: float, X, Y, fov_mm: float) -> tuple[np.ndarray, ...]:
    """Thorax labels (no skin), the mask inside the pectoral fascia and the retromammary band."""
    a, b, yt = _thorax(body, zn)
    rhs = _wobble(X / a, (Y - yt) / b, body.wobble)
    lab = np.zeros(X.shape, np.uint8)
    lab[_ellipse(X, Y, 0, yt, a, b, rhs)] = FAT
    t1, t2 = body.t_sub, body.t_sub + body.t_pec
    fascia = _ellipse(X, Y, 0, yt, a - t1 * 0.8, b - t1, rhs)
    lab[fascia] = MUSCLE
    plane = _ellipse(X, Y, 0, yt, a - t2 * 0.5, b - t2, rhs) & (Y < yt - 0.6 * b)
    lab[plane] = FAT  # thin fat plane under the pectoralis
    lab[_ellipse(X, Y, 0, yt, a - t2 * 0.5 - 0.004, b - t2 - 0.004, rhs)] = MUSCLE
    ca, cb = a - t2 * 0.5 - body.t_cw, b - t2 - body.t_cw
    _draw_ribs(lab, body, zn, X, Y, ca + body.t_cw / 2, cb + body.t_cw / 2, yt, fov_mm)
    cavity = _ellipse(X, Y, 0, yt, ca, cb, rhs)
    lab[cavity] = FAT  # mediastinal fat
    for lx, ly, lz, la, lb, lc in body.lungs:
        s = _zscale(zn, lz, lc)
        lab[cavity & _ellipse(X, Y, lx, ly, la * s, lb * s)] = LUNG
    hx, hy, hz, ha, hb, hc, ang = body.heart
    s = _zscale(zn, hz, hc)
    if s > 0:
        myo = 0.022
        lab[cavity & _rot_ellipse(X, Y, hx, hy, ha * s + myo, hb * s + myo, ang)] = MYOCARDIUM
        lab[cavity & _rot_ellipse(X, Y, hx, hy, ha * s, hb * s, ang)] = BLOOD
    aorta = _ellipse(X, Y, -0.045, hy + 0.16, 0.032, 0.032)
    lab[cavity & aorta] = BLOOD  # descending aorta
    spine = _ellipse(X, Y, 0.0, hy + 0.24, 0.05, 0.045)
    lab[cavity & spine] = BONE
    lab[cavity & _ellipse(X, Y, 0.0, hy + 0.24, 0.042, 0.037)] = MUSCLE  # vertebral marrow
    retro = _ellipse(X, Y, 0, yt, a - t1 * 0.8 + body.t_retro, b - t1 + body.t_retro, rhs)
    return lab, fascia, retro


def _draw_ribs(lab, body: _Body, zn: float, X, Y, ea, eb, yt, fov_mm: float) -> None:
    """Rib and sternum cross-sections on the chest-wall mid-line; oblique ribs come and go."""
    z_mm = zn * fov_mm
    for theta in np.linspace(-1.4, 1.4, 9):
        px, py = ea * pm.sin(theta), yt - eb * pm.cos(theta)
        phi = pm.arctan2(eb * pm.sin(theta), ea * pm.cos(theta))  # tangent direction
        if abs(theta) < 0.2:
            ra, rb = 0.03, 0.01  # sternum, always present
        else:
            vis = pm.sin(2 * np.pi * z_mm / 30.0 + 2.7 * abs(theta) + body.rib_phase)
            grow = float(np.clip((vis - 0.2) / 0.5, 0, 1))
            ra, rb = 0.035 * np.sqrt(grow), 0.011 * np.sqrt(grow)
        if ra <= 0.006:
            continue
        win = _box(X[0], px - ra, px + ra, py - ra, py + ra)
        sub, x, y = lab[win], X[win], Y[win]
        sub[_rot_ellipse(x, y, px, py, ra, rb, phi)] = BONE
        sub[_rot_ellipse(x, y, px, py, ra - 0.004, rb - 0.004, phi)] = FAT  # marrow


def _breast_geometry(br: _Breast, body: _Body, zn: float, X, Y, mask, renv) -> None:
    """Add one breast to `mask` and its normalised gland-envelope radius to `renv` (in place)."""
    s = _zscale(zn, br.z, br.c)
    if s < 0.05:
        return
    a, b, yt = _thorax(body, zn)
    base = yt - b * np.sqrt(max(0.0, 1 - (br.x / a) ** 2)) + 0.3 * body.t_sub
    w, d = br.w * s, br.d * s + body.t_sub
    reach = (abs(br.shear) + 1.0) * d + w
    win = _box(X[0], br.x - reach, br.x + reach, base - d, base + d)
    x, y = X[win], Y[win]
    Xs = x - br.x - br.shear * np.clip(base - y, 0, None)
    m = (Xs / w) ** 2 + pm.power(np.abs((y - base) / d), br.p) < 1.0
    g = br.gland
    gy = base - 0.12 * d
    r = np.sqrt((Xs / (w * g)) ** 2 + pm.power(np.abs((y - gy) / (d * g)), br.p)).astype(np.float32)
    r[~m] = np.inf
    mask[win] |= m
    np.minimum(renv[win], r, out=renv[win])


def _texture(rng: np.random.Generator, shape, pixel_mm: float, slice_mm: float, scale_mm):
    """Unit-variance smooth noise with correlation lengths scale_mm = (z, y, x) in mm."""
    sig = (scale_mm[0] / slice_mm, scale_mm[1] / pixel_mm, scale_mm[2] / pixel_mm)
    step = max(1, int(min(sig[1:]) // 2))  # draw on a sub-sampled grid, then upsample
    small = tuple(-(-n // f) for n, f in zip(shape, (1, step, step), strict=True))
    f = ndimage.gaussian_filter(
        rng.standard_normal(small).astype(np.float32),
        (sig[0], sig[1] / step, sig[2] / step),
        mode="reflect",
    )
    if step > 1:
        zoom = [n / m for n, m in zip(shape, small, strict=True)]
        f = ndimage.zoom(f, zoom, order=1, mode="nearest", grid_mode=True)
        f = f[: shape[0], : shape[1], : shape[2]]
    f -= f.mean()
    return f / (f.std() + 1e-12)


def _anatomy_labels(body, n_slices, size, pixel_mm, slice_mm):
    """Label volume, breast mask and gland-envelope radius, slice by slice (z-smooth shapes)."""
    fov = size * pixel_mm
    c = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    X, Y = np.meshgrid(c, c)
    zs = (np.arange(n_slices) - (n_slices - 1) / 2) * slice_mm / fov
    lab = np.zeros((n_slices, size, size), np.uint8)
    breast = np.zeros(lab.shape, bool)
    renv = np.full(lab.shape, np.inf, np.float32)
    blur = 2.0 / pixel_mm
    skin_level = float(special.ndtr(body.skin_mm / 2.0))
    for k, zn in enumerate(zs):
        chest, fascia, retro = _chest_slice(body, zn, X, Y, _REF_FOV_MM)
        bmask = np.zeros(X.shape, bool)
        for br in body.breasts:
            _breast_geometry(br, body, zn, X, Y, bmask, renv[k])
        renv[k][retro] = np.inf
        bmask &= ~fascia
        chest[bmask] = FAT
        # smooth union of thorax and breasts; depth under the surface from the blurred mask
        # (a straight edge blurred by sigma reads Phi(depth / sigma)) gives the skin cheaply
        g = ndimage.gaussian_filter((chest > 0).astype(np.float32), blur)
        soft = g > 0.5
        chest[soft & (chest == AIR)] = FAT  # fill the inframammary folds
        chest[~soft] = AIR
        skin = soft & (g < skin_level)
        chest[skin] = SKIN
        lab[k] = chest
        breast[k] = bmask & soft & ~skin
    renv[~breast] = np.inf
    return lab, breast, renv


def _add_gland(lab, breast, renv, body: _Body, tex_c, tex_f) -> np.ndarray:
    """Fibroglandular tissue: thresholded filtered noise, denser centrally and posteriorly."""
    inside = np.isfinite(renv) & breast
    field = 0.75 * tex_c + 0.35 * tex_f + 1.6 * (1.0 - np.minimum(renv, 1.5))
    if inside.any():
        thr = np.quantile(field[inside], 1.0 - body.density)
        lab[inside & (field > thr) & (renv < 1.0)] = FGT
    return lab


def _segment_dist(P: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance of points P (..., 3) to segment a-b and the position t in [0, 1] along it."""
    ab = b - a
    t = np.clip(((P - a) @ ab) / max(float(ab @ ab), 1e-9), 0.0, 1.0)
    return np.linalg.norm(P - a - t[..., None] * ab, axis=-1), t


def _bbox_coords(centre, half_mm, shape, spacing):
    """Index slices of a box around centre (voxels) and its voxel offsets in mm (Z, Y, X, 3)."""
    sl, axes = [], []
    for c, n, sp in zip(centre, shape, spacing, strict=True):
        h = int(np.ceil(half_mm / sp)) + 1
        lo = min(n, max(0, int(np.floor(c)) - h))
        hi = max(lo, min(n, int(np.ceil(c)) + h + 1))  # empty (not negative) when outside
        sl.append(slice(lo, hi))
        axes.append((np.arange(lo, hi, dtype=np.float32) - c) * sp)
    P = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    return tuple(sl), P


def _add_vessels(lab, breast, rng, pixel_mm: float, slice_mm: float) -> None:
    """Enhancing breast vessels: thin tortuous tubes (bright normal structures, tumour look-alikes)."""
    idx = np.argwhere(breast)
    if len(idx) == 0:
        return
    spacing = np.array([slice_mm, pixel_mm, pixel_mm], np.float32)
    for _ in range(int(rng.integers(6, 16))):
        p = idx[rng.integers(len(idx))].astype(np.float32)
        pts = [p * spacing]
        d = rng.normal(size=3) * (0.6, 1.0, 1.0)
        for _ in range(3):
            d = d / np.linalg.norm(d) + rng.normal(size=3) * 0.4
            pts.append(pts[-1] + d / np.linalg.norm(d) * rng.uniform(12, 30))
        radius = rng.uniform(0.5, 1.3)
        for a, b in zip(pts[:-1], pts[1:], strict=True):
            mid, half = (a + b) / 2, float(np.linalg.norm(b - a)) / 2 + radius
            sl, P = _bbox_coords(mid / spacing, half, lab.shape, spacing)
            if P.size == 0:
                continue
            dist, _ = _segment_dist(P, a - mid, b - mid)
            sub = lab[sl]
            sub[(dist < radius) & breast[sl] & ((sub == FAT) | (sub == FGT))] = VESSEL


def _mass_shape(kind: str, P: np.ndarray, R: float, spacing, rng) -> tuple[np.ndarray, np.ndarray]:
    """Mass mask and necrotic-core mask on offsets P (mm) for one morphology."""
    r = np.linalg.norm(P, axis=-1)
    rot = np.linalg.qr(rng.normal(size=(3, 3)))[0].astype(np.float32)
    Q = P @ rot
    if kind == "oval":
        ax = R * rng.uniform(0.65, 1.0, 3)
        ax[0] = R
        return np.sqrt(((Q / ax) ** 2).sum(-1)) < 1.0, np.zeros(r.shape, bool)
    if kind == "lobulated":
        m = np.sqrt(((Q / (R * np.array([1.0, 0.85, 0.75]) * 0.7)) ** 2).sum(-1)) < 1.0
        for _ in range(int(rng.integers(3, 7))):
            u = rng.normal(size=3)
            c = u / np.linalg.norm(u) * R * rng.uniform(0.35, 0.55)
            m |= np.linalg.norm(P - c, axis=-1) < R * rng.uniform(0.4, 0.6)
        return m, np.zeros(r.shape, bool)
    noise = _local_noise(r.shape, R, spacing, rng)
    if kind == "irregular":
        return r / R + 0.28 * noise < 1.0, np.zeros(r.shape, bool)
    if kind == "rim":
        core = r / R + 0.15 * noise
        return core < 1.0, core < rng.uniform(0.45, 0.65)
    m = r / (0.75 * R) + 0.15 * noise < 1.0  # spiculated: irregular core + tapering spicules
    r0 = max(1.0, 0.12 * R)
    for _ in range(int(rng.integers(6, 15))):
        u = rng.normal(size=3).astype(np.float32)
        tip = u / np.linalg.norm(u) * R * rng.uniform(1.2, 2.2)
        dist, t = _segment_dist(P, np.zeros(3, np.float32), tip)
        m |= dist < r0 * (1.0 - 0.75 * t)
    return m, np.zeros(r.shape, bool)


def _local_noise(shape, R: float, spacing, rng) -> np.ndarray:
    """Smooth unit noise over a mass box with correlation ~R/3 (margin irregularity)."""
    sig = [R / 3 / sp for sp in spacing]
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sig)
    return f / (f.std() + 1e-12)


def _place_masses(lab, breast, n_masses, diam, rng, pixel_mm, slice_mm) -> list[tuple]:
    """Mass centres inside the breast, preferring glandular tissue, away from each other."""
    if n_masses == 0:
        return []
    f = 2 if breast.shape[1] >= 128 else 1  # 3-D room measured on a half-resolution grid
    dist = ndimage.distance_transform_edt(
        breast[:, ::f, ::f], sampling=(slice_mm, pixel_mm * f, pixel_mm * f)
    )
    fgt, anyb = np.argwhere(breast & (lab == FGT)), np.argwhere(breast)
    if n_masses and len(anyb) == 0:
        raise BTDInputError("make_breast_phantom", "no breast tissue in the field of view")
    spacing = np.array([slice_mm, pixel_mm, pixel_mm])
    placed: list[tuple] = []
    for _ in range(n_masses):
        d = float(rng.uniform(*diam))
        best, best_score = None, -np.inf
        for _try in range(40):
            pool = fgt if (len(fgt) and rng.random() < 0.75) else anyb
            c = pool[rng.integers(len(pool))]
            room = dist[c[0], c[1] // f, c[2] // f]
            gap = min(
                (np.linalg.norm((c - np.array(q[:3])) * spacing) - (d + q[3]) / 2 for q in placed),
                default=np.inf,
            )
            score = min(room - 0.5 * d, 0.0) + min(gap, 0.0)
            if score > best_score:
                best, best_score = c, score
            if score >= 0:
                break
        jitter = rng.uniform(-0.4, 0.4, 3)
        placed.append((*(best + jitter), d))
    return placed


def _add_masses(lab, maps, breast, placed, rng, pixel_mm, slice_mm) -> list[Tumour]:
    """Paint enhancing masses into labels and maps; only fat and gland may be replaced."""
    spacing = (slice_mm, pixel_mm, pixel_mm)
    tumours = []
    for z, y, x, d in placed:
        kind = str(rng.choice(MASS_KINDS, p=_MASS_KIND_P))
        R = d / 2
        sl, P = _bbox_coords((z, y, x), 2.3 * R + 2 * pixel_mm, lab.shape, spacing)
        shape, core = _mass_shape(kind, P, R, spacing, rng)
        sub = lab[sl]
        ok = breast[sl] & ((sub == FAT) | (sub == FGT) | (sub == VESSEL))
        shape &= ok
        core &= shape
        t1 = rng.uniform(100.0, 200.0) * pm.exp(
            0.1 * np.clip(_local_noise(sub.shape, R, spacing, rng), -2, 2)
        )
        sub[shape] = MASS
        sub[core] = NECROSIS
        maps["t1"][sl][shape] = t1[shape]
        for i, key in enumerate(MAP_KEYS):
            if key != "t1":
                maps[key][sl][shape] = TISSUE_PARAMS[MASS][i]
            maps[key][sl][core] = TISSUE_PARAMS[NECROSIS][i]
        tumours.append(Tumour(float(z), float(y), float(x), float(d), kind))
    return tumours


def _check_phantom_args(n_slices, size, pixel_mm, slice_mm, n_masses, diam) -> None:
    """Readable config errors instead of deep numpy failures."""
    if int(n_slices) < 1:
        raise BTDConfigError("n_slices", f"must be >= 1, got {n_slices}")
    if int(size) < 32:
        raise BTDConfigError("size", f"must be >= 32 pixels, got {size}")
    if not (pixel_mm > 0 and slice_mm > 0):
        raise BTDConfigError("pixel_mm/slice_mm", "must be > 0")
    if int(n_masses) < 0:
        raise BTDConfigError("n_masses", f"must be >= 0, got {n_masses}")
    if len(diam) != 2 or not 0 < diam[0] <= diam[1]:
        raise BTDConfigError("mass_diameter_mm", f"need 0 < min <= max, got {diam}")


def make_breast_phantom(
    rng: np.random.Generator,
    n_slices: int,
    size: int,
    pixel_mm: float,
    slice_mm: float,
    n_masses: int,
    mass_diameter_mm: tuple[float, float] = (5.0, 40.0),
) -> tuple[dict[str, np.ndarray], list[Tumour]]:
    """Axial breast anatomy (Z, Y, X) as tissue maps, with enhancing masses already inside.

    Returns maps {"label": uint8, "breast": bool, "pd", "t1", "t2s": float32 at 1.5 T} and one
    Tumour (voxel coordinates, diameter, kind) per mass.
    """
    _check_phantom_args(n_slices, size, pixel_mm, slice_mm, n_masses, mass_diameter_mm)
    shape = (int(n_slices), int(size), int(size))
    body = _draw_body(rng)
    lab, breast, renv = _anatomy_labels(body, shape[0], shape[1], pixel_mm, slice_mm)
    # gland lobules are elongated antero-posteriorly (rows), along the ducts to the nipple
    tex_c = _texture(rng, shape, pixel_mm, slice_mm, (4.5, 6.0, 3.5))
    tex_f = _texture(rng, shape, pixel_mm, slice_mm, (1.2, 1.2, 1.2))
    _add_gland(lab, breast, renv, body, tex_c, tex_f)
    _add_vessels(lab, breast, rng, pixel_mm, slice_mm)
    maps = {k: _LUT[lab, i].copy() for i, k in enumerate(MAP_KEYS)}
    maps["pd"] *= 1.0 + 0.03 * tex_f  # tissue micro-heterogeneity
    g = lab == FGT
    maps["t1"][g] /= 1.0 + body.bpe * np.clip(0.5 + 0.5 * tex_c[g], 0, None)  # parenchymal uptake
    placed = _place_masses(lab, breast, int(n_masses), mass_diameter_mm, rng, pixel_mm, slice_mm)
    tumours = _add_masses(lab, maps, breast, placed, rng, pixel_mm, slice_mm)
    _partial_volume(maps)
    maps["label"], maps["breast"] = lab, breast
    return maps, tumours


def _partial_volume(maps: dict[str, np.ndarray]) -> None:
    """Blend relaxation *rates* and PD over ~half a pixel so edges are not staircases."""
    sig = (0.0, 0.5, 0.5)
    maps["pd"] = ndimage.gaussian_filter(maps["pd"], sig)
    for key in ("t1", "t2s"):
        maps[key] = (1.0 / ndimage.gaussian_filter(1.0 / maps[key], sig)).astype(np.float32)
