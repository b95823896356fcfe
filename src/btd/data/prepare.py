"""`btd prepare`: a user's own volumes (+ tumour labels) -> the patch dataset `btd train` reads.

Each volume is read with `btd.data.io.read_volume`, resampled in-plane to the chosen pixel size,
and handed as a `ScanVolume` to `btd.data.dataset.build_patch_dataset`, the same code path as the
pipeline's preprocess stage: the same intensity window per modality, TM patches at the tumours,
TB patches away from them, patient-level splits. Tumours come from label volumes (one per
connected blob, at its centroid) or from a sites CSV (`slice,y,x,diameter_mm`). With a single
patient the split is by slice, with a warning. The folder is written beside its final place and
moved in at the end, so a killed run leaves the old dataset or none.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from btd.data.dataset import (
    DATASET_JSON,
    build_patch_dataset,
    dataset_info,
    save_patch_dataset,
)
from btd.data.io import check_scan_values
from btd.data.records import ScanVolume, Tumour
from btd.data.splits import check_fractions, split_patients
from btd.errors import BTDConfigError, BTDInputError

DATASET_FILES = frozenset({"patches.npy", "manifest.csv", DATASET_JSON})
SITE_COLUMNS = ["slice", "y", "x", "diameter_mm"]
DEFAULT_FRACTIONS = {"train": 0.6, "val": 0.2, "holdout": 0.2}


@dataclass
class PreparedVolume:
    """One input brought to the dataset's geometry: the scan and its lesion mask (resampled)."""

    scan: ScanVolume
    lesions: np.ndarray  # (Z, Y, X) bool, True inside a tumour


@dataclass
class PrepareResult:
    """What `prepare_dataset` wrote, for the CLI to report."""

    out: Path
    manifest: pd.DataFrame
    split_by: str
    warnings: list[str] = field(default_factory=list)


def _name(path: Path, i: int) -> str:
    """How an input is named in messages: its file name, never a (patient-named) folder."""
    return f"input {i + 1} ({'DICOM folder' if path.is_dir() else path.name})"


def _read(path: Path, i: int) -> tuple[np.ndarray, tuple[float, float, float], dict[str, Any]]:
    from btd.data.io import read_volume

    try:
        return read_volume(path)
    except BTDInputError as exc:
        raise BTDInputError(_name(path, i), exc.problem) from None


def input_modality(meta: dict[str, Any], modality: str | None, name: str) -> str:
    """--modality, else the DICOM Modality; CT and MRI are normalised differently, so no guess."""
    from btd.detect.scan import known_modality

    header = known_modality(meta, None)
    if modality is not None:
        if header is not None and header != modality:
            raise BTDInputError(name, f"is {header.upper()} by its header, not {modality.upper()}")
        return modality
    if header is None:
        raise BTDInputError(name, "modality not stored in the file; pass --modality ct|mri")
    return header


def input_scanner(meta: dict[str, Any]) -> str:
    """The scanner name a prepared patch carries: DICOM Manufacturer + ManufacturerModelName, the
    key `btd scan` looks a per-scanner BTD+ reference up by (so a calibration made from a prepared
    dataset has per-scanner references a scan can find); "input" when the file does not say."""
    from btd.detect.scan import scanner_key

    return scanner_key(meta) or "input"


def zoom_inplane(volume: np.ndarray, factors: tuple[float, float], order: int) -> np.ndarray:
    """Zoom every slice by (fy, fx): order 1 for intensities, 0 for labels (same output grid)."""
    from scipy import ndimage

    if factors == (1.0, 1.0):
        return volume
    return ndimage.zoom(volume, (1.0, *factors), order=order, grid_mode=True, mode="nearest")


def label_mask(path: Path, shape: tuple[int, ...], i: int) -> np.ndarray:
    """Lesion voxels (label > 0) of a label volume of the same shape as its scan."""
    labels, _, _ = _read(path, i)
    if labels.shape != tuple(shape):
        raise BTDInputError(
            _name(path, i), f"label volume has shape {labels.shape}, the scan {tuple(shape)}"
        )
    return labels > 0


def read_sites(path: Path, shape: tuple[int, ...], i: int) -> np.ndarray:
    """(n, 4) slice, y, x, diameter_mm rows of a sites CSV (exactly these columns)."""
    from btd.detect.scan import check_row_widths, read_csv_rows

    name = _name(path, i)
    if not path.is_file():
        raise BTDInputError(name, "sites file not found")
    header, rows = read_csv_rows(path)
    if sorted(header) != sorted(SITE_COLUMNS):
        raise BTDInputError(
            name, f"need exactly the columns {','.join(SITE_COLUMNS)}, found {header}"
        )
    check_row_widths(path, header, rows)
    order = [header.index(c) for c in SITE_COLUMNS]
    try:
        sites = np.array([[float(r[j]) for j in order] for r in rows], dtype=np.float64)
    except ValueError:
        raise BTDInputError(name, "sites must be numbers") from None
    sites = sites.reshape(-1, 4)
    inside = np.all((sites[:, :3] >= 0) & (sites[:, :3] < np.array(shape) - 0.5), axis=1)
    if not np.isfinite(sites).all() or not inside.all() or (sites[:, 3] <= 0).any():
        raise BTDInputError(name, "every site needs a voxel inside the volume and a diameter > 0")
    return sites


def sites_mask(sites: np.ndarray, shape: tuple[int, ...], spacing: tuple[float, ...]) -> np.ndarray:
    """Balls of each site's diameter: the lesion voxels a sites CSV stands for."""
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    mask = np.zeros(shape, dtype=bool)
    dz, dy, dx = spacing
    for z, y, x, d in sites:
        mask |= ((zz - z) * dz) ** 2 + ((yy - y) * dy) ** 2 + ((xx - x) * dx) ** 2 <= (d / 2) ** 2
    return mask


def lesion_tumours(mask: np.ndarray, spacing: tuple[float, float, float]) -> list[Tumour]:
    """One tumour per connected blob, at its centroid; diameter of its largest cross-section."""
    from scipy import ndimage

    blobs, n = ndimage.label(mask)
    tumours = []
    for k in range(1, n + 1):
        blob = blobs == k
        z, y, x = ndimage.center_of_mass(blob)
        area_mm2 = blob.sum(axis=(1, 2)).max() * spacing[1] * spacing[2]
        tumours.append(Tumour(float(z), float(y), float(x), float(2 * np.sqrt(area_mm2 / np.pi))))
    return tumours


def prepare_volume(
    path: Path,
    i: int,
    pixel_mm: float,
    modality: str | None,
    labels: Path | None = None,
    sites: Path | None = None,
) -> PreparedVolume:
    """Read one input, resample it (and its lesions) to `pixel_mm` pixels, find its tumours."""
    raw, spacing, meta = _read(path, i)
    name = _name(path, i)
    if not meta.get("spacing_known"):
        raise BTDInputError(name, "no pixel spacing in the file; use DICOM, NIfTI or NRRD")
    mod = input_modality(meta, modality, name)
    check_scan_values(name, raw, mod)
    mask = np.zeros(raw.shape, dtype=bool)
    if labels is not None:
        mask = label_mask(labels, raw.shape, i)
    elif sites is not None:
        mask = sites_mask(read_sites(sites, raw.shape, i), raw.shape, spacing)
    factors = (spacing[1] / pixel_mm, spacing[2] / pixel_mm)
    volume = zoom_inplane(raw.astype(np.float32), factors, order=1)
    mask = zoom_inplane(mask.astype(np.float32), factors, order=1) > 0  # any lesion overlap
    new_spacing = (float(spacing[0]), float(pixel_mm), float(pixel_mm))
    scan = ScanVolume(
        patient=f"patient-{i:03d}",
        modality=mod,
        scanner=input_scanner(meta),
        volume=volume,
        spacing=new_spacing,
        tumours=lesion_tumours(mask, new_spacing),
        source=name,
    )
    return PreparedVolume(scan, mask)


def location_grid(volumes: list[PreparedVolume], patch_size: int) -> np.ndarray:
    """TB candidates: a grid over the smallest slice (a few patients give too few tumour spots)."""
    h = min(v.scan.volume.shape[1] for v in volumes)
    w = min(v.scan.volume.shape[2] for v in volumes)
    step = max(patch_size // 4, 1)
    ys = np.arange(patch_size // 2, h - patch_size // 2 + 1, step)
    xs = np.arange(patch_size // 2, w - patch_size // 2 + 1, step)
    grid = np.array([(y, x) for y in ys for x in xs], dtype=np.float64).reshape(-1, 2)
    spots = np.array([(t.y, t.x) for v in volumes for t in v.scan.tumours]).reshape(-1, 2)
    return np.concatenate([grid, spots])


def drop_overlapping_tb(
    patches: np.ndarray,
    manifest: pd.DataFrame,
    volumes: list[PreparedVolume],
    size: int,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Remove TB patches whose square touches a lesion voxel (a margin around the centre is not
    enough: a patch is shifted inwards at the slice border)."""
    masks = {v.scan.patient: v.lesions for v in volumes}
    keep = []
    for row in manifest.itertuples(index=False):
        y0, x0 = row.cy - row.py, row.cx - row.px
        hit = masks[row.patient][row.slice, y0 : y0 + size, x0 : x0 + size].any()
        keep.append(row.label != "TB" or not hit)
    keep = np.asarray(keep, dtype=bool)
    manifest = manifest[keep].reset_index(drop=True)
    manifest["index"] = np.arange(len(manifest))
    return np.ascontiguousarray(patches[keep]), manifest


def split_by_slice(manifest: pd.DataFrame, fractions: dict[str, float], seed: int) -> pd.DataFrame:
    """One patient: assign whole slices to splits (neighbouring slices are alike: optimistic).

    Slices with and without tumour patches are split separately (the patient splitter's strata),
    so that every split gets both kinds when there are enough slices.
    """
    with_tm = set(manifest.loc[manifest["label"] == "TM", "slice"])
    ids = sorted(manifest["slice"].unique())
    kind = ["tumour" if z in with_tm else "healthy" for z in ids]
    split_of = split_patients(pd.DataFrame({"patient": ids, "scanner": kind}), fractions, seed)
    manifest = manifest.copy()
    manifest["split"] = manifest["slice"].map(split_of)
    return manifest


def check_out_folder(out: Path) -> None:
    """The output may be new, or a dataset folder (then replaced whole); nothing else is touched."""
    if out.exists() and not out.is_dir():
        raise BTDInputError(out, "output path exists and is not a folder; pass a folder to --out")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in DATASET_FILES)
        if foreign:
            raise BTDInputError(
                out,
                f"output folder holds files `btd prepare` did not write ({foreign[0]}, ...); "
                "choose a new or empty folder",
            )
    if out.parent.exists() and not out.parent.is_dir():
        raise BTDInputError(out, f"{out.parent.name} is a file, not a folder")


def _check_options(
    inputs: list[Path], labels: list[Path] | None, sites: list[Path] | None, **kw: Any
) -> None:
    if not inputs:
        raise BTDConfigError("inputs", "give at least one volume")
    if labels and sites:
        raise BTDConfigError("labels", "give --labels or --sites, not both")
    for what, given in (("labels", labels), ("sites", sites)):
        if given and len(given) != len(inputs):
            raise BTDConfigError(what, f"{len(given)} given for {len(inputs)} input volume(s)")
    for key in ("pixel_mm", "patch_size", "healthy_per_slice"):
        if not kw[key] > 0:
            raise BTDConfigError(key, f"must be positive, got {kw[key]!r}")


def build_dataset(
    volumes: list[PreparedVolume],
    patch_size: int,
    healthy_per_slice: int,
    fractions: dict[str, float],
    seed: int,
    margin_mm: float,
) -> tuple[np.ndarray, pd.DataFrame, str, list[str]]:
    """Patches + manifest through the pipeline's builder; split by slice for a single patient."""
    warnings = []
    for v in volumes:
        _, h, w = v.scan.volume.shape
        if h < patch_size or w < patch_size:
            raise BTDInputError(
                v.scan.source, f"slices are {h}x{w} pixels after resampling, smaller than "
                f"the {patch_size}x{patch_size} patches",
            )  # fmt: skip
    scans = [v.scan for v in volumes]
    pool = location_grid(volumes, patch_size)
    patches, manifest = build_patch_dataset(
        scans, patch_size, healthy_per_slice, fractions, seed, margin_mm, location_pool=pool
    )
    patches, manifest = drop_overlapping_tb(patches, manifest, volumes, patch_size)
    split_by = "patient"
    if len(volumes) == 1:
        manifest = split_by_slice(manifest, fractions, seed)
        split_by = "slice"
        warnings.append(
            "one patient: split by slice; neighbouring slices are alike, so validation and "
            "calibration are optimistic"
        )
    if not (manifest["split"] == "val").any():
        warnings.append("no patches in the 'val' split: `btd calibrate` needs some")
    if not (manifest["label"] == "TM").any():
        warnings.append("no tumour (TM) patches: `btd calibrate --task inject` needs some")
    return patches, manifest, split_by, warnings


def prepare_dataset(
    inputs: list[str | Path],
    out: str | Path,
    *,
    pixel_mm: float = 1.4,
    patch_size: int = 48,
    modality: str | None = None,
    labels: list[str | Path] | None = None,
    sites: list[str | Path] | None = None,
    healthy_per_slice: int = 2,
    fractions: dict[str, float] | None = None,
    seed: int = 0,
    margin_mm: float | None = None,
) -> PrepareResult:
    """Volumes (+ labels or sites) -> `out/` with patches.npy, manifest.csv and dataset.json.

    `margin_mm` (default: half the patch width) keeps TB centres away from tumours; TB patches
    that still touch a lesion are dropped.
    """
    inputs = [Path(p) for p in inputs]
    labels = [Path(p) for p in labels] if labels else None
    sites = [Path(p) for p in sites] if sites else None
    _check_options(
        inputs, labels, sites, pixel_mm=pixel_mm, patch_size=patch_size,
        healthy_per_slice=healthy_per_slice,
    )  # fmt: skip
    fractions = check_fractions(fractions or DEFAULT_FRACTIONS, "split")
    out = Path(out).absolute()
    check_out_folder(out)
    volumes = [
        prepare_volume(
            p, i, pixel_mm, modality, labels[i] if labels else None, sites[i] if sites else None
        )
        for i, p in enumerate(inputs)
    ]
    mods = sorted({v.scan.modality for v in volumes})
    if len(mods) > 1:
        raise BTDInputError("inputs", f"mixed modalities {mods}; prepare one modality at a time")
    margin = patch_size * pixel_mm / 2 if margin_mm is None else margin_mm
    patches, manifest, split_by, warnings = build_dataset(
        volumes, patch_size, healthy_per_slice, fractions, seed, margin
    )
    info = dataset_info(
        mods[0], pixel_mm, patch_size, split=split_by, n_inputs=len(inputs), source="btd prepare"
    )
    write_dataset_folder(out, patches, manifest, info)
    return PrepareResult(out, manifest, split_by, warnings)


def write_dataset_folder(
    out: Path, patches: np.ndarray, manifest: pd.DataFrame, info: dict
) -> None:
    """Write into a staging folder beside `out`, then swap it in (the old dataset or the new)."""
    from btd.detect.scan import begin_output, commit_output

    tmp = begin_output(out)
    try:
        save_patch_dataset(tmp, patches, manifest, info)
        commit_output(tmp, out, check=check_out_folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
