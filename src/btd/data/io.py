"""Medical volume I/O: DICOM series/files, NIfTI, NRRD, .npy and 8-bit images, all as (Z, Y, X).

Every reader returns `(volume, spacing, meta)` where `spacing = (dz, dy, dx)` in millimetres and
`meta` holds only non-identifying acquisition facts (modality, scanner model, kVp, kernel, matrix).
Names, IDs, dates and UIDs never leave this module; loaders name patients with `pseudonym_map`.
Any bad input raises one `BTDInputError(path, problem)` instead of a deep library traceback.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from btd.errors import BTDInputError

Spacing = tuple[float, float, float]

DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".ima", ""})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
_SKIP_NAMES = frozenset({"dicomdir", "license", "readme", "manifest"})
_UNIT_SPACING: Spacing = (1.0, 1.0, 1.0)
_INT16 = np.iinfo(np.int16)
#: Largest volume read (voxels): 512 x 512 x 2048. Checked from the header before the data, so a
#: small compressed file declaring 1024^3 voxels is refused instead of exhausting memory.
MAX_VOXELS = 512 * 512 * 2048
#: Plausible CT values after rescale (HU): air is -1000, dense metal on an extended-HU scanner
#: reaches about 30,000. Values far outside mean a wrong rescale, unit or data type.
CT_PLAUSIBLE_HU = (-4000.0, 40000.0)

log = logging.getLogger(__name__)


@dataclass
class DicomSeries:
    """One DICOM series read from a folder, slices sorted along the slice normal.

    `positions` are the slice positions (mm) along the normal in volume order, `instance_numbers`
    the InstanceNumber of each volume slice (annotations such as Duke's count slices that way).
    `series_uid` and `description` exist only to match annotation files and pick a series;
    callers must never write them out.
    """

    volume: np.ndarray
    spacing: Spacing
    meta: dict[str, Any]
    positions: list[float] = field(default_factory=list)
    instance_numbers: list[int] = field(default_factory=list)
    series_uid: str = ""
    description: str = ""


# ----------------------------------------------------------------------------- pseudonyms


def deidentify_name(name: str, prefix: str, salt: str = "btd") -> str:
    """Stable salted-hash pseudonym ('lidc-3f2a9c0d1e'), independent of the other patients."""
    digest = hashlib.sha256(f"{salt}\x00{name}".encode()).hexdigest()
    return f"{prefix}-{digest[:10]}"


def pseudonym_map(names: Iterable[str], prefix: str) -> dict[str, str]:
    """Readable pseudonyms by sorted order ('lidc-0000', 'lidc-0001', ...) for a fixed set."""
    return {name: f"{prefix}-{i:04d}" for i, name in enumerate(sorted(set(names)))}


# ----------------------------------------------------------------------------- DICOM


def _dcmread(path: Path, header_only: bool = False) -> Any:
    """pydicom.dcmread with every failure turned into one readable BTDInputError."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=header_only)
    except InvalidDicomError:
        raise BTDInputError(path, "not a DICOM file (no DICM preamble)") from None
    except Exception as exc:  # pydicom raises many types on corrupt files
        raise BTDInputError(path, f"corrupt DICOM file ({exc.__class__.__name__}: {exc})") from None


def _pixels(ds: Any, path: Path) -> np.ndarray:
    """Stored pixel values as (frames, rows, cols); readable error for compressed/corrupt data."""
    if "PixelData" not in ds:
        raise BTDInputError(path, "DICOM file has no pixel data")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise BTDInputError(
            path, "colour DICOM images are not supported (need one sample per pixel)"
        )
    try:
        arr = np.asarray(ds.pixel_array)
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise BTDInputError(
            path,
            f"cannot decode pixel data (transfer syntax {syntax}; {exc.__class__.__name__}: {exc})",
        ) from None
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise BTDInputError(path, f"unexpected pixel array shape {arr.shape}")
    return arr


def _rescale(ds: Any, raw: np.ndarray) -> tuple[np.ndarray, bool]:
    """Apply RescaleSlope/Intercept; returns (values as float64, whether they are integers)."""
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    values = raw.astype(np.float64) * slope + intercept
    integral = (
        slope.is_integer() and intercept.is_integer() and np.issubdtype(raw.dtype, np.integer)
    )
    return values, integral


def _final_dtype(values: np.ndarray, modality: str, integral: bool) -> np.ndarray:
    """CT with integer rescale -> int16 HU (the scanners' own format); everything else float32."""
    if modality == "CT" and integral and values.min() >= _INT16.min and values.max() <= _INT16.max:
        return values.astype(np.int16)
    return values.astype(np.float32)


def clean_spacing(spacing: Iterable[float]) -> Spacing:
    """Spacing rounded to 1e-5 mm: hides float32 header and position-difference noise."""
    dz, dy, dx = (round(float(s), 5) for s in spacing)
    return dz, dy, dx


def _float_or_none(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _safe_meta(ds: Any, n_slices: int) -> dict[str, Any]:
    """Non-identifying acquisition facts only: never names, IDs, dates, UIDs or free-text notes."""
    kernel = ds.get("ConvolutionKernel", None)
    if kernel is not None and not isinstance(kernel, str):
        kernel = "\\".join(str(k) for k in kernel)
    return {
        "format": "dicom",
        "modality": str(ds.get("Modality", "") or "") or None,
        "scanner": str(ds.get("ManufacturerModelName", "") or "").strip() or "unknown",
        "manufacturer": str(ds.get("Manufacturer", "") or "").strip() or None,
        "kvp": _float_or_none(ds.get("KVP", None)),
        "kernel": kernel,
        "field_strength_t": _float_or_none(ds.get("MagneticFieldStrength", None)),
        "slice_thickness_mm": _float_or_none(ds.get("SliceThickness", None)),
        "rows": int(ds.get("Rows", 0) or 0),
        "cols": int(ds.get("Columns", 0) or 0),
        "n_slices": n_slices,
    }


def _pixel_spacing(ds: Any) -> tuple[float, float]:
    """(dy, dx) from PixelSpacing (row spacing first), or from the enhanced-DICOM shared groups."""
    ps = ds.get("PixelSpacing", None)
    if ps is None and "SharedFunctionalGroupsSequence" in ds:
        groups = ds.SharedFunctionalGroupsSequence[0]
        if "PixelMeasuresSequence" in groups:
            ps = groups.PixelMeasuresSequence[0].get("PixelSpacing", None)
    if ps is None or len(ps) < 2:
        return 1.0, 1.0
    return float(ps[0]), float(ps[1])


def _fallback_dz(ds: Any) -> float:
    for key in ("SpacingBetweenSlices", "SliceThickness"):
        value = _float_or_none(ds.get(key, None))
        if value and value > 0:
            return value
    return 1.0


def _slice_normal(ds: Any) -> np.ndarray | None:
    iop = ds.get("ImageOrientationPatient", None)
    if iop is None or len(iop) != 6:
        return None
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 0 else None


def _position(ds: Any, normal: np.ndarray | None) -> float | None:
    ipp = ds.get("ImagePositionPatient", None)
    if ipp is None or len(ipp) != 3:
        return None
    pos = np.asarray(ipp, float)
    return float(pos @ normal) if normal is not None else float(pos[2])


def _burned_in(ds: Any) -> bool:
    """BurnedInAnnotation = YES: text (names, dates, IDs) is part of the pixels themselves."""
    return str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES"


def _burned_in_problem(n: int) -> str:
    what = "the DICOM image has" if n == 1 else f"all {n} DICOM slices have"
    return (
        f"{what} burned-in annotations (BurnedInAnnotation = YES): their text would reach the "
        "heat maps; no slice left to read"
    )


def read_dicom_file(path: str | Path) -> tuple[np.ndarray, Spacing, dict[str, Any]]:
    """One DICOM file (single slice or multi-frame) as (Z, Y, X) with rescale applied.

    A file marked BurnedInAnnotation = YES is refused (it is all the slices there are)."""
    path = Path(path)
    if not path.is_file():
        raise BTDInputError(path, "file not found")
    ds = _dcmread(path)
    if _burned_in(ds):
        raise BTDInputError(path, _burned_in_problem(1))
    raw = _pixels(ds, path)
    values, integral = _rescale(ds, raw)
    modality = str(ds.get("Modality", "") or "")
    volume = _final_dtype(values, modality, integral)
    dy, dx = _pixel_spacing(ds)
    return volume, clean_spacing((_fallback_dz(ds), dy, dx)), _safe_meta(ds, volume.shape[0])


def _dicom_candidates(folder: Path) -> list[Path]:
    """Files of a folder that may be DICOM (by suffix), skipping DICOMDIR/readme-like files."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.suffix.lower() in DICOM_SUFFIXES
        and p.stem.lower() not in _SKIP_NAMES
    )


#: Header fields every slice of one series must share: (keyword, what the message calls it).
_SERIES_FIELDS = (
    ("SeriesInstanceUID", "series"),
    ("Modality", "modality"),
    ("PixelSpacing", "pixel spacing"),
    ("ImageOrientationPatient", "orientation"),
    ("RescaleSlope", "rescale slope"),
    ("RescaleIntercept", "rescale intercept"),
)


def _field_value(ds: Any, keyword: str) -> Any:
    """A header value made comparable: numbers as a tuple of floats, text as text."""
    value = ds.get(keyword, None)
    if value is None or isinstance(value, str):
        return value
    try:
        items = [value] if isinstance(value, int | float) else list(value)
        return tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return str(value)


def _same_value(a: Any, b: Any) -> bool:
    """Equal, numbers up to 1e-4 (header float noise between the slices of one series)."""
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        return bool(np.allclose(a, b, rtol=0, atol=1e-4))
    return a == b


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return "/".join(f"{v:g}" for v in value)
    return "none" if value is None else str(value)


def _check_same_geometry(items: list[tuple[Path, Any, np.ndarray]], folder: Path) -> None:
    """A folder must hold one series: same matrix, series, modality, spacing, orientation and
    rescale in every slice, one frame per file. Stacking slices that differ would silently
    distort the volume (or mix two scans) instead of failing."""
    first_path, first_ds, first_px = items[0]
    expected = {k: _field_value(first_ds, k) for k, _ in _SERIES_FIELDS}
    for path, ds, px in items[1:]:
        if px.shape[1:] != first_px.shape[1:]:
            raise BTDInputError(
                folder,
                f"mixed series: {first_path.name} is {first_px.shape[1]}x{first_px.shape[2]} but "
                f"{path.name} is {px.shape[1]}x{px.shape[2]} (Rows x Columns)",
            )
        for keyword, what in _SERIES_FIELDS:
            value = _field_value(ds, keyword)
            if not _same_value(value, expected[keyword]):
                if keyword == "SeriesInstanceUID":
                    raise BTDInputError(
                        folder, f"mixed series: {path.name} belongs to another series"
                    )
                raise BTDInputError(
                    folder,
                    f"mixed series: {what} {_shown(expected[keyword])} in {first_path.name} but "
                    f"{_shown(value)} "
                    f"in {path.name}; one series needs the same {what} in every slice",
                )
    if len(items) > 1 and any(px.shape[0] != 1 for _, _, px in items):
        raise BTDInputError(folder, "mixed series: multi-frame files together with other files")


def _sort_slices(
    items: list[tuple[Path, Any, np.ndarray]],
) -> tuple[list[tuple[Path, Any, np.ndarray]], list[float] | None]:
    """Sort by position along the slice normal; InstanceNumber when positions are absent."""
    normal = _slice_normal(items[0][1])
    positions = [_position(ds, normal) for _, ds, _ in items]
    if all(p is not None for p in positions):
        order = sorted(range(len(items)), key=lambda i: (positions[i], i))
        return [items[i] for i in order], [float(positions[i]) for i in order]
    order = sorted(
        range(len(items)), key=lambda i: (int(items[i][1].get("InstanceNumber", 0) or 0), i)
    )
    return [items[i] for i in order], None


def _slice_dz(folder: Path, positions: list[float] | None, ds: Any) -> float:
    """Slice spacing from sorted positions (median step); header value for a single slice."""
    if not positions or len(positions) < 2:
        return _fallback_dz(ds)
    steps = np.diff(positions)
    if np.any(steps < 1e-4):
        i = int(np.argmin(steps))
        raise BTDInputError(
            folder,
            f"two slices at the same position ({positions[i]:.3f} mm): more than one series?",
        )
    return float(np.median(steps))


def load_dicom_series(folder: str | Path) -> DicomSeries:
    """All DICOM files of one series in `folder`, with what loaders need to map annotations.

    Slices marked BurnedInAnnotation = YES are skipped, not stacked (their burned-in text would
    reach the heat maps), with a logged warning giving the count; if every slice is marked, a
    BTDInputError.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BTDInputError(folder, "DICOM folder not found")
    files = _dicom_candidates(folder)
    if not files:
        raise BTDInputError(folder, "empty folder: no DICOM files (.dcm or no extension)")
    items, burned = [], 0
    for path in files:
        ds = _dcmread(path)
        if _burned_in(ds):
            burned += 1
            continue
        items.append((path, ds, _pixels(ds, path)))
    if not items:
        raise BTDInputError(folder, _burned_in_problem(burned))
    _check_same_geometry(items, folder)
    items, positions = _sort_slices(items)
    first = items[0][1]
    modality = str(first.get("Modality", "") or "")
    rescaled = [_rescale(ds, px) for _, ds, px in items]
    values = np.concatenate([v for v, _ in rescaled], axis=0)
    volume = _final_dtype(values, modality, all(ok for _, ok in rescaled))
    dy, dx = _pixel_spacing(first)
    spacing = clean_spacing((_slice_dz(folder, positions, first), dy, dx))
    if positions is None:
        positions = [i * spacing[0] for i in range(volume.shape[0])]
    if burned:  # after every check: a series that fails is one error line, not a warning too
        log.warning(
            "skipped %d of %d DICOM slices marked BurnedInAnnotation = YES (their burned-in text "
            "would reach the heat maps)",
            burned,
            len(files),
        )
    return DicomSeries(
        volume=volume,
        spacing=spacing,
        meta=_safe_meta(first, volume.shape[0]),
        positions=positions,
        instance_numbers=[int(ds.get("InstanceNumber", 0) or 0) for _, ds, _ in items],
        series_uid=str(first.get("SeriesInstanceUID", "")),
        description=str(first.get("SeriesDescription", "") or ""),
    )


def read_dicom_series(folder: str | Path) -> tuple[np.ndarray, Spacing, dict[str, Any]]:
    """One series in a folder as (Z, Y, X): sorted slices, rescale applied (CT -> int16 HU)."""
    series = load_dicom_series(folder)
    return series.volume, series.spacing, series.meta


def find_series_folders(root: str | Path) -> list[Path]:
    """Every folder at or below `root` holding files with a .dcm suffix (TCIA download layout)."""
    root = Path(root)
    dirs = {p.parent for p in root.rglob("*") if p.is_file() and p.suffix.lower() == ".dcm"}
    return sorted(dirs)


def series_header(folder: Path) -> Any:
    """Header of the first DICOM file in a folder (no pixels): to choose between series cheaply."""
    files = [p for p in _dicom_candidates(folder)]
    if not files:
        raise BTDInputError(folder, "empty folder: no DICOM files")
    return _dcmread(files[0], header_only=True)


# ----------------------------------------------------------------------------- other formats


def _reorient_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, Spacing]:
    """Array with a voxel->RAS affine to (Z, Y, X) axial slices in DICOM display order.

    DICOM axial pixels run towards patient Left (columns) and Posterior (rows), slices are sorted
    towards Superior; we return the same (X->L, Y->P, Z->S) whatever the file's storage order.
    """
    import nibabel.orientations as no

    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    start = no.io_orientation(affine)
    transform = no.ornt_transform(start, no.axcodes2ornt(("L", "P", "S")))
    out = no.apply_orientation(data, transform)
    lps_sizes = [0.0, 0.0, 0.0]
    for old_axis, (new_axis, _flip) in enumerate(transform):
        lps_sizes[int(new_axis)] = float(sizes[old_axis])
    volume = np.ascontiguousarray(out.transpose(2, 1, 0))
    return volume, clean_spacing((lps_sizes[2], lps_sizes[1], lps_sizes[0]))


def _squeeze_to_3d(path: Path, data: np.ndarray) -> np.ndarray:
    """Drop trailing singleton axes (4-D NIfTI with one volume); a 2-D image becomes one slice."""
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise BTDInputError(path, f"expected a 2-D or 3-D volume, got shape {data.shape}")
    return data


def check_declared_size(path: Path, shape: Iterable[int]) -> None:
    """Refuse a header declaring more than MAX_VOXELS voxels, or none, before any data is read."""
    dims = [int(s) for s in shape]
    if any(d < 0 for d in dims):
        raise BTDInputError(path, f"header declares a negative size {tuple(dims)}")
    if 0 in dims:
        raise BTDInputError(
            path,
            f"empty volume: the header declares {' x '.join(map(str, dims))} voxels "
            "(an axis of length 0)",
        )
    n = int(np.prod(dims, dtype=object)) if dims else 0
    if n > MAX_VOXELS:
        raise BTDInputError(
            path,
            f"header declares {' x '.join(map(str, dims))} = {n:,} voxels, more than the limit "
            f"of {MAX_VOXELS:,} (btd.data.io.MAX_VOXELS); not read",
        )


def _read_nifti(path: Path) -> tuple[np.ndarray, Spacing, dict[str, Any]]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise BTDInputError(path, f"corrupt NIfTI file ({exc.__class__.__name__}: {exc})") from None
    check_declared_size(path, img.shape)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise BTDInputError(path, f"corrupt NIfTI file ({exc.__class__.__name__}: {exc})") from None
    data = _squeeze_to_3d(path, data)
    volume, spacing = _reorient_ras(data, img.affine)
    return volume, spacing, {"format": "nifti", "modality": None, "scanner": "unknown"}


_NRRD_SPACE_SIGNS = {
    "left": -1.0,
    "right": 1.0,
    "posterior": -1.0,
    "anterior": 1.0,
    "superior": 1.0,
    "inferior": -1.0,
}
_NRRD_SHORT = {
    "L": "left",
    "R": "right",
    "P": "posterior",
    "A": "anterior",
    "S": "superior",
    "I": "inferior",
}


def _nrrd_ras_signs(space: str, path: Path) -> np.ndarray:
    """Per-world-axis sign turning the file's space (e.g. 'left-posterior-superior') into RAS."""
    words = (
        space.lower().split("-") if "-" in space else [_NRRD_SHORT.get(c, c) for c in space.upper()]
    )
    if len(words) != 3 or any(w not in _NRRD_SPACE_SIGNS for w in words):
        raise BTDInputError(path, f"unsupported NRRD space '{space}'")
    return np.array([_NRRD_SPACE_SIGNS[w] for w in words])


def _check_nrrd_header(path: Path) -> None:
    """Declared size within MAX_VOXELS, and a detached data file inside the header's own folder:
    a header must not make us read /etc/passwd or another patient's file."""
    import nrrd

    try:
        header = nrrd.read_header(str(path))
    except Exception as exc:
        raise BTDInputError(
            path, f"corrupt NRRD header ({exc.__class__.__name__}: {exc})"
        ) from None
    check_declared_size(path, header.get("sizes", []))
    data_file = header.get("datafile", header.get("data file"))
    if data_file is None:
        return
    folder = path.parent.resolve()
    target = (folder / str(data_file)).resolve()
    if not target.is_relative_to(folder):
        raise BTDInputError(path, "detached data file points outside the header's folder; refused")
    if not target.is_file():
        raise BTDInputError(path, f"detached data file {target.relative_to(folder)} not found")


def _read_nrrd(path: Path) -> tuple[np.ndarray, Spacing, dict[str, Any]]:
    import nrrd

    _check_nrrd_header(path)
    try:
        data, header = nrrd.read(str(path))  # Fortran index order: data[i, j, k] as in the header
    except Exception as exc:
        raise BTDInputError(path, f"corrupt NRRD file ({exc.__class__.__name__}: {exc})") from None
    data = _squeeze_to_3d(path, np.asarray(data))
    meta = {"format": "nrrd", "modality": None, "scanner": "unknown"}
    directions = header.get("space directions")
    space = header.get("space")
    if directions is not None and space is not None:
        try:
            dirs = np.asarray(directions, dtype=float)
        except (TypeError, ValueError):  # a non-spatial axis is written as 'none'
            dirs = np.full(1, np.nan)
        if dirs.shape != (3, 3) or not np.all(np.isfinite(dirs)):
            raise BTDInputError(
                path, f"'space directions' must be 3 spatial vectors, got {directions}"
            )
        affine = np.eye(4)
        affine[:3, :3] = (dirs * _nrrd_ras_signs(str(space), path)).T  # columns = axis vectors
        volume, spacing = _reorient_ras(data, affine)
        return volume, spacing, meta
    spacings = header.get("spacings")
    sx, sy, sz = (float(s) for s in spacings[:3]) if spacings is not None else _UNIT_SPACING
    return np.ascontiguousarray(data.transpose(2, 1, 0)), clean_spacing((sz, sy, sx)), meta


def _npy_shape(path: Path) -> tuple[int, ...]:
    """Shape from a .npy header without reading the data."""
    fmt = np.lib.format
    readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            if version in readers:
                return tuple(readers[version](f)[0])
        return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
    except Exception as exc:
        raise BTDInputError(path, f"truncated or corrupt .npy file ({exc})") from None


def _read_npy(path: Path) -> tuple[np.ndarray, Spacing, dict[str, Any]]:
    check_declared_size(path, _npy_shape(path))
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise BTDInputError(path, f"truncated or corrupt .npy file ({exc})") from None
    if not isinstance(data, np.ndarray) or not np.issubdtype(data.dtype, np.number):
        raise BTDInputError(
            path, f"expected a numeric array, got dtype {getattr(data, 'dtype', '?')}"
        )
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise BTDInputError(
            path, f"expected a 2-D slice or 3-D (Z, Y, X) volume, got shape {data.shape}"
        )
    return data, _UNIT_SPACING, {"format": "npy", "modality": None, "scanner": "unknown"}


def read_image(path: str | Path) -> np.ndarray:
    """An 8-bit image file as a 2-D grayscale array (uint8; 16-bit grayscale kept as is)."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                return np.asarray(img)
            return np.asarray(img.convert("L"))
    except FileNotFoundError:
        raise BTDInputError(path, "image file not found") from None
    except Exception as exc:
        raise BTDInputError(
            path, f"corrupt or unreadable image ({exc.__class__.__name__}: {exc})"
        ) from None


def _read_image_volume(path: Path) -> tuple[np.ndarray, Spacing, dict[str, Any]]:
    return (
        read_image(path)[None],
        _UNIT_SPACING,
        {"format": "image", "modality": None, "scanner": "unknown"},
    )


def check_volume(path: str | Path, volume: np.ndarray) -> np.ndarray:
    """Reject volumes the pipeline cannot use: not 3-D, empty, or with NaN/inf voxels."""
    if volume.ndim != 3:
        raise BTDInputError(path, f"expected a 3-D (Z, Y, X) volume, got shape {volume.shape}")
    if volume.size == 0:
        raise BTDInputError(path, f"empty volume, shape {volume.shape}")
    if np.issubdtype(volume.dtype, np.floating) and not np.all(np.isfinite(volume)):
        bad = int(np.count_nonzero(~np.isfinite(volume)))
        raise BTDInputError(path, f"{bad} NaN/inf voxel(s) in the volume")
    return volume


def check_scan_values(source: str | Path, volume: np.ndarray, modality: str | None) -> None:
    """Refuse a scan whose voxels cannot give a meaningful verdict (`btd scan`, `btd prepare`).

    Why: such volumes do not fail by themselves, they give silent wrong answers. An empty one
    (no voxels, no slices) has nothing to cut; a constant one (all voxels equal: a blank or
    failed export) normalises to one grey level, so every patch is the same; a CT one with values
    far outside CT_PLAUSIBLE_HU after rescale (a wrong RescaleSlope/Intercept, unit or data type)
    is clipped by the HU window into a blank or saturated volume; NaN/inf voxels poison every
    score. Each would be scored, or turned into training patches, without a word. `read_volume`
    already refuses empty and NaN/inf files of every kind (label volumes too, which may well be
    constant); this adds what only a scan must satisfy. One fill value below the CT range is
    allowed: padding outside the field of view (e.g. -32768), which the window clips to air, as
    the scanner meant. `modality` None (unknown, or already normalised) skips the CT range.
    """
    check_volume(source, volume)
    lo, hi = float(volume.min()), float(volume.max())
    if lo == hi:
        raise BTDInputError(
            source,
            f"constant volume: all {volume.size:,} voxels are {lo:g}; nothing to detect "
            "(a blank or failed export?)",
        )
    if modality != "ct":
        return
    low, high = CT_PLAUSIBLE_HU
    if hi <= high and lo >= low:
        return
    if hi <= high and float(volume[volume != lo].min()) >= low:
        return  # one padding value below the range, everything else plausible
    outside = int(np.count_nonzero((volume < low) | (volume > high)))
    raise BTDInputError(
        source,
        f"absurd CT values: {outside:,} voxel(s) outside the plausible {low:g}..{high:g} HU "
        f"(range {lo:g}..{hi:g} after rescale); wrong rescale slope/intercept, units or data "
        "type?",
    )


def _is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def read_volume(path: str | Path) -> tuple[np.ndarray, Spacing, dict[str, Any]]:
    """Any supported scan as (Z, Y, X), spacing (dz, dy, dx) mm and non-identifying metadata.

    DICOM folder or file, .nii/.nii.gz, .nrrd/.nhdr, .npy (2-D = one slice) and 8-bit images.
    Formats without geometry (.npy, images) report unit spacing and `spacing_known: False`.
    """
    path = Path(path)
    if not path.exists():
        raise BTDInputError(path, "file or folder not found")
    if not path.is_dir() and not path.is_file():
        raise BTDInputError(path, "not a regular file (a FIFO, socket or device); refused unread")
    suffix = path.suffix.lower()
    if path.is_dir():
        volume, spacing, meta = read_dicom_series(path)
    elif _is_nifti(path):
        volume, spacing, meta = _read_nifti(path)
    elif suffix in (".nrrd", ".nhdr"):
        volume, spacing, meta = _read_nrrd(path)
    elif suffix == ".npy":
        volume, spacing, meta = _read_npy(path)
    elif suffix in IMAGE_SUFFIXES:
        volume, spacing, meta = _read_image_volume(path)
    elif suffix in DICOM_SUFFIXES:
        volume, spacing, meta = read_dicom_file(path)
    else:
        raise BTDInputError(
            path,
            f"unsupported file type '{suffix}' "
            "(use a DICOM folder/.dcm, .nii(.gz), .nrrd, .npy, .png/.jpg)",
        )
    meta = {**meta, "spacing_known": meta["format"] in ("dicom", "nifti", "nrrd")}
    return check_volume(path, volume), spacing, meta
