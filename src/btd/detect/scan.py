"""Scan a real volume with a trained BTD detector: cut or tile patches, score, flag, report.

The input may be a DICOM series folder, a single DICOM file, a NIfTI/NRRD volume or a .npy array
(anything `btd.data.io.read_volume` reads). It is normalised exactly like the training data
(CT: HU clipped to -700..2000 -> [0, 1]; MRI: per-patient standardisation), then either the
patches at given suspect coordinates are scored, or every slice is tiled (tiles that are mostly
background are skipped). Scores are flagged at a calibrated threshold.

Outputs (`scores.csv`, heat-map PNGs, `summary.md`) never contain patient identifiers: the input is
called "input volume" plus a hash of its voxels, never by its file or folder name, and only the
non-identifying metadata `read_volume` returns is used.

Patches are built on a background thread one chunk ahead of the model, so an accelerator is not
left waiting for the CPU to slice the next batch.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from btd.atomic import atomic_path, write_json
from btd.data.preprocess import CT_HU_MAX, CT_HU_MIN, normalize_volume
from btd.detect.btd import check_finite_scores
from btd.errors import BTDConfigError, BTDInputError
from btd.scenarios import ATTACKS

if TYPE_CHECKING:
    from accelerate import Accelerator

    from btd.detect.calibrate import Calibration
    from btd.detect.fast import FastOptions

TASKS = ATTACKS  # btd.scenarios: the one vocabulary
MODALITIES = ("ct", "mri")
SCORE_COLUMNS = ["slice", "y", "x", "score", "flagged"]
#: CT voxels above this HU are body (soft tissue); air and lung lie below it.
CT_BODY_HU = -500.0
INPUT_KINDS = {
    "dicom": "DICOM",
    "nifti": "NIfTI volume",
    "nrrd": "NRRD volume",
    "npy": "NumPy array (.npy)",
    "image": "2-D image",
}
FIGURE_PATTERN = "flag_*.png"
#: Files a scan writes (besides the heat maps); an output folder may hold only these.
SCAN_FILES = frozenset({"scores.csv", "summary.md", "summary.json"})

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- input


@dataclass
class ScanInput:
    """A normalised volume ready to be cut into patches, plus what the report may say about it.

    `scale` = (fy, fx): resampled pixels per original pixel (1, 1 without `pixel_mm`); sites are
    kept in the resampled grid and mapped back to original voxel coordinates for output.
    """

    volume: np.ndarray  # (Z, Y, X) float32 in [0, 1], possibly resampled in-plane
    foreground: np.ndarray  # (Z, Y, X) bool: body / tissue (False = background air)
    modality: str
    shape: tuple[int, int, int]  # original (Z, Y, X)
    spacing: tuple[float, float, float]
    meta: dict[str, Any]
    digest: str
    kind: str
    scale: tuple[float, float] = (1.0, 1.0)
    notes: list[str] = field(default_factory=list)
    resampling: dict[str, Any] = field(default_factory=dict)  # for summary.json

    def to_original(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Resampled pixel centres -> nearest original voxel indices."""
        fy, fx = self.scale
        oy = np.rint((np.asarray(y) + 0.5) / fy - 0.5).astype(np.int64)
        ox = np.rint((np.asarray(x) + 0.5) / fx - 0.5).astype(np.int64)
        return np.clip(oy, 0, self.shape[1] - 1), np.clip(ox, 0, self.shape[2] - 1)

    def to_resampled(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Original voxel indices -> nearest resampled pixel indices."""
        fy, fx = self.scale
        ry = np.rint((np.asarray(y) + 0.5) * fy - 0.5).astype(np.int64)
        rx = np.rint((np.asarray(x) + 0.5) * fx - 0.5).astype(np.int64)
        return np.clip(ry, 0, self.volume.shape[1] - 1), np.clip(rx, 0, self.volume.shape[2] - 1)


def volume_digest(volume: np.ndarray) -> str:
    """Short SHA-256 of the voxels: names the input in reports without its (identifying) path."""
    h = hashlib.sha256()
    h.update(str((volume.shape, volume.dtype.str)).encode())
    h.update(np.ascontiguousarray(volume).tobytes())
    return h.hexdigest()[:12]


def infer_modality(
    volume: np.ndarray, meta: dict[str, Any], modality: str | None, source: str | Path = "input"
) -> str:
    """'ct' or 'mri': the user's choice, else the DICOM Modality, else HU-like values mean CT."""
    if modality is not None:
        if modality not in MODALITIES:
            raise BTDConfigError("modality", f"unknown {modality!r}; use one of {MODALITIES}")
        return modality
    header = str(meta.get("modality") or "").upper()
    if header == "CT":
        return "ct"
    if header in ("MR", "MRI"):
        return "mri"
    if float(volume.min()) < -200:  # air at about -1000 HU: only CT has negative intensities
        return "ct"
    raise BTDInputError(
        source, "cannot tell CT from MRI (no DICOM modality, no HU values); pass --modality ct|mri"
    )


def input_kind(meta: dict[str, Any], is_dir: bool) -> str:
    """Human-readable input type for the report (never the file name)."""
    kind = INPUT_KINDS.get(str(meta.get("format")), str(meta.get("format")))
    if meta.get("format") == "dicom":
        kind += " series (folder)" if is_dir else " file"
    return kind


def foreground_mask(norm: np.ndarray, modality: str) -> np.ndarray:
    """Body/tissue voxels, holes filled per slice so the lungs (air inside the body) count as body.

    CT: normalised value above -500 HU; MRI: above the volume's Otsu threshold.
    """
    from scipy import ndimage

    if modality == "ct":
        mask = norm > (CT_BODY_HU - CT_HU_MIN) / (CT_HU_MAX - CT_HU_MIN)
    else:
        from skimage.filters import threshold_otsu

        if float(norm.max()) <= float(norm.min()):
            return np.ones(norm.shape, dtype=bool)
        mask = norm > threshold_otsu(norm)
    return np.stack([ndimage.binary_fill_holes(s) for s in mask])


def resample_inplane(volume: np.ndarray, factors: tuple[float, float]) -> np.ndarray:
    """Linear in-plane zoom of every slice by (fy, fx); values stay in [0, 1]."""
    from scipy import ndimage

    out = ndimage.zoom(
        volume, (1.0, *factors), order=1, prefilter=False, grid_mode=True, mode="nearest"
    )
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def known_modality(meta: dict[str, Any], modality: str | None) -> str | None:
    """The input's modality when the user or the DICOM header says it, else None (a guess)."""
    if modality is not None:
        return modality
    return {"CT": "ct", "MR": "mri", "MRI": "mri"}.get(str(meta.get("modality") or "").upper())


def check_model_modality(
    raw: np.ndarray, meta: dict[str, Any], modality: str | None, model: str | None, source: Path
) -> str | None:
    """Refuse an input of another modality than the model's; returns the modality to use.

    A known input modality (--modality, DICOM Modality) must equal the model's. An unknown one
    is taken to be the model's, unless the voxels are HU-like (CT) for an MRI model.
    """
    if model is None:
        return None
    known = known_modality(meta, modality)
    if known is None and model == "mri" and float(raw.min()) < -200:
        known = "ct"  # air at about -1000 HU: only CT has negative intensities
    if known is not None and known != model:
        raise BTDInputError(
            source,
            f"the input is {known.upper()} but the model was trained on {model.upper()} "
            "(the checkpoint's modality); use a model of the input's modality",
        )
    return model


def plan_resampling(
    spacing: tuple[float, float, float], meta: dict[str, Any], pixel_mm: float | None, source: str
) -> dict[str, Any]:
    """Where the slices go: in-plane factors from the header spacing to `pixel_mm` (plain data).

    `source` says where `pixel_mm` came from ('--pixel-mm', 'checkpoint', or 'none').
    """
    plan: dict[str, Any] = {
        "applied": False,
        "source": source,
        "from_mm": [float(spacing[1]), float(spacing[2])] if meta.get("spacing_known") else None,
        "to_mm": None if pixel_mm is None else float(pixel_mm),
        "factors": [1.0, 1.0],
    }
    if pixel_mm is None:
        return plan
    if not pixel_mm > 0:
        raise BTDConfigError("pixel_mm", f"must be positive, got {pixel_mm!r}")
    if not meta.get("spacing_known"):
        if source == "--pixel-mm":
            raise BTDConfigError(
                "pixel_mm", "the input volume has no pixel spacing (.npy / image); drop --pixel-mm"
            )
        return plan
    factors = [float(spacing[1]) / pixel_mm, float(spacing[2]) / pixel_mm]
    plan.update(factors=factors, applied=factors != [1.0, 1.0])
    return plan


def load_input(
    path: str | Path,
    modality: str | None = None,
    pixel_mm: float | None = None,
    prenormalized: bool = False,
    model_modality: str | None = None,
    pixel_source: str | None = None,
) -> ScanInput:
    """Read and normalise a scan; resample slices to `pixel_mm` (the model's pixel size).

    `model_modality` (the checkpoint's) refuses an input of another modality; `pixel_source` names
    where `pixel_mm` came from ('--pixel-mm' when None: then a volume without spacing is an error,
    while the checkpoint's spacing only warns).
    """
    from btd.data.io import check_scan_values, read_volume

    path = Path(path)
    raw, spacing, meta = read_volume(path)
    assumed = check_model_modality(raw, meta, modality, model_modality, path)
    mod = infer_modality(raw, meta, modality or assumed, path)
    check_scan_values(path, raw, None if prenormalized else mod)
    notes = []
    header = str(meta.get("modality") or "").upper()
    if modality is not None and header and {"CT": "ct", "MR": "mri"}.get(header, mod) != mod:
        notes.append(f"--modality {mod} overrides the DICOM modality {header}")
    if known_modality(meta, modality) is None and model_modality is not None:
        notes.append(f"modality not stored in the file; taken as the model's ({mod.upper()})")
    if prenormalized:
        norm = raw.astype(np.float32)
        lo, hi = float(norm.min()), float(norm.max())
        if lo < -1e-4 or hi > 1 + 1e-4:
            raise BTDInputError(path, f"--prenormalized needs values in [0, 1], found [{lo}, {hi}]")
        norm = np.clip(norm, 0.0, 1.0)
    else:
        norm = normalize_volume(raw, mod)
    plan = plan_resampling(spacing, meta, pixel_mm, pixel_source or "--pixel-mm")
    scale = (float(plan["factors"][0]), float(plan["factors"][1]))
    if plan["applied"]:
        norm = resample_inplane(norm, scale)
        notes.append(
            f"slices resampled from {spacing[1]:g} x {spacing[2]:g} mm to {pixel_mm:g} mm pixels "
            f"({plan['source']})"
        )
    if not meta.get("spacing_known"):
        notes.append(
            "the file stores no pixel spacing: scanned at its own pixels"
            + (f", assumed to be the model's {pixel_mm:g} mm" if pixel_mm is not None else "")
        )
    return ScanInput(
        volume=norm,
        foreground=foreground_mask(norm, mod),
        modality=mod,
        shape=tuple(int(s) for s in raw.shape),
        spacing=tuple(float(s) for s in spacing),
        meta=meta,
        digest=volume_digest(raw),
        kind=input_kind(meta, path.is_dir()),
        scale=scale,
        notes=notes,
        resampling=plan,
    )


# ----------------------------------------------------------------------------- sites


def read_csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header (lower-cased) and rows of a small CSV, read as text: no index column is guessed.

    pandas silently turns the first field into the index when rows have one field more than the
    header, which shifts every value into the wrong column; callers check the widths instead.
    """
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BTDInputError(path, f"not a readable CSV ({exc.__class__.__name__}: {exc})") from None
    if not rows:
        raise BTDInputError(path, "empty file; need a header and one row per site")
    return [c.strip().lower() for c in rows[0]], rows[1:]


def check_row_widths(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """Every row has as many fields as the header (strict columns)."""
    for i, row in enumerate(rows, start=1):
        if len(row) != len(header):
            raise BTDInputError(
                path,
                f"row {i}: {len(row)} fields, the header has {len(header)} ({','.join(header)})",
            )


def read_coords(path: str | Path, shape: tuple[int, int, int]) -> np.ndarray:
    """Suspect sites (n, 3) int (slice, y, x) from a CSV; every site must lie inside `shape`.

    Exactly the columns slice, y, x (any order, case-insensitive) and three fields in every row:
    an extra or missing column would otherwise shift the values into the wrong axes.
    Coordinates are 0-based voxel indices of the volume as read (slices sorted along the scan axis).
    """
    path = Path(path)
    if not path.is_file():
        raise BTDInputError(path, "coordinates file not found")
    header, rows = read_csv_rows(path)
    missing = [c for c in ("slice", "y", "x") if c not in header]
    if missing:
        raise BTDInputError(path, f"missing columns {missing}; need slice,y,x (found {header})")
    extra = [c for c in header if c not in ("slice", "y", "x")]
    if extra or len(header) != 3:
        raise BTDInputError(path, f"extra columns {extra or header}; need exactly slice,y,x")
    if not rows:
        raise BTDInputError(path, "no coordinates (the CSV has a header but no rows)")
    check_row_widths(path, header, rows)
    order = [header.index(c) for c in ("slice", "y", "x")]
    table = pd.DataFrame([[r[j].strip() for j in order] for r in rows])
    values = table.apply(pd.to_numeric, errors="coerce").to_numpy(float)
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise BTDInputError(path, f"row {i + 1}: slice, y, x must be numbers, got {rows[i]}")
    sites = np.rint(values).astype(np.int64)
    inside = ((sites >= 0) & (sites < np.asarray(shape))).all(axis=1)
    if not inside.all():
        i = int(np.argmax(~inside))
        z, y, x = sites[i]
        raise BTDInputError(
            path,
            f"row {i + 1}: (slice={z}, y={y}, x={x}) lies outside the input volume of shape "
            f"(slices, rows, cols) = {tuple(shape)}",
        )
    return sites


def tile_starts(length: int, size: int, stride: int) -> np.ndarray:
    """Tile origins covering 0..length with `size`-wide tiles every `stride` (last one flush)."""
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return np.asarray(starts, dtype=np.int64)


def tile_sites(
    foreground: np.ndarray, size: int, stride: int, min_foreground: float = 0.1
) -> tuple[np.ndarray, int]:
    """Centres (n, 3) (slice, y, x) of every tile holding at least `min_foreground` tissue.

    Returns the sites and the number of background tiles skipped.
    """
    if not isinstance(stride, int | np.integer) or stride < 1:
        raise BTDConfigError("stride", f"must be a positive integer, got {stride!r}")
    if not 0 <= min_foreground <= 1:
        raise BTDConfigError("min_foreground", f"must be in [0, 1], got {min_foreground!r}")
    n_z, h, w = foreground.shape
    ys, xs = tile_starts(h, size, stride), tile_starts(w, size, stride)
    # tissue fraction of every tile at once from a summed-area table
    integral = np.pad(foreground.astype(np.int64).cumsum(1).cumsum(2), ((0, 0), (1, 0), (1, 0)))
    y0, x0 = ys[:, None], xs[None, :]
    counts = (
        integral[:, y0 + size, x0 + size]
        - integral[:, y0, x0 + size]
        - integral[:, y0 + size, x0]
        + integral[:, y0, x0]
    )
    keep = counts >= min_foreground * size * size
    z, iy, ix = np.nonzero(keep)
    sites = np.stack([z, ys[iy] + size // 2, xs[ix] + size // 2], axis=1).astype(np.int64)
    return sites.reshape(-1, 3), int(keep.size - keep.sum())


def cut_patches(volume: np.ndarray, sites: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Patches (n, 1, P, P) at sites (slice, y, x) and each site's position inside its patch."""
    from btd.data.patches import extract_patch

    patches = np.empty((len(sites), 1, size, size), dtype=np.float32)
    centres = np.empty((len(sites), 2), dtype=np.float64)
    for i, (z, y, x) in enumerate(sites):
        patch, py, px = extract_patch(volume[z], int(y), int(x), size)
        patches[i, 0], centres[i] = patch, (py, px)
    return patches, centres


def patch_chunks(
    volume: np.ndarray, sites: np.ndarray, size: int, chunk: int
) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """(site slice, patches, centres) for consecutive chunks of `chunk` sites."""
    for lo in range(0, len(sites), chunk):
        sl = slice(lo, min(lo + chunk, len(sites)))
        yield (sl, *cut_patches(volume, sites[sl], size))


def prefetch(items: Iterator[Any]) -> Iterator[Any]:
    """Produce the next item on a worker thread while the caller consumes the current one."""
    done = object()
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(next, items, done)
        while (item := future.result()) is not done:
            future = pool.submit(next, items, done)
            yield item


# ----------------------------------------------------------------------------- scoring


@dataclass
class Flagged:
    """A flagged site kept for its heat-map figure (resampled-grid patch and residual)."""

    row: int
    score: float
    patch: np.ndarray
    residual: np.ndarray
    centre: tuple[float, float]


@dataclass
class SiteScores:
    """Scores of all sites, and the highest-scoring flagged ones with their residual maps."""

    scores: np.ndarray
    flagged: np.ndarray
    figures: list[Flagged]
    seconds: float


def score_sites(
    diffusion,
    volume: np.ndarray,
    sites: np.ndarray,
    threshold: float,
    window: int | None = None,
    batch_size: int = 64,
    max_figures: int = 20,
    fast: FastOptions | None = None,
    transform: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> SiteScores:
    """BTD score of the patch at every site, streamed in chunks; keep the top flagged residuals.

    `transform(scores, residual_maps, centres)` (a BTD+ `--score`) replaces each chunk's BTD scores
    before they are thresholded; None keeps the paper's score.

    `window` None scores the whole patch (removal); an int scores that square at the site (injection).
    `fast` runs the U-Net through `btd.detect.fast.FastScorer` (channels-last, bf16, compile) with
    `batch_size` taken from it; None uses the reference path.
    """
    from btd.detect.btd import score
    from btd.detect.fast import FastScorer

    if not isinstance(batch_size, int) or batch_size < 1:
        raise BTDConfigError("batch_size", f"must be a positive integer, got {batch_size!r}")
    cap = max(len(sites), 1)  # a batch larger than the data would only allocate memory
    if fast is not None:
        fast = replace(fast, batch_size=min(fast.batch_size, cap))
        run, batch_size = FastScorer(diffusion, fast).score, fast.batch_size
    else:
        batch_size = min(batch_size, cap)
        run = partial(score, diffusion, batch_size=batch_size)

    size = int(diffusion.image_size[0])
    n_z, h, w = volume.shape
    if h < size or w < size:
        raise BTDInputError(
            "input volume", f"slices are {h}x{w}, smaller than the model's {size}x{size} patches"
        )
    scores = np.empty(len(sites), dtype=np.float64)
    kept: list[Flagged] = []
    t0 = time.perf_counter()
    for sl, patches, centres in prefetch(patch_chunks(volume, sites, size, 4 * batch_size)):
        kw = {"window": window, "centres": centres} if window is not None else {}
        s, maps = run(patches, **kw)
        check_finite_scores(s, sl.start)
        if transform is not None:
            s = np.asarray(transform(s, maps, centres), dtype=np.float64)
            check_finite_scores(s, sl.start)
        scores[sl] = s
        for i in np.flatnonzero(s > threshold):
            kept.append(
                Flagged(sl.start + int(i), float(s[i]), patches[i, 0], maps[i], tuple(centres[i]))
            )
        kept = sorted(kept, key=lambda f: (-f.score, f.row))[:max_figures]
    return SiteScores(scores, scores > threshold, kept, time.perf_counter() - t0)


def score_sites_distributed(
    accelerator: Accelerator,
    diffusion,
    volume: np.ndarray,
    sites: np.ndarray,
    threshold: float,
    window: int | None = None,
    batch_size: int = 64,
    max_figures: int = 20,
    fast: FastOptions | None = None,
    transform: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> SiteScores:
    """`score_sites` with the sites split across the accelerate processes; every process gets the
    merged result (scores in site order, the top flagged residuals over all processes)."""
    from accelerate.utils import gather_object

    t0 = time.perf_counter()
    with accelerator.split_between_processes(np.arange(len(sites))) as mine:
        part = score_sites(
            diffusion,
            volume,
            sites[mine],
            threshold,
            window,
            batch_size,
            max_figures,
            fast,
            transform,
        )
        for f in part.figures:
            f.row = int(mine[f.row])
    pieces = gather_object([(np.asarray(mine), part.scores, part.figures)])
    scores = np.empty(len(sites), dtype=np.float64)
    figures: list[Flagged] = []
    for rows, s, figs in pieces:
        scores[rows] = s
        figures += figs
    figures = sorted(figures, key=lambda f: (-f.score, f.row))[:max_figures]
    return SiteScores(scores, scores > threshold, figures, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- thresholds


@dataclass
class Threshold:
    """The decision threshold and where it came from (for the report)."""

    value: float
    source: str
    family: str | None = None
    target_fpr: float | None = None
    n: int | None = None
    #: `--score` (btd.detect.calibrate.SCORES) and, for BTD+, the benign reference it is read
    #: against: the calibration, and after the input is read the scanner whose reference is used.
    score: str = "btd"
    calibration: Calibration | None = None
    reference_scanner: str | None = None
    n_reference: int | None = None


def check_threshold(threshold: Any) -> float:
    """A user threshold: a finite number >= 0 (scores are mean squares; below 0 flags everything)."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | float | np.floating):
        raise BTDConfigError("threshold", f"must be a number, got {threshold!r}")
    if not np.isfinite(threshold) or threshold < 0:
        raise BTDConfigError("threshold", f"must be a finite number >= 0, got {threshold!r}")
    return float(threshold)


def resolve_threshold(
    checkpoint: str | Path, task: str, threshold: float | None, score: str = "btd"
) -> Threshold:
    """`threshold` if given, else `calibration_<task>.json` beside the checkpoint.

    A calibration file must record this checkpoint's hash: a resumed or swapped model scores on
    another scale, and its old threshold would silently flag far too many or too few sites. It
    must also be made for `score` (a file without a score is `btd`); a BTD+ score needs the
    calibration's benign reference even with `threshold` (which then replaces its threshold).
    """
    from btd.detect.calibrate import SCORES, Calibration, score_calibration_path

    if task not in TASKS:
        raise BTDConfigError("task", f"unknown {task!r}; use one of {TASKS}")
    if score not in SCORES:
        raise BTDConfigError("score", f"unknown {score!r}; use one of {SCORES}")
    if threshold is not None and score == "btd":
        return Threshold(check_threshold(threshold), "set with --threshold")
    path = score_calibration_path(checkpoint, task, score)
    if not path.is_file():
        flag = "" if score == "btd" else f" --score {score}"
        raise BTDInputError(
            path,
            f"calibration file not found; run `btd calibrate --checkpoint {checkpoint} "
            f"--patches data/processed/<modality> --task {task}{flag}` first"
            + (", or pass --threshold" if score == "btd" else " (it holds the benign reference)"),
        )
    cal = Calibration.load(path)
    cal.check_checkpoint(checkpoint, path)
    cal.check_score(score, path)
    if score == "btd":
        return Threshold(
            cal.threshold, f"calibration_{task}.json", cal.family, cal.target_fpr, int(cal.n)
        )
    if threshold is not None:
        return Threshold(
            check_threshold(threshold), "set with --threshold", score=score, calibration=cal
        )
    return Threshold(
        cal.threshold,
        path.name,
        cal.family,
        cal.target_fpr,
        int(cal.n),
        score=score,
        calibration=cal,
    )


def scanner_key(meta: dict[str, Any]) -> str | None:
    """'Manufacturer ManufacturerModelName' from a DICOM header, None unless both are known."""
    maker, model = meta.get("manufacturer"), meta.get("scanner")
    if not maker or not model or model == "unknown":
        return None
    return f"{str(maker).strip()} {str(model).strip()}"


def plus_transform(
    thr: Threshold, meta: dict[str, Any], task: str, window: int
) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None:
    """The `score_sites` transform of a BTD+ threshold (None for btd), reading each statistic
    against the scanner's benign reference when the calibration has one for the input's
    scanner (`scanner_key`), else the pooled one; records which on `thr`."""
    from btd.detect.calibrate import plus_reference, plus_statistic
    from btd.detect.plus import tail_score

    if thr.score == "btd" or thr.calibration is None:
        return None
    ref, used = plus_reference(thr.calibration, scanner_key(meta))
    thr.reference_scanner, thr.n_reference = used, int(ref.size)

    def transform(scores: np.ndarray, maps: np.ndarray, centres: np.ndarray) -> np.ndarray:
        if thr.score == "two-sided":  # BTD's own score is the residual energy it reads
            return tail_score(scores, ref)
        return tail_score(plus_statistic(maps, thr.score, task, window, centres), ref)

    return transform


def score_record(thr: Threshold) -> dict[str, Any]:
    """summary.json's `score`: which score, and for BTD+ which benign reference was used."""
    if thr.score == "btd":
        return {"variant": "btd"}
    return {
        "variant": thr.score,
        "reference": "scanner" if thr.reference_scanner is not None else "pooled",
        "scanner": thr.reference_scanner,
        "n_reference": thr.n_reference,
    }


# ----------------------------------------------------------------------------- outputs


def site_table(scan: ScanInput, sites: np.ndarray, result: SiteScores) -> pd.DataFrame:
    """scores.csv rows: original voxel coordinates (slice, y, x), score, flagged (0/1)."""
    y, x = scan.to_original(sites[:, 1], sites[:, 2])
    return pd.DataFrame(
        {
            "slice": sites[:, 0],
            "y": y,
            "x": x,
            "score": result.scores,
            "flagged": result.flagged.astype(int),
        },
        columns=SCORE_COLUMNS,
    )


class _HeatmapFigure:
    """One matplotlib figure reused for every flagged site: patch | squared residual, window outlined.

    Building a figure, its colour bar and its layout costs more than saving it; a scan writes up to
    `max_figures` heat maps after the model has finished, so that cost sits on the scan's critical
    path. The layout is computed once, for the first site; later sites only swap data and titles.
    """

    def __init__(self, size: int, window: int | None):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle

        self.plt, self.window = plt, window
        self.fig, (ax_img, ax_res) = plt.subplots(1, 2, figsize=(7.2, 3.4))
        blank = np.zeros((size, size), np.float32)
        self.img = ax_img.imshow(blank, cmap="gray", vmin=0.0, vmax=1.0)
        ax_img.set_title("patch (normalised)")
        self.res = ax_res.imshow(blank, cmap="inferno")
        ax_res.set_title("BTD residual$^2$")
        self.fig.colorbar(self.res, ax=ax_res, fraction=0.046, pad=0.04)
        self.boxes = []
        if window is not None:
            for ax in (ax_img, ax_res):
                box = Rectangle((0, 0), window, window, fill=False, ec="cyan", lw=1.2)
                self.boxes.append(ax.add_patch(box))
        for ax in (ax_img, ax_res):
            ax.set_xticks([])
            ax.set_yticks([])
        self.title = self.fig.suptitle(" ")
        self.laid_out = False

    def write(
        self, path: Path, item: Flagged, site: tuple[int, int, int], threshold: float
    ) -> Path:
        from btd.detect.btd import window_origin

        self.img.set_data(item.patch)
        heat = np.square(item.residual)
        self.res.set_data(heat)
        self.res.set_clim(float(heat.min()), float(heat.max()))
        if self.window is not None:
            size = item.patch.shape[0]
            y0 = window_origin(size, self.window, item.centre[0])
            x0 = window_origin(size, self.window, item.centre[1])
            for box in self.boxes:
                box.set_xy((x0 - 0.5, y0 - 0.5))
        z, y, x = site
        self.title.set_text(
            f"slice {z}, y {y}, x {x}: score {item.score:.4g} > threshold {threshold:.4g}"
        )
        if not self.laid_out:
            self.fig.tight_layout()
            self.laid_out = True
        with atomic_path(path) as tmp:
            self.fig.savefig(tmp, dpi=100, format="png", metadata={"Software": None})
        return path

    def close(self) -> None:
        self.plt.close(self.fig)


def write_heatmaps(
    out_dir: Path, table: pd.DataFrame, result: SiteScores, threshold: float, window: int | None
) -> list[Path]:
    """One PNG per kept flagged site, named by rank and coordinates only."""
    if not result.figures:
        return []
    figure = _HeatmapFigure(result.figures[0].patch.shape[0], window)
    paths = []
    try:
        for rank, item in enumerate(result.figures, start=1):
            z, y, x = (int(v) for v in table.loc[item.row, ["slice", "y", "x"]])
            path = out_dir / f"flag_{rank:03d}_slice{z}_y{y}_x{x}.png"
            paths.append(figure.write(path, item, (z, y, x), threshold))
    finally:
        figure.close()
    return paths


def _meta_lines(scan: ScanInput) -> list[str]:
    """Non-identifying acquisition facts (read_volume's meta holds nothing else)."""
    meta = scan.meta
    lines = []
    for key, label in (
        ("manufacturer", "manufacturer"),
        ("scanner", "scanner model"),
        ("kvp", "kVp"),
        ("kernel", "kernel"),
        ("field_strength_t", "field strength (T)"),
    ):
        value = meta.get(key)
        if value not in (None, "", "unknown"):
            lines.append(f"- {label}: {value}")
    return lines


@dataclass
class ScanReport:
    """What a scan produced (returned to the CLI and to tests)."""

    out_dir: Path
    table: pd.DataFrame
    figures: list[Path]
    summary: Path
    scores_csv: Path
    threshold: Threshold
    n_skipped: int
    seconds: float
    device: str


def summary_markdown(
    scan: ScanInput,
    table: pd.DataFrame,
    threshold: Threshold,
    task: str,
    window: int | None,
    mode: str,
    n_skipped: int,
    n_figures: int,
    patch_size: int,
    timing: str,
) -> str:
    """summary.md: input type, slices, patches, flagged count, threshold source, top-10 table."""
    z, h, w = scan.shape
    spacing = " x ".join(f"{s:g}" for s in scan.spacing)
    flagged = int(table["flagged"].sum())
    lines = [
        "# BTD scan summary",
        "",
        f"- input: input volume `{scan.digest}` (SHA-256 of the voxels, first 12 hex digits)",
        f"- input type: {scan.kind}, modality {scan.modality.upper()}",
        f"- slices: {z}, slice size {h} x {w} voxels, spacing (dz, dy, dx) {spacing} mm"
        + ("" if scan.meta.get("spacing_known") else " (not stored in the file)"),
        *_meta_lines(scan),
        *[f"- note: {n}" for n in scan.notes],
        f"- task: {task} (score = mean squared residual "
        + (f"in a {window} x {window} window at the site)" if window else "over the patch)"),
        f"- sites: {mode}; patch {patch_size} x {patch_size} px",
        f"- patches scored: {len(table)}"
        + (f" ({n_skipped} background tiles skipped)" if mode.startswith("tiles") else ""),
        f"- flagged: {flagged} ({100.0 * flagged / max(len(table), 1):.1f} %)",
        f"- threshold: {threshold.value:.6g}, {threshold.source}",
    ]
    if threshold.score != "btd":
        ref = threshold.reference_scanner
        lines.append(
            f"- score: BTD+ {threshold.score}, -log10 two-sided tail probability under the "
            f"{'benign reference of scanner ' + repr(ref) if ref else 'pooled benign reference'}"
            f" ({threshold.n_reference} validation samples)"
        )
    elif threshold.family is not None:
        lines.append(
            f"- calibration: {threshold.family} fit of {threshold.n} benign validation scores, "
            f"target false-positive rate {threshold.target_fpr:g}"
        )
    lines += [
        f"- heat maps: {n_figures} PNG(s) of the highest-scoring flagged sites",
        f"- time: {timing}",
        "",
        "## Top 10 sites by score",
        "",
        "| rank | slice | y | x | score | flagged |",
        "|---:|---:|---:|---:|---:|:---:|",
    ]
    top = table.sort_values("score", ascending=False, kind="stable").head(10)
    for rank, row in enumerate(top.itertuples(index=False), start=1):
        mark = "yes" if row.flagged else "no"
        lines.append(f"| {rank} | {row.slice} | {row.y} | {row.x} | {row.score:.6g} | {mark} |")
    lines += [
        "",
        "Coordinates are 0-based voxel indices (slice, row, column) of the volume as read. A flag "
        "means the patch's residual is unusual for authentic scans of the training scanners; it is "
        "a lead for review, not proof of tampering.",
        "",
    ]
    return "\n".join(lines)


def _write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def _source_name(source: str, root: Path) -> str:
    """An input path as the user may see it: relative to the input root, never the folder chain.

    Hospital exports name folders after the patient; the input root itself is shown by its file
    name (a file) or as 'input folder' (a DICOM series folder).
    """
    path = Path(source)
    if path == root:
        return "input folder" if root.is_dir() else root.name
    try:
        return str(path.relative_to(root))
    except ValueError:
        return source if not path.is_absolute() else path.name


def load_input_safely(path: Path, **kw: Any) -> ScanInput:
    """`load_input` with the file named relative to the input root in any error."""
    try:
        return load_input(path, **kw)
    except BTDInputError as exc:
        raise BTDInputError(_source_name(exc.source, path), exc.problem) from None


def check_out_dir(out_dir: Path) -> None:
    """Refuse an output path that cannot take a scan report, before any work is done.

    An existing folder is replaced as a whole at the end, so it may hold only what a scan writes:
    a folder with other files (a home folder, a patient export) is never touched.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise BTDInputError(
            out_dir, "output path exists and is not a folder; pass a folder to --out"
        )
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if not _is_scan_output(p))
        if foreign:
            raise BTDInputError(
                out_dir,
                f"output folder holds files `btd scan` did not write ({foreign[0]}, ...); "
                "choose a new or empty folder",
            )
    parent = out_dir.parent
    if parent.exists() and not parent.is_dir():
        raise BTDInputError(out_dir, f"{parent.name} is a file, not a folder")


def _is_scan_output(path: Path) -> bool:
    return path.is_file() and (path.name in SCAN_FILES or path.match(FIGURE_PATTERN))


def _staging(out_dir: Path, what: str) -> Path:
    """Sibling folder of `out_dir` for a scan in progress ('partial') or the replaced one ('old')."""
    return out_dir.with_name(f".{out_dir.name}.btd-{what}")


def begin_output(out_dir: Path) -> Path:
    """A fresh staging folder beside `out_dir` (a killed scan's leftover one is removed)."""
    import shutil

    tmp = _staging(out_dir, "partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_output(tmp: Path, out_dir: Path, check: Callable[[Path], None] | None = None) -> None:
    """Swap the finished staging folder in: the result is either the old report or the new one.

    A kill between the two renames leaves no report at `out_dir` (the old one is beside it as
    `.<name>.btd-old`), never a mix of both runs' files. `check` (default `check_out_dir`)
    re-checks that `out_dir` holds only what the command writes before it is moved away.
    """
    import shutil

    old = _staging(out_dir, "old")
    shutil.rmtree(old, ignore_errors=True)
    (check or check_out_dir)(out_dir)  # still only our outputs: nothing foreign is moved away
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def input_fingerprint(scan: ScanInput) -> dict[str, Any]:
    """What identifies the input in summary.json without naming it: voxel hash and geometry."""
    return {"sha256_12": scan.digest, "shape": list(scan.shape), "kind": scan.kind,
            "modality": scan.modality, "spacing_mm": list(scan.spacing)}  # fmt: skip


def summary_record(
    scan: ScanInput, table: pd.DataFrame, thr: Threshold, task: str, ident: dict[str, Any], **kw
) -> dict[str, Any]:
    """summary.json: proves a folder holds one finished scan (written last, moved in with it)."""
    return {
        "complete": True,
        "checkpoint": {"sha256": ident["sha256"], "step": ident["step"]},
        "input": input_fingerprint(scan),
        "model": {k: kw.get("model", {}).get(k) for k in ("modality", "pixel_mm", "patch_size")},
        "resampling": dict(scan.resampling),
        "task": task,
        "threshold": {"value": thr.value, "source": thr.source},
        "score": score_record(thr),
        "counts": {
            "patches_scored": int(len(table)),
            "flagged": int(table["flagged"].sum()),
            "background_skipped": int(kw.get("n_skipped", 0)),
            "heat_maps": int(kw.get("n_figures", 0)),
        },
    }


def check_slice_size(scan: ScanInput, size: int) -> None:
    """Slices smaller than the model's patch cannot be tiled or cut."""
    _, h, w = scan.volume.shape
    if h < size or w < size:
        raise BTDInputError(
            "input volume",
            f"slices are {h}x{w} pixels, smaller than the model's {size}x{size} patches",
        )


def target_pixel_mm(
    pixel_mm: float | None, model_mm: float | None, resample: bool
) -> tuple[float | None, str]:
    """The pixel size to resample to and where it comes from: --pixel-mm, else the checkpoint's."""
    if pixel_mm is not None:
        return pixel_mm, "--pixel-mm"
    if resample and model_mm is not None:
        return float(model_mm), "checkpoint"
    return None, "--no-resample" if not resample else "none"


def warn_resampling(scan: ScanInput, model_mm: float | None) -> None:
    """One logged warning (the CLI shows it as `btd scan: warning: ...`) when the model's pixel
    size cannot be (or is not) matched."""
    if not scan.meta.get("spacing_known"):
        log.warning(
            "the input volume stores no pixel spacing; scanned at its own pixels"
            + (f", assumed to be the model's {model_mm:g} mm" if model_mm is not None else "")
        )
    elif scan.resampling.get("source") == "--no-resample" and model_mm is not None:
        dy, dx = scan.spacing[1:]
        if (dy, dx) != (model_mm, model_mm):
            log.warning(
                f"--no-resample: scanning {dy:g} x {dx:g} mm pixels with a model trained at "
                f"{model_mm:g} mm"
            )


def run_scan(
    path: str | Path,
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    modality: str | None = None,
    coords: str | Path | None = None,
    task: str | None = None,
    threshold: float | None = None,
    window: int = 16,
    stride: int | None = None,
    min_foreground: float = 0.1,
    batch_size: int = 64,
    max_figures: int = 20,
    pixel_mm: float | None = None,
    prenormalized: bool = False,
    device: str = "auto",
    fast: FastOptions | None = None,
    accelerator: Accelerator | None = None,
    resample: bool = True,
    score: str = "btd",
) -> ScanReport | None:
    """Scan one volume end to end and write scores.csv, flag_*.png, summary.md and summary.json.

    `task` defaults to 'inject' with `coords` (is the tumour there real?) and 'remove' without
    (was one erased anywhere?). Output path, checkpoint and threshold are checked before the
    volume is read; the outputs are written into a staging folder beside `out_dir` and moved into
    place at the end. With `accelerator` (under `accelerate launch`) the sites are scored by all
    processes; the main process writes the outputs and returns the report, the others None.
    The volume is resampled in-plane from its header spacing to `pixel_mm`, by default the
    checkpoint's (`resample=False`: native pixels), and refused if it is of another modality
    than the checkpoint's. `score` is btd (the paper's) or a BTD+ variant of
    `btd.detect.calibrate.SCORES`, whose calibration must be made for it.
    """
    from btd.diffusion.checkpoint import (
        checkpoint_identity,
        load_detector,
        read_checkpoint_metadata,
    )
    from btd.diffusion.train import resolve_device

    t0 = time.perf_counter()
    if not isinstance(max_figures, int) or max_figures < 0:
        raise BTDConfigError("max_figures", f"must be a non-negative integer, got {max_figures!r}")
    out_dir = Path(out_dir).absolute()
    check_out_dir(out_dir)
    task = task or ("inject" if coords is not None else "remove")
    dev = accelerator.device if accelerator is not None else resolve_device(device)
    diffusion, _ = load_detector(checkpoint, dev)
    ident = checkpoint_identity(checkpoint)
    model = read_checkpoint_metadata(checkpoint)
    thr = resolve_threshold(checkpoint, task, threshold, score)
    size = int(diffusion.image_size[0])
    path = Path(path)
    target, source = target_pixel_mm(pixel_mm, model.get("pixel_mm"), resample)
    scan = load_input_safely(
        path,
        modality=modality,
        pixel_mm=target,
        prenormalized=prenormalized,
        model_modality=model.get("modality"),
        pixel_source=source,
    )
    check_slice_size(scan, size)
    if coords is not None:
        original = read_coords(coords, scan.shape)
        ry, rx = scan.to_resampled(original[:, 1], original[:, 2])
        sites = np.stack([original[:, 0], ry, rx], axis=1)
        mode, n_skipped = "given coordinates (--coords)", 0
    else:
        stride = stride or max(size // 2, 1)
        sites, n_skipped = tile_sites(scan.foreground, size, stride, min_foreground)
        mode = f"tiles every {stride} px (>= {min_foreground:.0%} tissue)"
    win = window if task == "inject" else None
    transform = plus_transform(thr, scan.meta, task, window)
    args = (diffusion, scan.volume, sites, thr.value, win, batch_size, max_figures, fast, transform)
    if len(sites) and accelerator is not None and accelerator.num_processes > 1:
        result = score_sites_distributed(accelerator, *args)
        if not accelerator.is_main_process:
            return None
    elif len(sites):
        result = score_sites(*args)
    else:
        result = SiteScores(np.empty(0), np.empty(0, bool), [], 0.0)
    check_finite_scores(result.scores)
    table = site_table(scan, sites, result)
    if coords is not None:  # report the coordinates exactly as given
        table[["y", "x"]] = original[:, 1:]
    tmp = begin_output(out_dir)
    with atomic_path(tmp / "scores.csv") as part:
        table.to_csv(part, index=False, float_format="%.8g")
    figures = write_heatmaps(tmp, table, result, thr.value, win)
    seconds = time.perf_counter() - t0
    timing = f"{seconds:.1f} s total, scoring {result.seconds:.2f} s on {dev}"
    if result.seconds > 0:
        timing += f" ({len(table) / result.seconds:.0f} patches/s)"
    text = summary_markdown(
        scan, table, thr, task, win, mode, n_skipped, len(figures), size, timing
    )
    _write_text(tmp / "summary.md", text)
    record = summary_record(
        scan, table, thr, task, ident, n_skipped=n_skipped, n_figures=len(figures), model=model
    )
    write_json(tmp / "summary.json", record)
    commit_output(tmp, out_dir)
    warn_resampling(scan, model.get("pixel_mm"))  # last, so that a failure stays one line
    return ScanReport(
        out_dir,
        table,
        [out_dir / f.name for f in figures],
        out_dir / "summary.md",
        out_dir / "scores.csv",
        thr,
        n_skipped,
        seconds,
        str(dev),
    )
