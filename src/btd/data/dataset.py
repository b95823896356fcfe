"""Build, save and load the patch dataset (patches.npy + manifest.csv per modality).

Beside the pair, `dataset.json` records what the patches are (modality, pixel spacing, patch size,
intensity normalisation), so training can store it in the checkpoint and `btd scan` can bring a
new volume to the same geometry. Folders written before it existed have no dataset.json.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from btd.atomic import write_atomic, write_json
from btd.data.patches import extract_patch, healthy_sites, tumour_sites
from btd.data.preprocess import CT_HU_MAX, CT_HU_MIN, normalize_volume
from btd.data.records import ScanVolume
from btd.data.splits import split_patients
from btd.errors import BTDInputError

DATASET_JSON = "dataset.json"
DATASET_FORMAT = "btd-patches"
MANIFEST_COLUMNS = [
    "index", "patient", "scanner", "split", "slice", "cy", "cx", "py", "px", "diameter_mm", "label",
]  # fmt: skip


def tumour_location_pool(scans: list[ScanVolume]) -> np.ndarray:
    """(row, col) of every annotated tumour in the cohort: where healthy (TB) patches are taken."""
    return np.array([(t.y, t.x) for s in scans for t in s.tumours], dtype=np.float64).reshape(-1, 2)


def check_annotations(scan: ScanVolume) -> None:
    """An annotation outside the volume is a data error: name the patient and the tumour."""
    z, h, w = scan.volume.shape
    for i, t in enumerate(scan.tumours):
        # voxel i covers [i - 0.5, i + 0.5): a centre between the first slice and its edge is inside
        if not (-0.5 <= t.z < z - 0.5 and -0.5 <= t.y < h - 0.5 and -0.5 <= t.x < w - 0.5):
            raise BTDInputError(
                f"{scan.source}:{scan.patient}",
                f"tumour {i} at (z={t.z}, y={t.y}, x={t.x}) lies outside the volume of shape {scan.volume.shape}",
            )


def build_patch_dataset(
    scans: list[ScanVolume],
    patch_size: int,
    healthy_per_slice: int,
    split_fractions: dict[str, float],
    seed: int,
    margin_mm: float = 20.0,
    location_pool: np.ndarray | None = None,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Normalise every scan, cut TM and TB patches, and assign patient-level splits.

    `location_pool` replaces the cohort's tumour locations as the TB candidates (a cohort without
    annotations has none).
    """
    for s in scans:
        check_annotations(s)
    patients = pd.DataFrame(
        {"patient": [s.patient for s in scans], "scanner": [s.scanner for s in scans]}
    )
    split_of = split_patients(patients, split_fractions, seed)
    pool = tumour_location_pool(scans) if location_pool is None else location_pool
    rng = np.random.default_rng(seed)
    patches: list[np.ndarray] = []
    rows: list[dict] = []
    for scan in tqdm(scans, desc="cutting patches"):
        norm = normalize_volume(scan.volume, scan.modality)
        sites = tumour_sites(scan) + healthy_sites(scan, pool, healthy_per_slice, rng, margin_mm)
        for site in sites:
            patch, py, px = extract_patch(norm[site.z], site.cy, site.cx, patch_size)
            rows.append(
                {
                    "index": len(patches),
                    "patient": scan.patient,
                    "scanner": scan.scanner,
                    "split": split_of[scan.patient],
                    "slice": site.z,
                    "cy": site.cy,
                    "cx": site.cx,
                    "py": py,
                    "px": px,
                    "diameter_mm": site.diameter_mm,
                    "label": site.label,
                }
            )
            patches.append(patch)
    arr = np.stack(patches)[:, None].astype(np.float32)
    return arr, pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def intensity_rule(modality: str) -> dict[str, Any]:
    """How `normalize_volume` maps a modality to [0, 1], as plain data for dataset.json."""
    if modality == "ct":
        return {"method": "ct_hu_window", "hu_min": CT_HU_MIN, "hu_max": CT_HU_MAX}
    if modality == "mri":
        return {"method": "mri_per_patient_standardisation"}
    raise BTDInputError("dataset", f"unknown modality {modality!r}")


def dataset_info(modality: str, pixel_mm: float | None, patch_size: int, **extra: Any) -> dict:
    """The dataset.json record: what a model trained on these patches expects of its input."""
    return {
        "format": DATASET_FORMAT,
        "modality": modality,
        "pixel_mm": None if pixel_mm is None else float(pixel_mm),
        "patch_size": int(patch_size),
        "intensity": intensity_rule(modality),
        **extra,
    }


def common_pixel_mm(scans: list[ScanVolume]) -> float | None:
    """The in-plane pixel size shared by all scans (square pixels), else None (not one geometry)."""
    sizes = {(round(s.spacing[1], 6), round(s.spacing[2], 6)) for s in scans}
    if len(sizes) != 1:
        return None
    dy, dx = sizes.pop()
    return float(dy) if dy == dx else None


def save_patch_dataset(
    folder: str | Path, patches: np.ndarray, manifest: pd.DataFrame, info: dict | None = None
) -> None:
    """Write patches.npy, manifest.csv (and dataset.json if `info`) atomically, file by file."""
    folder = Path(folder)
    write_atomic(folder / "patches.npy", lambda p: np.save(p, patches))
    write_atomic(folder / "manifest.csv", lambda p: manifest.to_csv(p, index=False))
    if info is not None:
        write_json(folder / DATASET_JSON, info)


def _file_sha256(h: Any, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def read_dataset_info(folder: str | Path) -> dict[str, Any]:
    """dataset.json of a patch folder ({} when absent: folders from before it existed)."""
    path = Path(folder) / DATASET_JSON
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BTDInputError(path, f"not readable JSON ({exc})") from None
    if not isinstance(info, dict) or info.get("modality") not in (None, "ct", "mri"):
        raise BTDInputError(path, "expected an object with modality 'ct' or 'mri'")
    pixel = info.get("pixel_mm")
    if pixel is not None and (not isinstance(pixel, int | float) or not pixel > 0):
        raise BTDInputError(path, f"pixel_mm must be a positive number, got {pixel!r}")
    return info


def training_data_info(folder: str | Path, split: str = "train") -> dict[str, Any]:
    """What a checkpoint records about its training data: dataset.json plus a fingerprint.

    The fingerprint is the SHA-256 of patches.npy and manifest.csv (the rows used are those with
    `split`), so a model can be traced to the exact patches it saw. Plain types only.
    """
    folder = Path(folder)
    info = read_dataset_info(folder)
    h = hashlib.sha256()
    for name in ("patches.npy", "manifest.csv"):
        _file_sha256(h, folder / name)
    return {
        "modality": info.get("modality"),
        "pixel_mm": info.get("pixel_mm"),
        "patch_size": info.get("patch_size"),
        "intensity": info.get("intensity"),
        "data_sha256": h.hexdigest(),
        "data_split": split,
    }


def load_patch_dataset(
    folder: str | Path, split: str | None = None
) -> tuple[np.ndarray, pd.DataFrame]:
    """Patches and manifest rows, optionally of one split; checks the pair is consistent."""
    folder = Path(folder)
    ppath, mpath = folder / "patches.npy", folder / "manifest.csv"
    for p in (ppath, mpath):
        if not p.is_file():
            raise BTDInputError(p, "missing; run the preprocess stage (dvc repro preprocess) first")
    try:
        patches = np.load(ppath, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise BTDInputError(ppath, f"not a readable .npy array ({exc})") from None
    try:
        manifest = pd.read_csv(mpath)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise BTDInputError(mpath, f"not a readable CSV ({exc})") from None
    if len(manifest) != len(patches) or patches.ndim != 4:
        raise BTDInputError(
            mpath, f"{len(manifest)} manifest rows for patches of shape {patches.shape}"
        )
    for column in ("index", "split"):
        if column not in manifest.columns:
            raise BTDInputError(mpath, f"missing column '{column}'")
    index = manifest["index"].to_numpy()
    if len(index) and (index.min() < 0 or index.max() >= len(patches)):
        raise BTDInputError(mpath, f"index column points outside patches.npy (N={len(patches)})")
    if split is not None:
        manifest = manifest[manifest["split"] == split]
    return np.ascontiguousarray(patches[manifest["index"].to_numpy()]), manifest.reset_index(
        drop=True
    )
