"""The virtual MRI scanner: spoiled-GRE signal, B1 bias, coils, k-space sampling, noise, RSS and the
8-bit export (no anatomy here)."""

from __future__ import annotations

import functools
import zlib

import numpy as np
from scipy import fft as sfft

from btd.data.simulate import portable as pm
from btd.data.simulate.mri_phantom import (
    FAT,
    MAP_KEYS,
    T1_FIELD_EXP,
    T2S_FIELD_EXP,
    TISSUE_PARAMS,
    _cmul,
)
from btd.data.simulate.protocols import MRIScanner
from btd.errors import BTDInputError


# ---------------------------------------------------------------------------------------------
# Scanner
# ---------------------------------------------------------------------------------------------
def gre_signal(
    pd: np.ndarray,
    t1: np.ndarray,
    t2s: np.ndarray,
    scanner: MRIScanner,
    field_T: float | None = None,
) -> np.ndarray:
    """Spoiled-GRE steady-state magnitude at the field; T1/T2* maps are given at 1.5 T.

    Signal grows ~ B0 (polarisation); T1 lengthens ~ B0^(1/3) and T2* shortens with B0.
    """
    b0 = scanner.field_T if field_T is None else field_T
    r = b0 / 1.5
    t1f = np.maximum(t1, 1e-3) * r**T1_FIELD_EXP
    t2f = np.maximum(t2s, 1e-3) * r ** (-T2S_FIELD_EXP)
    a = np.deg2rad(scanner.flip_deg)
    e1 = pm.exp(-scanner.tr_ms / t1f)
    s = pd * pm.sin(a) * (1 - e1) / (1 - pm.cos(a) * e1) * pm.exp(-scanner.te_ms / t2f)
    return (s * r).astype(np.float32)


def fat_reference(scanner: MRIScanner) -> float:
    """Mean fat signal of this protocol at 1.5 T: the unit of `noise_sigma`."""
    pd, t1, t2s = (np.float32(v) for v in TISSUE_PARAMS[FAT])
    return float(gre_signal(pd, t1, t2s, scanner, field_T=1.5))


def acquired_matrix(scanner: MRIScanner, size: int) -> int:
    """Acquired matrix on a size-grid (a matrix beyond the grid is clipped to the grid)."""
    return int(min(scanner.matrix, size))


def _window(kind: str, k: np.ndarray, m: int) -> np.ndarray:
    """Apodisation over centred k-space indices k of an m-line acquisition."""
    x = np.abs(k) / (m / 2.0)  # 0 at DC, 1 at the edge
    if kind == "hamming":
        return 0.54 + 0.46 * pm.cos(np.pi * x)
    if kind == "tukey":
        alpha = 0.5
        edge = np.clip((x - (1 - alpha)) / alpha, 0, 1)
        return 0.5 * (1 + pm.cos(np.pi * edge))
    return np.ones_like(x)


@functools.lru_cache(maxsize=32)
def kspace_sampling(scanner: MRIScanner, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Acquired phase rows, readout columns (FFT layout) and their weight (filter), read-only.

    Phase encoding runs along rows (y); partial Fourier drops the most negative phase lines.
    """
    m = acquired_matrix(scanner, size)
    k = np.arange(m) - m // 2
    n_rows = max(m // 2 + 1, int(round(scanner.partial_fourier * m)))
    krow = k[m - n_rows :]
    w = _window(scanner.filter, krow, m)[:, None] * _window(scanner.filter, k, m)[None, :]
    out = (krow % size, k % size, w.astype(np.float32))
    for a in out:
        a.flags.writeable = False
    return out


def kspace_noise_std(scanner: MRIScanner, size: int) -> float:
    """Per-channel std of the complex noise added to each acquired k-space sample.

    Chosen so that a fully sampled, unfiltered acquisition has image-domain per-channel std
    noise_sigma x (fat signal at 1.5 T), whatever the reconstruction grid.
    """
    return scanner.noise_sigma * fat_reference(scanner) * size / acquired_matrix(scanner, size)


def image_noise_std(scanner: MRIScanner, size: int) -> float:
    """Per-channel image-domain noise std after sampling and filter: the Rayleigh/chi scale."""
    _, _, w = kspace_sampling(scanner, size)
    return (
        kspace_noise_std(scanner, size) * float(np.sqrt((w.astype(np.float64) ** 2).sum())) / size
    )


@functools.lru_cache(maxsize=16)
def coil_maps(n_coils: int, size: int) -> np.ndarray:
    """Analytic receive sensitivities (n_coils, size, size), complex64, read-only.

    One coil: a uniform body-coil-like map. Several: loops on an ellipse around the breasts with a
    Biot-Savart on-axis fall-off (r0^2 / (r0^2 + d^2))^(3/2) and a smooth phase. Maps are scaled so
    the root-sum-of-squares sensitivity averages 1 over the central field, keeping noise_sigma
    the SNR reference for every coil count.
    """
    c = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    X, Y = np.meshgrid(c, c)
    if n_coils == 1:
        maps = pm.exp(1j * (0.4 + 0.8 * X - 0.5 * Y))[None]
    else:
        r0 = 0.10 + 0.25 / np.sqrt(n_coils)
        ang = 2 * np.pi * (np.arange(n_coils) + 0.5) / n_coils
        cx, cy = 0.47 * pm.sin(ang), -0.12 - 0.36 * pm.cos(ang)
        maps = []
        for i in range(n_coils):
            d2 = (X - cx[i]) ** 2 + (Y - cy[i]) ** 2
            mag = pm.power(r0**2 / (r0**2 + d2), 1.5)
            maps.append(mag * pm.exp(1j * (ang[i] + 2.5 * np.sqrt(d2))))
        maps = np.stack(maps)
    rss = np.sqrt((maps.real**2 + maps.imag**2).sum(0))
    centre = (np.abs(X) < 0.3) & (np.abs(Y + 0.05) < 0.3)
    out = (maps / rss[centre].mean()).astype(np.complex64)
    out.flags.writeable = False
    return out


def bias_field(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    strength: float,
    pixel_mm: float,
    slice_mm: float = 2.0,
) -> np.ndarray:
    """Smooth multiplicative B1 field over a (Y, X) or (Z, Y, X) grid, peak-to-peak = strength.

    A few random cosines with wavelengths of 0.7-3 FOVs: patient-dependent RF loading.
    """
    shape3 = (1, *shape) if len(shape) == 2 else tuple(shape)
    nz, ny, nx = shape3
    fov = nx * pixel_mm
    z = (np.arange(nz, dtype=np.float32) - (nz - 1) / 2) * slice_mm / fov
    y = (np.arange(ny, dtype=np.float32) + 0.5) / ny - 0.5
    x = (np.arange(nx, dtype=np.float32) + 0.5) / nx - 0.5
    field = np.zeros(shape3, np.float32)
    for _ in range(5):  # cos(a.r + phase) = Re(e^{i a_z z} e^{i a_y y} e^{i (a_x x + phase)})
        f = rng.normal(size=3) * (0.5, 1.0, 1.0)
        f *= 2 * np.pi * rng.uniform(1 / 3.0, 1 / 0.7) / np.linalg.norm(f)
        phase = rng.uniform(0, 2 * np.pi)
        ez = pm.exp(1j * f[0] * z).astype(np.complex64)
        ey = pm.exp(1j * f[1] * y)
        ex = pm.exp(1j * (f[2] * x + phase))
        pr, pi = _cmul(ey.real[:, None], ey.imag[:, None], ex.real[None, :], ex.imag[None, :])
        pr, pi = pr.astype(np.float32), pi.astype(np.float32)
        zr, zi = ez.real[:, None, None], ez.imag[:, None, None]
        field += np.float32(rng.uniform(0.5, 1.0)) * (zr * pr - zi * pi)  # Re(ez * plane)
    lo, hi = float(field.min()), float(field.max())
    field = 1.0 + strength * ((field - lo) / max(hi - lo, 1e-9) - 0.5)
    return field.reshape(shape).astype(np.float32)


def acquire(
    image: np.ndarray, scanner: MRIScanner, rng: np.random.Generator, noise: bool = True
) -> np.ndarray:
    """Coil-weight, FFT, sample k-space, add per-coil noise, filter, IFFT, RSS -> float32 magnitude.

    `image` is the (bias-weighted) transverse magnetisation on a square grid; this is the float
    magnitude before any intensity scaling or quantisation.
    """
    n = image.shape[-1]
    rows, cols, w = kspace_sampling(scanner, n)
    coils = coil_maps(scanner.n_coils, n)
    k = sfft.fft2(coils * image.astype(np.float32), norm="ortho")
    e = None
    if noise and scanner.noise_sigma > 0:  # complex64 view of (re, im) float pairs: no copy
        e = rng.standard_normal((*k.shape[:1], len(rows), len(cols), 2), dtype=np.float32)
        e = e.view(np.complex64)[..., 0]
        e *= np.float32(kspace_noise_std(scanner, n))
    full = np.zeros_like(k)
    for rk, rc in _blocks(rows):  # acquired k-space: at most 4 contiguous blocks (FFT layout)
        for ck, cc in _blocks(cols):
            blk = k[:, rk, ck]
            if e is not None:
                blk += e[:, rc, cc]
            blk *= w[rc, cc]
            full[:, rk, ck] = blk
    img = sfft.ifft2(full, norm="ortho", overwrite_x=True)
    return np.sqrt((img.real**2 + img.imag**2).sum(0)).astype(np.float32)


def _blocks(idx: np.ndarray) -> list[tuple[slice, slice]]:
    """Split FFT-layout indices (centred order) into contiguous runs: (grid slice, run slice)."""
    cuts = [0, *(np.flatnonzero(np.diff(idx) != 1) + 1).tolist(), len(idx)]
    return [
        (slice(int(idx[a]), int(idx[b - 1]) + 1), slice(a, b))
        for a, b in zip(cuts[:-1], cuts[1:], strict=True)
    ]


def _check_slice(maps_slice: dict[str, np.ndarray]) -> None:
    """Reject missing keys, non-square or non-finite maps with one readable error."""
    missing = [k for k in MAP_KEYS if k not in maps_slice]
    if missing:
        raise BTDInputError("maps_slice", f"missing tissue maps {missing}")
    shapes = {np.shape(maps_slice[k]) for k in MAP_KEYS}
    shp = next(iter(shapes))
    if len(shapes) != 1 or len(shp) != 2 or shp[0] != shp[1]:
        raise BTDInputError("maps_slice", f"maps must be equal square 2-D arrays, got {shapes}")
    if not all(np.isfinite(maps_slice[k]).all() for k in MAP_KEYS):
        raise BTDInputError("maps_slice", "tissue maps contain NaN or inf")


def scan_mri_slice(
    maps_slice: dict[str, np.ndarray],
    scanner: MRIScanner,
    rng: np.random.Generator,
    pixel_mm: float,
    bias: np.ndarray | None = None,
    noise: bool = True,
) -> np.ndarray:
    """Acquire one axial slice: float32 magnitude (before intensity scaling and quantisation).

    `bias` is the B1 field of this slice (drawn from rng when None); `noise=False` gives the
    noise-free reconstruction of the same acquisition (for noise and NPS measurements).
    """
    _check_slice(maps_slice)
    sig = gre_signal(maps_slice["pd"], maps_slice["t1"], maps_slice["t2s"], scanner)
    if bias is None:
        bias = bias_field(rng, sig.shape, scanner.bias_strength, pixel_mm)
    elif bias.shape != sig.shape:
        raise BTDInputError("bias", f"shape {bias.shape} != slice shape {sig.shape}")
    return acquire(sig * bias, scanner, rng, noise=noise)


def export_window(scanner: MRIScanner) -> tuple[float, float]:
    """The scanner's 8-bit export: (percentile of the volume, grey level it maps to).

    Fixed per scanner name (a vendor/site setting), so the 8-bit scaling is scanner-specific.
    """
    h = zlib.crc32(scanner.name.encode())
    return 99.0 + (h % 9) * 0.1, 200.0 + ((h // 9) % 6) * 10.0


def quantise(volume: np.ndarray, scanner: MRIScanner) -> np.ndarray:
    """Scale a float magnitude volume by its high percentile, clip and round to uint8."""
    q, level = export_window(scanner)
    ref = float(np.percentile(volume, q))
    if ref <= 0:
        return np.zeros(volume.shape, np.uint8)
    return np.clip(np.rint(volume * (level / ref)), 0, 255).astype(np.uint8)
