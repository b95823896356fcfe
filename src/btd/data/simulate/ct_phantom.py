"""Virtual chest anatomy in HU for the CT scanner: body, lungs, mediastinum, ribs, spine, vessel and
airway trees and nodules (no scanner physics here)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft as sp_fft
from scipy import ndimage

from btd.data.records import Tumour
from btd.data.simulate import portable as pm
from btd.data.simulate.ct_scanner import HU_MAX, HU_MIN, _disk, _mm_grid  # noqa: F401
from btd.errors import BTDConfigError

# ---------------------------------------------------------------------------------------------
# Chest anatomy (HU). Lengths in mm; x right (patient's left), y down (posterior), z along the
# patient from the top of the slab. Every layer is a smooth function of z, so anatomy changes
# gradually from slice to slice; patient-to-patient variety comes from the drawn parameters.
# ---------------------------------------------------------------------------------------------

NODULE_KINDS = ("solid", "part-solid", "ground-glass", "spiculated", "lobulated")
_KIND_P = (0.35, 0.15, 0.12, 0.18, 0.20)
_HU = {
    "fat": -100.0,
    "skin": 30.0,
    "muscle": 45.0,
    "med_fat": -90.0,
    "lung": -850.0,
    "blood": 40.0,
    "cortical": 950.0,
    "marrow": 250.0,
    "cartilage": 120.0,
    "disc": 90.0,
    "csf": 15.0,
    "air": -1000.0,
    "wall": 30.0,
}


@dataclass(frozen=True)
class _Chest:
    """One patient's random shape parameters (mm unless stated)."""

    scale: float
    level0: float  # position of the slab top in the thorax (0 apex .. 1 base)
    length: float  # thorax length (mm), converts z to level
    x0: float
    y0: float
    cav_a: float  # thoracic cavity half-width at the reference level
    cav_b: float  # thoracic cavity half-depth (anterior-posterior)
    cav_harm: tuple[tuple[float, float], ...]  # (amplitude, phase) of angular harmonics k = 2..4
    rib_depth: float
    muscle: float
    muscle_post: float
    fat: float
    fat_harm: tuple[tuple[float, float], ...]
    rib_period: float
    rib_height: float
    rib_slope: float
    rib_phase: tuple[float, float]  # right, left
    vb_r: float  # vertebral body radius
    disc_period: float
    disc_phase: float
    med_x: float  # mediastinum centre line offset from x0
    med_w: float  # mediastinum half-width
    heart_level: float
    carina_level: float
    arch_level: float
    aorta_r: float
    trachea_r: float
    lung_grad: float  # posterior (dependent) density increase, HU


def _harmonics(rng: np.random.Generator, amp: float) -> tuple[tuple[float, float], ...]:
    return tuple((float(rng.uniform(0, amp)), float(rng.uniform(0, 2 * np.pi))) for _ in (2, 3, 4))


def _draw_chest(rng: np.random.Generator, fov_half: float) -> _Chest:
    """Random patient: body build, slab level in the thorax, organ sizes and positions."""
    body_a = rng.uniform(145.0, 175.0)
    scale = float(min(1.0, 0.92 * fov_half / body_a))
    s = scale
    fat = rng.uniform(6.0, 24.0) * s
    muscle = rng.uniform(8.0, 15.0) * s
    rib_depth = rng.uniform(8.0, 10.0) * s
    cav_a = body_a * s - fat - muscle - rib_depth
    cav_b = rng.uniform(0.62, 0.74) * cav_a
    return _Chest(
        scale=s,
        level0=float(rng.uniform(0.3, 0.62)),
        length=float(rng.uniform(240.0, 290.0) * s),
        x0=float(rng.uniform(-5.0, 5.0) * s),
        y0=float(rng.uniform(-12.0, -2.0) * s),
        cav_a=float(cav_a),
        cav_b=float(cav_b),
        cav_harm=_harmonics(rng, 0.025),
        rib_depth=float(rib_depth),
        muscle=float(muscle),
        muscle_post=float(rng.uniform(22.0, 38.0) * s),
        fat=float(fat),
        fat_harm=_harmonics(rng, 0.25),
        rib_period=float(rng.uniform(21.0, 27.0) * s),
        rib_height=float(rng.uniform(9.0, 12.0) * s),
        rib_slope=float(rng.uniform(0.28, 0.42)),
        rib_phase=(float(rng.uniform(0, 30)), float(rng.uniform(0, 30))),
        vb_r=float(rng.uniform(14.0, 19.0) * s),
        disc_period=float(rng.uniform(24.0, 30.0) * s),
        disc_phase=float(rng.uniform(0, 30)),
        med_x=float(rng.uniform(0.0, 10.0) * s),
        med_w=float(rng.uniform(20.0, 28.0) * s),
        heart_level=float(rng.uniform(0.45, 0.55)),
        carina_level=float(rng.uniform(0.36, 0.46)),
        arch_level=float(rng.uniform(0.3, 0.38)),
        aorta_r=float(rng.uniform(10.0, 14.0) * s),
        trachea_r=float(rng.uniform(8.0, 10.5) * s),
        lung_grad=float(rng.uniform(20.0, 70.0)),
    )


def _smoothstep(x: float | np.ndarray) -> float | np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _cov(level: np.ndarray, pix: float) -> np.ndarray:
    """Partial-volume coverage from a signed distance (mm, negative inside)."""
    out = 0.5 - level * (1.0 / pix)
    return np.clip(out, 0.0, 1.0, out=out)


def _ellipse_level(dx, dy, a: float, b: float, mod=None) -> np.ndarray:
    """Radial signed distance (mm) to an ellipse (optionally radius-modulated) centred at 0."""
    d = np.sqrt(dx * dx + dy * dy) + 1e-6
    r = (a * b) * d / (np.sqrt((b * dx) ** 2 + (a * dy) ** 2) + 1e-9)
    if mod is not None:
        r = r * mod
    return d - r


def _angular_mod(phi: np.ndarray, harm: tuple[tuple[float, float], ...]) -> np.ndarray:
    out = np.ones_like(phi)
    for k, (amp, phase) in zip((2, 3, 4), harm, strict=True):
        out += amp * pm.cos(k * phi + phase)
    return out


def _paint(hu: np.ndarray, cov: np.ndarray, value) -> None:
    """Alpha-blend a tissue into the slice: partial volume at every boundary."""
    hu += cov * (value - hu)


@dataclass
class _Canvas:
    """One axial slice being painted; small shapes are evaluated only inside their bounding box."""

    hu: np.ndarray
    x: np.ndarray  # (1, N) mm
    y: np.ndarray  # (N, 1) mm
    tex: np.ndarray
    pix: float

    def box(self, cx: float, cy: float, rx: float, ry: float):
        n = self.hu.shape[0]
        x0 = float(self.x[0, 0])
        c0 = max(int((cx - rx - x0) / self.pix) - 2, 0)
        c1 = min(int((cx + rx - x0) / self.pix) + 3, n)
        r0 = max(int((cy - ry - x0) / self.pix) - 2, 0)
        r1 = min(int((cy + ry - x0) / self.pix) + 3, n)
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def ellipse(self, cx, cy, a, b, angle=0.0, grow=0.0):
        """(box, coverage) of an ellipse with semi-axes a+grow, b+grow rotated by angle (rad)."""
        a, b = a + grow, b + grow
        box = self.box(cx, cy, max(a, b), max(a, b))
        if box is None:
            return None, None
        dx, dy = self.x[:, box[1]] - cx, self.y[box[0], :] - cy
        if angle:
            c, s = pm.cos(angle), pm.sin(angle)
            dx, dy = c * dx + s * dy, -s * dx + c * dy
        return box, _cov(_ellipse_level(dx, dy, a, b), self.pix)

    def paint(self, cx, cy, a, b, value, angle=0.0, tex_amp=0.0, weight=1.0) -> None:
        box, cov = self.ellipse(cx, cy, a, b, angle)
        if box is None:
            return
        if tex_amp:
            value = value + tex_amp * self.tex[box]
        _paint(self.hu[box], cov * weight if weight != 1.0 else cov, value)


def _slice_anatomy(
    chest: _Chest, x: np.ndarray, y: np.ndarray, z: float, pix: float, tex: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """HU of one thin axial slice at depth z (mm) and its lung coverage."""
    c = chest
    level = c.level0 + z / c.length
    grow = 0.82 + 0.3 * _smoothstep((level - 0.15) / 0.7)  # lungs widen towards the base
    cav_a, cav_b = c.cav_a * grow, c.cav_b * (0.9 + 0.1 * grow)
    dx, dy = x - c.x0, y - c.y0
    phi = pm.arctan2(dy, dx)
    sin_post = np.clip(dy / (np.sqrt(dx * dx + dy * dy) + 1e-6), 0.0, 1.0)  # 1 = posterior
    cav = _ellipse_level(dx, dy, cav_a, cav_b, _angular_mod(phi, c.cav_harm))
    rib_out = cav - c.rib_depth
    muscle_out = rib_out - (c.muscle + (c.muscle_post - c.muscle) * sin_post * sin_post * sin_post)
    body = np.maximum(
        muscle_out - c.fat * _angular_mod(phi, c.fat_harm),
        y - (c.y0 + cav_b + c.rib_depth + c.muscle_post + 4.0),
    )
    hu = np.full(cav.shape, _HU["air"], dtype=np.float32)
    canvas = _Canvas(hu, x, y, tex, pix)
    body_cov = _cov(body, pix)
    _paint(hu, body_cov, _HU["fat"] + 8.0 * tex)
    _paint(hu, body_cov - _cov(body + 1.5, pix), _HU["skin"])
    _paint(hu, _cov(muscle_out, pix), _HU["muscle"] + 6.0 * tex)
    _ribs(canvas, chest, dx, dy, cav, rib_out, z, cav_b)
    cav_cov = _cov(cav, pix)
    _paint(hu, cav_cov, _HU["med_fat"] + 6.0 * tex)
    lung_cov = _lungs(canvas, chest, level, cav_cov, cav_b)
    _mediastinum(canvas, chest, level, cav_b)
    _spine(canvas, chest, z, cav_b)
    return hu, lung_cov


def _ribs(cv: _Canvas, chest: _Chest, dx, dy, cav, rib_out, z: float, cav_b: float) -> None:
    """Oblique ribs: bands along the ring outside the cavity, moving around the ring with z."""
    c, pix = chest, cv.pix
    ring_full = _cov(-cav, pix) * _cov(rib_out + 1.0, pix)
    idx = np.nonzero(ring_full > 0)
    ring = ring_full[idx]
    ddx, ddy = np.broadcast_to(dx, cav.shape)[idx], np.broadcast_to(dy, cav.shape)[idx]
    ang = pm.arctan2(np.abs(ddx), ddy)  # 0 = posterior midline, pi = anterior midline
    s = np.mod(
        z
        + np.where(ddx < 0, c.rib_phase[0], c.rib_phase[1])
        + c.rib_slope * ang * (c.cav_a + c.cav_b) / 2.0,
        c.rib_period,
    )
    on = s < c.rib_height
    edge = np.minimum(s, c.rib_height - s) / c.rib_slope  # in-plane distance to the band edge
    band = np.clip(0.5 + edge / pix, 0.0, 1.0) * on
    bone = np.clip((ang - 0.3) / 0.1, 0.0, 1.0) * np.clip((2.5 - ang) / 0.1, 0.0, 1.0)
    cartilage = np.clip((ang - 2.5) / 0.1, 0.0, 1.0) * np.clip((2.85 - ang) / 0.1, 0.0, 1.0)
    inner = _cov(-cav[idx] + 1.5, pix) * _cov(rib_out[idx] + 2.5, pix)
    inner *= np.clip(0.5 + (edge - 1.5) / pix, 0.0, 1.0) * on
    vals = cv.hu[idx]
    _paint(vals, ring * band * bone, _HU["cortical"])
    _paint(vals, inner * bone, _HU["marrow"] + 40.0 * cv.tex[idx])
    _paint(vals, ring * band * cartilage, _HU["cartilage"])
    cv.hu[idx] = vals
    # Sternum: anterior midline, present at every level.
    sy = c.y0 - cav_b - c.rib_depth * 0.4
    cv.paint(c.x0, sy, 16.0 * c.scale, 6.0 * c.scale, _HU["cortical"] * 0.7)
    cv.paint(c.x0, sy, 14.5 * c.scale, 4.5 * c.scale, _HU["marrow"], tex_amp=40.0)


def _landmarks(chest: _Chest, cav_b: float) -> dict[str, tuple[float, float]]:
    """Positions (x, y mm) of the spine, descending aorta and mediastinal midline at this level."""
    c = chest
    vb_y = c.y0 + cav_b - 0.55 * c.vb_r
    return {
        "vb": (c.x0, vb_y),
        "aorta": (c.x0 + c.vb_r + 4.0 * c.scale, vb_y - c.vb_r * 0.6),
        "ascending": (c.x0 + c.med_x - 14.0 * c.scale, c.y0 - 0.35 * cav_b),
        "med": (c.x0 + c.med_x, c.y0),
    }


def _dome(level: float, lo: float, hi: float, ramp: float) -> float:
    """Cross-section scale of an organ that exists between two levels: grows like a dome's
    cross-section (sqrt of the depth) over `ramp` at both ends, so it appears smoothly along z."""
    depth = min(level - lo, hi - level) / ramp
    return float(np.sqrt(np.clip(depth, 0.0, 1.0)))


# (cx, cy, a, b, angle, HU): one mediastinal soft-tissue or airway structure at this level.
_Shape = tuple[float, float, float, float, float, float]


def _mediastinal_shapes(chest: _Chest, level: float, cav_b: float) -> list[_Shape]:
    """Heart, aorta (ascending, arch, descending), pulmonary trunk, oesophagus, airways; in paint
    order. The lungs are the cavity minus these, so nodules are never placed under them."""
    c = chest
    s = c.scale
    lm = _landmarks(chest, cav_b)
    (ax, ay), (dx, dy), (mx, _) = lm["ascending"], lm["aorta"], lm["med"]
    blood = _HU["blood"]
    shapes: list[_Shape] = [(dx, dy, c.aorta_r, c.aorta_r, 0.0, blood)]
    arch = _dome(level, c.arch_level - 0.025, c.arch_level + 0.025, 0.02)
    if arch > 0:  # the arch joins the ascending and descending aorta
        half = 0.5 * np.hypot(dx - ax, dy - ay) * arch + c.aorta_r
        ang = float(pm.arctan2(dy - ay, dx - ax))
        shapes.append(((ax + dx) / 2, (ay + dy) / 2, half, c.aorta_r, ang, blood))
    if level > c.arch_level:
        shapes.append((ax, ay, 1.2 * c.aorta_r, 1.2 * c.aorta_r, 0.0, blood))
    else:  # supra-aortic branches
        for off, r in ((-12.0, 6.0), (0.0, 5.0), (10.0, 5.5)):
            shapes.append((mx + off * s, ay + 8.0 * s, r * s, r * s, 0.0, blood))
    trunk = _dome(level, c.carina_level, c.heart_level + 0.05, 0.03)
    if trunk > 0:
        r = 13.0 * s * trunk
        shapes.append((mx + 16.0 * s, c.y0 - 0.3 * cav_b, r, r, 0.0, blood))
    heart = _dome(level, c.heart_level - 0.1, 10.0, 0.3)
    if heart > 0:
        cx = mx + 18.0 * s * heart
        shapes.append((cx, c.y0 - 0.2 * cav_b, 70.0 * s * heart, 50.0 * s * heart, 0.5, blood))
    vb_x, vb_y = lm["vb"]
    shapes.append((vb_x + 8.0 * s, vb_y - c.vb_r - 5.0 * s, 6.0 * s, 6.0 * s, 0.0, _HU["muscle"]))
    tr_y = vb_y - c.vb_r - c.trachea_r - 9.0 * s
    below = (level - c.carina_level) * c.length
    if below < 0:  # trachea
        airways = [(c.x0, tr_y, c.trachea_r)]
    elif below < 40.0 * s:  # main bronchi diverging towards the hila
        off = 6.0 * s + 0.9 * below
        airways = [
            (c.x0 - off, tr_y + 0.2 * below, 0.75 * c.trachea_r),
            (c.x0 + off, tr_y + 0.25 * below, 0.7 * c.trachea_r),
        ]
    else:
        airways = []
    for x, y, r in airways:
        shapes.append((x, y, r + 1.8 * s, r + 1.8 * s, 0.0, _HU["wall"]))
        shapes.append((x, y, r, r, 0.0, _HU["air"]))
    return shapes


def _lungs(cv: _Canvas, chest: _Chest, level: float, cav_cov, cav_b: float) -> np.ndarray:
    """Two lungs: the cavity minus mediastinum, its organs and the spine; textured parenchyma."""
    c = chest
    lm = _landmarks(chest, cav_b)
    blocked = np.zeros_like(cav_cov)
    shapes = [
        (*lm["med"], c.med_w * (1.0 + 0.2 * float(_smoothstep(level))), cav_b * 1.1, 0.0, 0.0),
        (*lm["vb"], c.vb_r, c.vb_r, 0.0, 9.0 * c.scale),
    ]
    shapes += [
        (x, y, a, b, ang, 3.0) for x, y, a, b, ang, _ in _mediastinal_shapes(c, level, cav_b)
    ]
    for cx, cy, a, b, angle, grow in shapes:
        box, cov = cv.ellipse(cx, cy, a, b, angle, grow)
        if box is not None:
            np.maximum(blocked[box], cov, out=blocked[box])
    lung_cov = cav_cov * (1.0 - blocked)
    grad = c.lung_grad * np.clip((cv.y - c.y0 + cav_b) / (2 * cav_b), 0.0, 1.0) ** 2
    _paint(cv.hu, lung_cov, _HU["lung"] + 28.0 * cv.tex + grad)
    return lung_cov


def _mediastinum(cv: _Canvas, chest: _Chest, level: float, cav_b: float) -> None:
    """Paint the mediastinal structures (soft tissue gets a faint texture, airways none)."""
    for cx, cy, a, b, angle, value in _mediastinal_shapes(chest, level, cav_b):
        cv.paint(cx, cy, a, b, value, angle=angle, tex_amp=5.0 if value > -500 else 0.0)


def _spine(cv: _Canvas, chest: _Chest, z: float, cav_b: float) -> None:
    """Vertebral body (cortex + cancellous bone, or a disc), canal and posterior elements."""
    c = chest
    s = c.scale
    vb_x, vb_y = _landmarks(chest, cav_b)["vb"]
    phase = np.mod(z + c.disc_phase, c.disc_period)
    disc = float(_smoothstep(1.0 - abs(phase - 3.0) / 3.0))  # ~5 mm disc every period
    r = c.vb_r
    cv.paint(vb_x, vb_y, r, r, _HU["cortical"] * (1.0 - disc) + _HU["disc"] * disc)
    if disc < 1.0:
        cv.paint(vb_x, vb_y, r - 1.5, r - 1.5, _HU["marrow"], tex_amp=40.0, weight=1.0 - disc)
    canal_y = vb_y + r + 8.0 * s
    cv.paint(vb_x, canal_y + 2.0 * s, 17.0 * s, 12.0 * s, _HU["cortical"] * 0.75)  # neural arch
    cv.paint(vb_x, canal_y, 7.5 * s, 7.5 * s, _HU["csf"])
    cv.paint(vb_x, canal_y + 22.0 * s, 4.0 * s, 12.0 * s, _HU["cortical"] * 0.8)  # spinous process
    for side in (-1.0, 1.0):  # transverse processes
        cv.paint(
            vb_x + side * 20.0 * s, canal_y, 13.0 * s, 4.5 * s, _HU["cortical"] * 0.75, side * 0.3
        )


# ---------------------------------------------------------------------------------------------
# 3-D structures: textures, vessel / airway trees and nodules, on the fine (Z, Y, X) grid
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """The phantom's voxel grid: slice k covers z in [k dz, (k+1) dz) mm; x, y centred."""

    n_z: int
    size: int
    pix: float
    dz: float

    def index(self, p: np.ndarray) -> tuple[float, float, float]:
        """(slice, row, column) of a point p = (x, y, z) in mm."""
        c = (self.size - 1) / 2.0
        return p[2] / self.dz - 0.5, p[1] / self.pix + c, p[0] / self.pix + c

    def axes(self, lo: np.ndarray, hi: np.ndarray):
        """Index slices and mm coordinates of the voxels inside the box [lo, hi] (x, y, z in mm)."""
        c = (self.size - 1) / 2.0
        k0 = max(int(np.floor(lo[2] / self.dz - 0.5)), 0)
        k1 = min(int(np.ceil(hi[2] / self.dz - 0.5)) + 1, self.n_z)
        r0 = max(int(np.floor(lo[1] / self.pix + c)), 0)
        r1 = min(int(np.ceil(hi[1] / self.pix + c)) + 1, self.size)
        c0 = max(int(np.floor(lo[0] / self.pix + c)), 0)
        c1 = min(int(np.ceil(hi[0] / self.pix + c)) + 1, self.size)
        if k0 >= k1 or r0 >= r1 or c0 >= c1:
            return None
        zz = ((np.arange(k0, k1) + 0.5) * self.dz).astype(np.float32)[:, None, None]
        yy = ((np.arange(r0, r1) - c) * self.pix).astype(np.float32)[None, :, None]
        xx = ((np.arange(c0, c1) - c) * self.pix).astype(np.float32)[None, None, :]
        return (slice(k0, k1), slice(r0, r1), slice(c0, c1)), xx, yy, zz


def _texture(rng: np.random.Generator, shape: tuple[int, int, int], pix: float, dz: float):
    """Unit-variance 3-D filtered noise: a fine (~1 mm) plus a coarse (~4 mm) Gaussian component.

    Filtered in the Fourier domain (one forward and one inverse FFT), periodic at the edges.
    """
    white = rng.standard_normal(shape, dtype=np.float32)
    fz = np.fft.fftfreq(shape[0], d=dz)[:, None, None]
    fy = np.fft.fftfreq(shape[1], d=pix)[None, :, None]
    fx = np.fft.rfftfreq(shape[2], d=pix)[None, None, :]
    f2 = (fz**2 + fy**2 + fx**2).astype(np.float32)
    gain = pm.exp(-2.0 * np.pi**2 * 1.0**2 * f2) + 3.0 * pm.exp(-2.0 * np.pi**2 * 4.0**2 * f2)
    tex = sp_fft.irfftn(sp_fft.rfftn(white) * gain, s=shape).astype(np.float32)
    tex /= tex.std() + 1e-6
    return tex


def _segment_cov(grid: _Grid, p0: np.ndarray, p1: np.ndarray, r0: float, r1: float):
    """Partial-volume coverage of a tapered tube from p0 to p1 within its bounding box."""
    pad = max(r0, r1) + grid.pix
    box = grid.axes(np.minimum(p0, p1) - pad, np.maximum(p0, p1) + pad)
    if box is None:
        return None
    sl, xx, yy, zz = box
    v = (p1 - p0).astype(np.float32)
    length2 = float(v @ v) + 1e-6
    wx, wy, wz = xx - p0[0], yy - p0[1], zz - p0[2]
    t = np.clip((wx * v[0] + wy * v[1] + wz * v[2]) / length2, 0.0, 1.0)
    d = np.sqrt((wx - t * v[0]) ** 2 + (wy - t * v[1]) ** 2 + (wz - t * v[2]) ** 2)
    return sl, np.clip(0.5 + (r0 + t * (r1 - r0) - d) / grid.pix, 0.0, 1.0)


def _rotate(d: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues rotation of d about the unit vector axis."""
    return (
        d * pm.cos(angle)
        + np.cross(axis, d) * pm.sin(angle)
        + axis * (axis @ d) * (1.0 - pm.cos(angle))
    )


def _unit(v: np.ndarray) -> np.ndarray:
    return v / (np.linalg.norm(v) + 1e-12)


def _grow_tree(
    rng: np.random.Generator,
    root: np.ndarray,
    direction: np.ndarray,
    r0: float,
    r_min: float,
    inside,
    z_range: tuple[float, float],
    max_segments: int,
) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    """A bifurcating tube tree (Murray's law radii) grown from a hilum until it leaves the lung."""
    segments = []
    stack = [(root, _unit(direction), r0, 0)]
    while stack and len(segments) < max_segments:
        p, d, r, depth = stack.pop()
        length = r * rng.uniform(5.0, 9.0) + 2.0
        p1 = p + d * length
        if depth > 0 and not inside(p1):
            p1 = p + d * (0.5 * length)
            if not inside(p1):
                continue
        r_end = 0.92 * r
        segments.append((p, p1, r, r_end))
        if r_end < r_min or not z_range[0] <= p1[2] <= z_range[1]:
            continue
        ra = r_end * rng.uniform(0.72, 0.86)
        rb = pm.power(r_end**3 - ra**3, 1.0 / 3.0)
        axis = _unit(np.cross(d, rng.standard_normal(3)))
        for rc, angle in ((ra, rng.uniform(0.17, 0.5)), (rb, -rng.uniform(0.45, 0.95))):
            nd = _unit(_rotate(d, axis, angle) + 0.15 * rng.standard_normal(3))
            stack.append((p1, nd, rc, depth + 1))
    return segments


def _lung_lookup(lung_cov: np.ndarray, grid: _Grid):
    """Membership test for tree growth: nearest voxel of the lung coverage, z clamped to the slab."""

    def inside(p: np.ndarray) -> bool:
        k, r, c = grid.index(p)
        k = int(np.clip(round(k), 0, grid.n_z - 1))
        r, c = int(round(r)), int(round(c))
        if not (0 <= r < grid.size and 0 <= c < grid.size):
            return False
        return bool(lung_cov[k, r, c] > 0.5)

    return inside


def _trees(
    rng: np.random.Generator, chest: _Chest, grid: _Grid, lung_cov: np.ndarray, hu: np.ndarray
) -> None:
    """Bronchial (air lumen + wall) and vascular (+40 HU) trees from both hila, lung-masked."""
    c = chest
    s = c.scale
    z_ext = grid.n_z * grid.dz
    z_range = (-25.0, z_ext + 25.0)
    inside = _lung_lookup(lung_cov, grid)
    mx = c.x0 + c.med_x
    for kind, n_roots, r_lo, r_hi, r_min in (
        ("airway", 3, 2.5, 4.5, max(1.0, 0.7 * grid.pix)),
        ("vessel", 6, 3.0, 6.0, max(0.5, 0.35 * grid.pix)),
    ):
        for side in (-1.0, 1.0):
            for _ in range(n_roots):
                zr = rng.uniform(-15.0, z_ext + 15.0)
                root = np.array([mx + side * c.med_w, c.y0 + rng.uniform(-0.25, 0.2) * c.cav_b, zr])
                ang = rng.uniform(-1.0, 1.0)
                d = np.array([side * pm.cos(ang), pm.sin(ang), rng.uniform(-0.8, 0.8)])
                segs = _grow_tree(
                    rng, root, d, rng.uniform(r_lo, r_hi) * s, r_min, inside, z_range, 600
                )
                for p0, p1, ra, rb in segs:
                    if kind == "airway":
                        _paint_segment(
                            hu,
                            grid,
                            lung_cov,
                            p0,
                            p1,
                            ra + 0.5 + 0.15 * ra,
                            rb + 0.5 + 0.15 * rb,
                            _HU["wall"],
                        )
                        _paint_segment(hu, grid, lung_cov, p0, p1, ra, rb, _HU["air"])
                    else:
                        _paint_segment(hu, grid, lung_cov, p0, p1, ra, rb, _HU["blood"])


def _paint_segment(hu, grid, mask, p0, p1, r0, r1, value) -> None:
    out = _segment_cov(grid, p0, p1, r0, r1)
    if out is not None:
        sl, cov = out
        hu[sl] += cov * mask[sl] * (value - hu[sl])


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))[None, :]


def _nodule_centre(
    rng: np.random.Generator,
    grid: _Grid,
    lung_cov: np.ndarray,
    radius: float,
    placed: list[tuple[np.ndarray, float]],
) -> np.ndarray | None:
    """A centre (x, y, z mm) inside a lung, >= radius + 3 mm from its edge and from other nodules."""
    z_ext = grid.n_z * grid.dz
    c = (grid.size - 1) / 2.0
    for _ in range(6):
        zc = rng.uniform(0.25, 0.75) * z_ext
        k = int(np.clip(round(zc / grid.dz - 0.5), 0, grid.n_z - 1))
        dist = ndimage.distance_transform_edt(lung_cov[k] > 0.5, sampling=grid.pix)
        rows, cols = np.nonzero(dist >= radius + 3.0)
        if rows.size == 0:
            continue
        pts = np.stack([(cols - c) * grid.pix, (rows - c) * grid.pix, np.full(rows.size, zc)], 1)
        ok = np.ones(rows.size, dtype=bool)
        for centre, r_other in placed:
            ok &= np.linalg.norm(pts - centre, axis=1) >= radius + r_other + 5.0
        if ok.any():
            return pts[rng.choice(np.flatnonzero(ok))]
    return None


def _nodule(
    rng: np.random.Generator,
    hu: np.ndarray,
    grid: _Grid,
    lung_cov: np.ndarray,
    tex: np.ndarray,
    centre: np.ndarray,
    radius: float,
    kind: str,
) -> None:
    """Paint one nodule: a rotated, slightly anisotropic ellipsoid with lobes (and spicules)."""
    rot = _random_rotation(rng)
    axes = rng.uniform(0.85, 1.15, 3)
    axes /= pm.power(np.prod(axes), 1.0 / 3.0)
    n_lobes, lobe_amp = {"lobulated": (6, (0.12, 0.3)), "spiculated": (4, (0.05, 0.15))}.get(
        kind, (3, (0.0, 0.08))
    )
    lobes = [(_unit(rng.standard_normal(3)), rng.uniform(*lobe_amp)) for _ in range(n_lobes)]
    width = rng.uniform(0.15, 0.3)
    ext = radius * 1.5 * axes.max() + 2.0 * grid.pix
    box = grid.axes(centre - ext, centre + ext)
    if box is None:
        return
    sl, xx, yy, zz = box
    rel = [
        np.broadcast_to(a, np.broadcast_shapes(xx.shape, yy.shape, zz.shape))
        for a in (xx - centre[0], yy - centre[1], zz - centre[2])
    ]
    q = [sum(rot[j, i] * rel[j] for j in range(3)) / axes[i] for i in range(3)]
    rho = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2) + 1e-6
    shape = np.ones_like(rho)
    for v, amp in lobes:
        cos_t = (rot[:, 0] @ v * q[0] + rot[:, 1] @ v * q[1] + rot[:, 2] @ v * q[2]) / rho
        shape += amp * pm.exp((cos_t - 1.0) / width)
    level = rho - radius * shape
    local_tex = tex[sl]
    solid_hu = rng.uniform(-10.0, 60.0) + 10.0 * local_tex
    region = hu[sl]
    if kind in ("ground-glass", "part-solid"):
        soft = 0.1 * radius + 0.5 * grid.pix
        cov = 1.0 / (1.0 + pm.exp(np.clip(level / soft, -30, 30)))
        region += cov * (rng.uniform(-700.0, -400.0) + 25.0 * local_tex - region)
        if kind == "part-solid":
            core = rho - radius * rng.uniform(0.3, 0.6) * shape
            region += _cov(core, grid.pix) * (solid_hu - region)
    else:
        region += _cov(level, grid.pix) * (solid_hu - region)
    hu[sl] = region
    if kind == "spiculated":  # thin tapering strands radiating into the lung
        for _ in range(int(rng.integers(16, 36))):
            u = _unit(rng.standard_normal(3) * (1.0, 1.0, 0.5))  # favour the axial plane a little
            p0 = centre + u * radius * 0.8
            p1 = centre + u * radius * rng.uniform(1.4, 2.2)
            r0 = rng.uniform(0.7, 1.4)
            _paint_segment(hu, grid, lung_cov, p0, p1, r0, 0.25, float(solid_hu.mean()))


def _check_phantom_args(
    n_slices: int, size: int, pixel_mm: float, slice_mm: float, n_nodules: int, diam: tuple
) -> None:
    if n_slices < 1 or size < 32:
        raise BTDConfigError(
            "ct.n_slices/size", f"need n_slices >= 1 and size >= 32, got {n_slices}, {size}"
        )
    if not (pixel_mm > 0 and slice_mm > 0):
        raise BTDConfigError("ct.pixel_mm/slice_mm", f"must be > 0, got {pixel_mm}, {slice_mm}")
    if n_nodules < 0:
        raise BTDConfigError("ct.n_nodules", f"must be >= 0, got {n_nodules}")
    if len(diam) != 2 or not 0 < diam[0] <= diam[1]:
        raise BTDConfigError("ct.nodule_diameter_mm", f"need 0 < min <= max, got {diam}")


def make_chest_phantom(
    rng: np.random.Generator,
    n_slices: int,
    size: int,
    pixel_mm: float,
    slice_mm: float,
    n_nodules: int,
    nodule_diameter_mm: tuple[float, float] = (3.0, 30.0),
) -> tuple[np.ndarray, list[Tumour]]:
    """Chest anatomy in HU, float32 (Z, Y, X), with nodules placed inside the lungs.

    Slice k covers z in [k, k+1) * slice_mm. Tumours are in voxel coordinates of the returned volume;
    every nodule centre lies in the middle half of the z range and >= radius + 3 mm inside a lung.
    The anatomy is scaled down when the field of view (size * pixel_mm) is smaller than a chest.
    """
    hu, _, tumours = _build_chest(
        rng, n_slices, size, pixel_mm, slice_mm, n_nodules, nodule_diameter_mm
    )
    return hu, tumours


def _build_chest(
    rng: np.random.Generator,
    n_slices: int,
    size: int,
    pixel_mm: float,
    slice_mm: float,
    n_nodules: int,
    nodule_diameter_mm: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray, list[Tumour]]:
    """make_chest_phantom plus the lung coverage (0..1, before vessels and nodules)."""
    _check_phantom_args(n_slices, size, pixel_mm, slice_mm, n_nodules, nodule_diameter_mm)
    grid = _Grid(n_slices, size, float(pixel_mm), float(slice_mm))
    chest = _draw_chest(rng, size * pixel_mm / 2.0)
    tex = _texture(rng, (n_slices, size, size), pixel_mm, slice_mm)
    x, y = _mm_grid(size, pixel_mm)
    hu = np.empty((n_slices, size, size), dtype=np.float32)
    lung = np.empty_like(hu)
    for k in range(n_slices):
        hu[k], lung[k] = _slice_anatomy(chest, x, y, (k + 0.5) * slice_mm, pixel_mm, tex[k])
    _trees(rng, chest, grid, lung, hu)
    tumours = _nodules(rng, hu, grid, lung, tex, n_nodules, nodule_diameter_mm)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    return hu, lung, tumours


def _nodules(rng, hu, grid: _Grid, lung, tex, n_nodules: int, diam: tuple[float, float]):
    """Draw kinds and log-uniform diameters, place each inside a lung, paint, return annotations."""
    tumours: list[Tumour] = []
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(n_nodules):
        kind = str(rng.choice(NODULE_KINDS, p=_KIND_P))
        d = float(pm.exp(rng.uniform(pm.log(diam[0]), pm.log(diam[1]))))
        centre = None
        while centre is None:
            centre = _nodule_centre(rng, grid, lung, d / 2.0, placed)
            if centre is None:
                if d <= diam[0]:
                    break
                d = max(diam[0], 0.8 * d)
        if centre is None:
            continue
        _nodule(rng, hu, grid, lung, tex, centre, d / 2.0, kind)
        placed.append((centre, d / 2.0))
        k, r, c = grid.index(centre)
        tumours.append(
            Tumour(z=float(k), y=float(r), x=float(c), diameter_mm=round(d, 2), kind=kind)
        )
    if n_nodules > 0 and not tumours:
        raise BTDConfigError(
            "ct.nodule_diameter_mm",
            f"no nodule of {diam} mm fits in the lungs of this field of view",
        )
    return tumours
