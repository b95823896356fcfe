"""Build, save and load the patch dataset (patches.npy + manifest.csv per modality)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from btd.atomic import write_atomic
from btd.data.patches import extract_patch, healthy_sites, tumour_sites
from btd.data.preprocess import normalize_volume
from btd.data.records import ScanVolume
from btd.data.splits import split_patients
from btd.errors import BTDInputError

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
) -> tuple[np.ndarray, pd.DataFrame]:
    """Normalise every scan, cut TM and TB patches, and assign patient-level splits."""
    for s in scans:
        check_annotations(s)
    patients = pd.DataFrame(
        {"patient": [s.patient for s in scans], "scanner": [s.scanner for s in scans]}
    )
    split_of = split_patients(patients, split_fractions, seed)
    pool = tumour_location_pool(scans)
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


def save_patch_dataset(folder: str | Path, patches: np.ndarray, manifest: pd.DataFrame) -> None:
    """Write patches.npy and manifest.csv atomically (a killed run leaves the old pair or nothing)."""
    folder = Path(folder)
    write_atomic(folder / "patches.npy", lambda p: np.save(p, patches))
    write_atomic(folder / "manifest.csv", lambda p: manifest.to_csv(p, index=False))


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
