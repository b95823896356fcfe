"""Acquire a cohort: run the virtual scanners, or read a real dataset from data/raw, into ScanVolumes."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from joblib import Parallel, delayed
from tqdm import tqdm

from btd.data.records import ScanVolume
from btd.data.simulate.protocols import load_protocols, select_scanners
from btd.errors import BTDConfigError

SOURCES = ("virtual", "lidc", "duke")


def _scan_virtual(modality: str, scanner: Any, patient: str, seed: int, cfg: dict) -> ScanVolume:
    if modality == "ct":
        from btd.data.simulate.ct import scan_ct_patient

        return scan_ct_patient(
            patient,
            scanner,
            seed=seed,
            n_slices=n_ct_slices(cfg["coverage_mm"], scanner.slice_thickness_mm),
            size=cfg["image_size"],
            pixel_mm=cfg["pixel_mm"],
            n_nodules=cfg["tumours_per_patient"],
            nodule_diameter_mm=tuple(cfg["tumour_diameter_mm"]),
        )
    from btd.data.simulate.mri import scan_mri_patient

    return scan_mri_patient(
        patient,
        scanner,
        seed=seed,
        n_slices=cfg["n_slices"],
        size=cfg["image_size"],
        pixel_mm=cfg["pixel_mm"],
        n_masses=cfg["tumours_per_patient"],
        mass_diameter_mm=tuple(cfg["tumour_diameter_mm"]),
        slice_mm=cfg["slice_mm"],
    )


def n_ct_slices(coverage_mm: float, thickness_mm: float) -> int:
    """Slices a CT scanner needs to cover `coverage_mm` in z (enough for 32 mm cubes around nodules)."""
    return max(3, int(round(coverage_mm / thickness_mm)))


def virtual_cohort(
    modality: str, raw_dir: str | Path, cfg: dict, seed: int, n_jobs: int = 2
) -> list[ScanVolume]:
    """Generate and scan `patients_per_scanner` patients on each selected virtual scanner.

    Each patient's seed is derived from (seed, scanner index, patient index), so adding a scanner
    does not change the patients of the others.
    """
    protocols = load_protocols(Path(raw_dir) / "virtual_scanners" / f"{modality}.yaml", modality)
    scanners = select_scanners(protocols, list(cfg["scanners"]), f"data.{modality}.scanners")
    n = int(cfg["patients_per_scanner"])
    if n < 1:
        raise BTDConfigError(f"data.{modality}.patients_per_scanner", "must be >= 1")
    jobs = [
        (sc, f"{modality}-{sc.name}-p{i:03d}", seed * 1_000_003 + 7919 * si + i)
        for si, sc in enumerate(scanners)
        for i in range(n)
    ]
    run = Parallel(n_jobs=n_jobs, return_as="generator")(
        delayed(_scan_virtual)(modality, sc, pid, s, cfg) for sc, pid, s in jobs
    )
    return list(tqdm(run, total=len(jobs), desc=f"scanning {modality} patients"))


def real_cohort(modality: str, source: str, raw_dir: str | Path) -> list[ScanVolume]:
    """Read a real dataset laid out as described in data/raw/README.md."""
    raw_dir = Path(raw_dir)
    loaders: dict[str, Callable[[], Iterable[ScanVolume]]] = {}
    if source == "lidc":
        from btd.data.lidc import load_lidc

        ann = raw_dir / "lidc" / "annotations.csv"
        loaders["lidc"] = lambda: load_lidc(raw_dir / "lidc", ann if ann.exists() else None)
    elif source == "duke":
        from btd.data.duke import load_duke

        loaders["duke"] = lambda: load_duke(
            raw_dir / "duke", raw_dir / "duke" / "Annotation_Boxes.csv"
        )
    expected = {"ct": "lidc", "mri": "duke"}[modality]
    if source != expected:
        raise BTDConfigError(
            f"data.{modality}.source",
            f"'{source}' is not a {modality} source; use 'virtual' or '{expected}'",
        )
    return list(loaders[source]())


def acquire(
    modality: str, raw_dir: str | Path, cfg: dict, seed: int, n_jobs: int = 2
) -> list[ScanVolume]:
    """The cohort of one modality from the source chosen in params."""
    source = cfg.get("source", "virtual")
    if source not in SOURCES:
        raise BTDConfigError(f"data.{modality}.source", f"'{source}' is not one of {SOURCES}")
    if source == "virtual":
        return virtual_cohort(modality, raw_dir, cfg, seed, n_jobs)
    return real_cohort(modality, source, raw_dir)
