"""The preprocess stage as one call per modality, so the notebook only orchestrates and shows."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from btd.data.acquire import acquire
from btd.data.dataset import (
    build_patch_dataset,
    common_pixel_mm,
    dataset_info,
    save_patch_dataset,
)
from btd.data.records import ScanVolume
from btd.data.scans import save_scan
from btd.params import parse_list, require_positive


@dataclass
class ModalityResult:
    """What preprocessing produced for one modality, with its wall time."""

    modality: str
    scans: list[ScanVolume]
    patches: np.ndarray
    manifest: pd.DataFrame
    seconds_acquire: float
    seconds_patches: float


def modality_config(modality: str, **kw) -> dict:
    """Validate and type the flat papermill parameters of one modality (lists arrive as 'a,b')."""
    cfg = dict(kw)
    cfg["scanners"] = parse_list(cfg["scanners"], f"data.{modality}.scanners")
    cfg["tumour_diameter_mm"] = parse_list(
        cfg["tumour_diameter_mm"], f"data.{modality}.tumour_diameter_mm", float
    )
    for key in ("patients_per_scanner", "image_size", "pixel_mm", "patch_size"):
        require_positive(cfg[key], f"data.{modality}.{key}")
    return cfg


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def preprocess_modality(
    modality: str,
    cfg: dict,
    raw_dir: str | Path,
    scans_dir: str | Path,
    processed_dir: str | Path,
    split_fractions: dict[str, float],
    seed: int,
    margin_mm: float,
    n_jobs: int,
) -> ModalityResult:
    """Acquire the cohort, store the scans, cut and split patches, store them."""
    t0 = time.perf_counter()
    scans = acquire(modality, raw_dir, cfg, seed, n_jobs=n_jobs)
    out_scans = _fresh_dir(Path(scans_dir) / modality)
    for s in scans:
        save_scan(s, out_scans)
    t1 = time.perf_counter()
    patches, manifest = build_patch_dataset(
        scans,
        int(cfg["patch_size"]),
        int(cfg["healthy_per_slice"]),
        split_fractions,
        seed,
        margin_mm,
    )
    info = dataset_info(modality, common_pixel_mm(scans), int(cfg["patch_size"]), split="patient")
    save_patch_dataset(Path(processed_dir) / modality, patches, manifest, info)
    return ModalityResult(modality, scans, patches, manifest, t1 - t0, time.perf_counter() - t1)


def counts_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Patches per scanner x (split, label), with patient and slice counts: the cohort at a glance."""
    patches = manifest.pivot_table(
        index="scanner", columns=["split", "label"], values="index", aggfunc="count", fill_value=0
    )
    patches.columns = [f"{s}_{lab}" for s, lab in patches.columns]
    people = manifest.groupby("scanner")["patient"].nunique().rename("patients")
    slices = manifest.groupby("scanner")[["patient", "slice"]].apply(
        lambda d: len(d.drop_duplicates())
    )
    return pd.concat([people, slices.rename("slices_with_patches"), patches], axis=1)


def stage_metrics(results: list[ModalityResult]) -> dict:
    """The numbers DVC tracks for this stage (cohort sizes)."""
    out: dict = {}
    for r in results:
        m = r.manifest
        out[r.modality] = {
            "patients": int(m["patient"].nunique()),
            "slices": int(sum(s.volume.shape[0] for s in r.scans)),
            "patches": int(len(m)),
            "patches_TM": int((m["label"] == "TM").sum()),
            "patches_TB": int((m["label"] == "TB").sum()),
            "patches_per_split": {
                k: int(v) for k, v in m["split"].value_counts().sort_index().items()
            },
        }
    return out


def stage_timings(results: list) -> dict:
    """How long each part took (run info, not a DVC metric: it changes from run to run)."""
    return {
        r.modality: {
            "seconds_acquire": round(r.seconds_acquire, 1),
            "seconds_patches": round(r.seconds_patches, 1),
        }
        for r in results
    }
