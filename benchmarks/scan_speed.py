"""Whole `btd scan` speed, end to end, with the share of each part and the bare U-Net forward beside it.

A synthetic CT series (int16 HU, RescaleIntercept -1024, `--size` x `--size` x `--slices`, 0.7 mm
pixels, 1.25 mm slices; a chest-like phantom, no patient data) is written with pydicom into a
temporary folder, then scanned with `btd.detect.scan.run_scan` exactly as `btd scan SERIES
--checkpoint CKPT` calls it (task remove: every slice tiled, fast path fp32 channels-last,
`--batch-size`). In the same process, round-robin with the scans:

- `scan`: wall time and patches/s of the whole `run_scan` call;
- `parts`: where that time went, from the same call: the functions `run_scan` uses are wrapped
  (module attributes, restored afterwards; `src/` is not changed) and their start/end times cut the
  run into contiguous spans that add up to the total: model loading (checkpoint, hash,
  calibration), DICOM read, resampling, normalisation + tiling, model scoring, report writing;
- `bare_forward`: just `unet(x, t)` of the scan's own U-Net copy (same memory format, batch size,
  device and threads) over the very tiles the scan scored, already in model space on the device;
- `ratios.scan_over_bare`: (a) / (c), against the issue's target of >= 0.8.

Medians over `--repeats`; one small warm-up scan (2 slices) first pays the one-time imports.

    python benchmarks/scan_speed.py                                   # models/ddpm/ct/checkpoint.pt
    python benchmarks/scan_speed.py --checkpoint models/ddpm/ct/checkpoint.pt --threads 2
    python benchmarks/scan_speed.py --random-model 16 --size 96 --slices 4 --repeats 1 \
        --out /tmp/scan_speed_smoke.json                              # smoke run, no checkpoint
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import machine_info, peak_rss_mb

from btd.atomic import write_json
from btd.runinfo import cpu_model, environment

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "scan_speed.json"
DEFAULT_CHECKPOINT = ROOT / "models" / "ddpm" / "ct" / "checkpoint.pt"
TASK = "remove"  # `btd scan` without --coords
TARGET = 0.8  # issue 14 item 7: the scan keeps >= 80 % of the bare forward's throughput
#: (key, README label) of the contiguous spans of one run_scan call, in order.
PARTS = (
    ("model_loading", "model loading (checkpoint, hash, calibration)"),
    ("dicom_read", "DICOM read"),
    ("resampling", "resampling"),
    ("normalisation_tiling", "normalisation + tiling"),
    ("model_scoring", "model scoring"),
    ("report_writing", "report writing"),
)
NOT_SEPARATED = [
    "DICOM read: file reading, header parsing, pixel decoding, rescale and the volume checks are "
    "one call (btd.data.io.read_volume); not split further.",
    "normalisation + tiling also holds the modality checks, the voxel hash and the foreground "
    "mask (each one's own time is under `functions`).",
    "model scoring includes cutting the patches: run_scan cuts them on a worker thread while the "
    "model runs (overlapped; its thread time is `scoring_detail.patch_cutting_worker_s`, not a "
    "share), and building the fast scorer (U-Net copy to channels-last).",
    "report writing: scores.csv is written inline in run_scan (no function to wrap); it is the "
    "remainder `report_detail.scores_csv_and_checks_s`, with the finite-score check and the "
    "resampling warning.",
    "the series files were just written, so they are read from the OS page cache, not the disk.",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=DEFAULT_CHECKPOINT,
        help="trained CT model, with calibration_remove.json beside it if calibrated",
    )
    p.add_argument(
        "--random-model",
        type=int,
        metavar="PATCH",
        default=None,
        help="instead: a tiny seeded model of this patch size (1 training step, "
        "modality ct, 1.4 mm) built in the temporary folder; for smoke runs",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="used when the checkpoint has no calibration_remove.json (default 0: every "
        "site flagged, so the report writes the full --max-figures heat maps)",
    )
    p.add_argument("--slices", type=int, default=60)
    p.add_argument("--size", type=int, default=512, help="rows = columns of each slice")
    p.add_argument("--pixel-mm", type=float, default=0.7, help="the series' pixel spacing")
    p.add_argument("--slice-mm", type=float, default=1.25, help="the series' slice spacing")
    p.add_argument("--repeats", type=int, default=2, help="timed scans (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--batch-size", type=int, default=64, help="as `btd scan --batch-size`")
    p.add_argument("--max-figures", type=int, default=20, help="as `btd scan --max-figures`")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)  # fmt: skip


# ----------------------------------------------------------------------------- the series


def phantom_slice(size: int, k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """One chest-like slice in HU: air, a body with a fat rim, two lungs with vessels, a spine."""
    u = np.linspace(-1.0, 1.0, size)
    yy, xx = u[:, None], u[None, :]
    z = (k + 0.5) / n - 0.5  # -0.5 .. 0.5 along the series
    grow = 1.0 - 0.3 * z * z  # lungs and body a little smaller at both ends
    body = (xx / (0.9 * grow)) ** 2 + ((yy - 0.05) / 0.7) ** 2
    hu = np.full((size, size), -1000.0)
    hu[body <= 1.0] = -100.0  # fat
    hu[body <= 0.85] = 40.0  # soft tissue
    for cx in (-0.4, 0.4):
        lung = ((xx - cx) / (0.27 * grow)) ** 2 + ((yy + 0.02) / (0.42 * grow)) ** 2 <= 1.0
        hu[lung] = -850.0
    spine = (xx**2 + (yy - 0.5) ** 2) <= 0.09**2
    hu[spine] = 700.0
    for vy, vx in rng.uniform(-0.35, 0.35, size=(24, 2)):  # vessels in and around the lungs
        r = rng.uniform(0.005, 0.02)
        hu[((xx - vx) ** 2 + (yy - vy) ** 2) <= r * r] = 30.0
    hu += rng.normal(0.0, 15.0, size=hu.shape)
    return np.clip(np.rint(hu), -1024, 3000).astype(np.int16)


def write_series(folder: Path, slices: int, size: int, pixel_mm: float, slice_mm: float) -> dict:
    """A CT DICOM series of the phantom: one uncompressed file per slice, one series UID."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        CTImageStorage,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    t0 = time.perf_counter()
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    seed = [f"btd-scan-speed-{slices}x{size}x{size}"]
    study, series, frame = (generate_uid(entropy_srcs=[*seed, w]) for w in ("st", "se", "fr"))
    intercept = -1024
    nbytes = 0
    for k in range(slices):
        hu = phantom_slice(size, k, slices, rng)
        sop = generate_uid(entropy_srcs=[*seed, str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = folder / f"CT{k:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = "CT", "Phantom", "Synthetic"
        ds.KVP, ds.ConvolutionKernel = 120, "STANDARD"
        ds.SeriesDescription = "synthetic phantom (benchmarks/scan_speed.py)"
        ds.InstanceNumber = k + 1
        corner = round(-0.5 * size * pixel_mm, 4)  # DS values: at most 16 characters
        ds.ImagePositionPatient = [corner, corner, round(k * slice_mm, 4)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [pixel_mm, pixel_mm]
        ds.SliceThickness = slice_mm
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, 1, "HU"
        ds.PixelData = (hu.astype(np.int32) - intercept).astype(np.int16).tobytes()
        if int(pydicom.__version__.split(".")[0]) >= 3:
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
        else:  # pydicom 2.4
            ds.is_little_endian, ds.is_implicit_VR = True, False
            ds.save_as(path, write_like_original=False)
        nbytes += path.stat().st_size
    return {"shape": [slices, size, size], "pixel_mm": pixel_mm, "slice_mm": slice_mm,
            "modality": "CT", "dtype": "int16", "rescale_intercept": intercept,
            "rescale_slope": 1, "files": slices, "mb": nbytes / 2**20,
            "write_s": time.perf_counter() - t0}  # fmt: skip


def random_checkpoint(folder: Path, patch: int) -> Path:
    """A tiny CT model (dim 8, mults 1,2) after one training step, recorded as 1.4 mm, patch px."""
    from btd.diffusion.config import TrainConfig
    from btd.diffusion.train import train

    x = np.random.default_rng(0).random((4, 1, patch, patch), dtype=np.float32)
    config = TrainConfig(image_size=patch, dim=8, dim_mults=(1, 2), attn_heads=1,
                         attn_dim_head=8, steps=1, batch_size=4, seed=0)  # fmt: skip
    data = {"modality": "ct", "pixel_mm": 1.4, "patch_size": patch, "intensity": None}
    train(x, config, folder, progress=False, data=data)
    return folder / "checkpoint.pt"


# ----------------------------------------------------------------------------- timing run_scan


class CallLog:
    """Start/end times of the wrapped functions' calls, and the arguments of chosen ones."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, float, bool]] = []  # name, start, end, main thread
        self.args: dict[str, tuple[tuple, dict]] = {}
        self._main = threading.get_ident()

    def wrap(self, name: str, fn: Callable, keep_args: bool = False) -> Callable:
        @wraps(fn)
        def timed_call(*a: Any, **k: Any) -> Any:
            if keep_args:
                self.args[name] = (a, k)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.calls.append(
                    (name, t0, time.perf_counter(), threading.get_ident() == self._main)
                )

        return timed_call

    def total(self, name: str, main_thread: bool | None = None) -> float:
        return sum(e - s for n, s, e, m in self.calls
                   if n == name and (main_thread is None or m == main_thread))  # fmt: skip

    def first(self, name: str) -> tuple[float, float]:
        """(start, end) of the first call of `name` (they are called once per scan)."""
        for n, s, e, _ in self.calls:
            if n == name:
                return s, e
        raise RuntimeError(f"run_scan did not call {name}: the benchmark needs updating")


def wrap_targets() -> list[tuple[object, str, str, bool]]:
    """(owner, attribute, name, keep args) of every function of run_scan that is timed.

    run_scan imports load_detector / checkpoint_identity / read_volume / FastScorer at call time and
    looks the others up as module globals, so replacing the attributes reaches its calls.
    """
    import btd.data.io as io
    import btd.detect.fast as fast
    import btd.detect.scan as scan
    import btd.diffusion.checkpoint as ckpt

    return [
        (ckpt, "load_detector", "load_detector", False),
        (ckpt, "checkpoint_identity", "checkpoint_identity", False),
        (scan, "resolve_threshold", "resolve_threshold", False),
        (io, "read_volume", "read_volume", False),
        (scan, "normalize_volume", "normalize_volume", False),
        (scan, "resample_inplane", "resample_inplane", False),
        (scan, "foreground_mask", "foreground_mask", False),
        (scan, "volume_digest", "volume_digest", False),
        (scan, "tile_sites", "tile_sites", False),
        (scan, "score_sites", "score_sites", True),
        (scan, "cut_patches", "cut_patches", False),
        (fast.FastScorer, "score", "fast_scorer_score", False),
        (scan, "site_table", "site_table", False),
        (scan, "begin_output", "begin_output", False),
        (scan, "write_heatmaps", "write_heatmaps", False),
        (scan, "summary_markdown", "summary_markdown", False),
        (scan, "_write_text", "write_summary_md", False),
        (scan, "write_json", "write_summary_json", False),
        (scan, "commit_output", "commit_output", False),
    ]


@contextmanager
def logged_calls() -> Iterator[CallLog]:
    """Wrap run_scan's functions for the duration of the block; always restore them."""
    log, saved = CallLog(), []
    try:
        for owner, attr, name, keep in wrap_targets():
            original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
            saved.append((owner, attr, original))
            setattr(owner, attr, log.wrap(name, original, keep))
        yield log
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


def clear_checkpoint_caches() -> None:
    """Forget the cached checkpoint hash/step/metadata: every timed scan pays them, as the CLI does."""
    import btd.diffusion.checkpoint as ckpt

    for name in ("_file_sha256", "_step", "_metadata"):
        fn = getattr(ckpt, name, None)
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()


def timed_scan(series: Path, checkpoint: Path, out_dir: Path, args, threshold) -> dict[str, Any]:
    """One run_scan call as `btd scan` makes it, with its parts."""
    from btd.detect.fast import FastOptions
    from btd.detect.scan import run_scan

    clear_checkpoint_caches()
    fast = FastOptions(batch_size=args.batch_size)  # the CLI's default speed options
    with logged_calls() as log:
        w0, c0 = time.perf_counter(), time.process_time()
        report = run_scan(series, checkpoint, out_dir, threshold=threshold,
                          batch_size=args.batch_size, max_figures=args.max_figures,
                          device=args.device, fast=fast)  # fmt: skip
        w1, c1 = time.perf_counter(), time.process_time()
    read0, read1 = log.first("read_volume")
    score0, score1 = log.first("score_sites")
    resampling = log.total("resample_inplane")
    parts = {
        "model_loading": read0 - w0,
        "dicom_read": read1 - read0,
        "resampling": resampling,
        "normalisation_tiling": score0 - read1 - resampling,
        "model_scoring": score1 - score0,
        "report_writing": w1 - score1,
    }
    report_parts = ("site_table", "begin_output", "write_heatmaps", "summary_markdown",
                    "write_summary_md", "write_summary_json", "commit_output")  # fmt: skip
    functions = {n: log.total(n) for _, _, n, _ in wrap_targets() if n != "cut_patches"}
    model_calls = log.total("fast_scorer_score", main_thread=True)
    a, k = log.args["score_sites"]
    return {
        "wall_s": w1 - w0,
        "cpu_s": c1 - c0,
        "patches": len(report.table),
        "background_skipped": report.n_skipped,
        "flagged": int(report.table["flagged"].sum()),
        "heat_maps": len(report.figures),
        "threshold": report.threshold.value,
        "threshold_source": report.threshold.source,
        "device": report.device,
        "parts": parts,
        "functions": functions,
        "scoring_detail": {
            "fast_scorer_calls_s": model_calls,
            "waiting_and_bookkeeping_s": parts["model_scoring"] - model_calls,
            "patch_cutting_worker_s": log.total("cut_patches"),
        },
        "report_detail": {
            **{n: functions[n] for n in report_parts},
            "scores_csv_and_checks_s": parts["report_writing"]
            - sum(functions[n] for n in report_parts),
        },
        "_tiles": (a[1], a[2]),  # (volume, sites) as score_sites got them; not written
    }


# ----------------------------------------------------------------------------- bare forward


def bare_forward(diffusion, volume: np.ndarray, sites: np.ndarray, batch_size: int):
    """`unet(x, t)` only, over the scan's tiles: the U-Net copy the scan uses, batches ready on
    the device in model space (no host work left). Returns (run, batch size, patch count)."""
    from btd.detect.fast import FastOptions, FastScorer
    from btd.detect.scan import cut_patches

    size = int(diffusion.image_size[0])
    patches, _ = cut_patches(volume, sites, size)
    bs = min(batch_size, max(len(patches), 1))  # as score_sites caps it
    scorer = FastScorer(diffusion, FastOptions(batch_size=bs))
    fmt = torch.channels_last if scorer.options.channels_last else torch.contiguous_format
    device = scorer.device
    x = torch.from_numpy(patches).to(device) * 2.0 - 1.0
    batches = [x[lo : lo + bs].contiguous(memory_format=fmt) for lo in range(0, len(x), bs)]
    t = torch.zeros(bs, dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @torch.inference_mode()
    def run(n_batches: int | None = None) -> None:
        for xb in batches[:n_batches]:
            scorer.unet(xb, t[: len(xb)])
        sync()

    return run, bs, len(patches)


# ----------------------------------------------------------------------------- report


def _median_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    wall = statistics.median(r["wall_s"] for r in runs)
    n = runs[0]["patches"]
    return {"median_wall_s": wall, "median_cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "patches_per_s": n / wall, "wall_s": [r["wall_s"] for r in runs],
            "cpu_s": [r["cpu_s"] for r in runs]}  # fmt: skip


def shown(path: Path) -> str:
    """A path as the README shows it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Write the series, time the scans and the bare forward round-robin, write the JSON."""
    from btd.detect.calibrate import calibration_path
    from btd.diffusion.checkpoint import load_detector, read_checkpoint_metadata
    from btd.diffusion.train import resolve_device

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="btd-scan-speed-") as tmp_name:
        tmp = Path(tmp_name)
        if args.random_model is not None:
            checkpoint = random_checkpoint(tmp / "model", args.random_model)
        else:
            checkpoint = args.checkpoint
            if not checkpoint.is_file():
                raise SystemExit(
                    f"scan_speed.py: error: {checkpoint}: checkpoint not found; train one "
                    "(`dvc repro train_ddpm@ct`), pass --checkpoint, or --random-model 16 for a "
                    "smoke run"
                )
        calibrated = calibration_path(checkpoint, TASK).is_file()
        threshold = None if calibrated else (args.threshold if args.threshold is not None else 0.0)
        series = write_series(tmp / "series", args.slices, args.size, args.pixel_mm, args.slice_mm)
        print(f"series: {args.slices} x {args.size} x {args.size}, {series['mb']:.1f} MB "
              f"in {series['write_s']:.1f} s")  # fmt: skip
        write_series(tmp / "warmup", 2, args.size, args.pixel_mm, args.slice_mm)
        timed_scan(tmp / "warmup", checkpoint, tmp / "out_warmup", args, threshold)

        diffusion, cfg = load_detector(checkpoint, device)
        scans, bare, bare_run, bare_info = [], [], None, {}
        for i in range(args.repeats):  # round-robin: load drifts hit both alike
            scan = timed_scan(tmp / "series", checkpoint, tmp / f"out_{i}", args, threshold)
            volume, sites = scan.pop("_tiles")
            if bare_run is None:
                bare_run, bs, n = bare_forward(diffusion, volume, sites, args.batch_size)
                bare_info = {"patches": n, "batch_size": bs}
                bare_run(1)  # warm-up: one batch
            del volume, sites
            scans.append(scan)
            w0, c0 = time.perf_counter(), time.process_time()
            bare_run()
            bare.append({"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0,
                         "patches": bare_info["patches"]})  # fmt: skip
            print(f"repeat {i + 1}: scan {scan['wall_s']:.2f} s ({scan['patches']} patches), "
                  f"bare forward {bare[-1]['wall_s']:.2f} s")  # fmt: skip
        meta = read_checkpoint_metadata(checkpoint)

    first = scans[0]
    scan_summary = {**_median_summary(scans), "patches": first["patches"]}
    for key in ("background_skipped", "flagged", "heat_maps", "threshold", "threshold_source",
                "device"):  # fmt: skip
        scan_summary[key] = first[key]
    medians = {k: statistics.median(s["parts"][k] for s in scans) for k, _ in PARTS}
    parts_total = sum(medians.values())
    parts = [{"part": k, "label": label, "median_s": medians[k],
              "share": medians[k] / parts_total if parts_total > 0 else 0.0,
              "s": [s["parts"][k] for s in scans]} for k, label in PARTS]  # fmt: skip

    def med(section: str) -> dict[str, float]:
        return {k: statistics.median(s[section][k] for s in scans) for k in first[section]}

    bare_summary = {**bare_info, **_median_summary(bare)}
    scoring_rate = first["patches"] / medians["model_scoring"] if medians["model_scoring"] else 0.0
    ratio = scan_summary["patches_per_s"] / bare_summary["patches_per_s"]
    report = {
        "model": {"image_size": cfg.image_size, "dim": cfg.dim, "dim_mults": list(cfg.dim_mults),
                  "checkpoint": None if args.random_model is not None else shown(args.checkpoint),
                  "random_model": args.random_model is not None, "modality": meta.get("modality"),
                  "pixel_mm": meta.get("pixel_mm"), "calibrated": calibrated},
        "series": series,
        "settings": {"slices": args.slices, "size": args.size, "repeats": args.repeats,
                     "threads": args.threads, "batch_size": args.batch_size,
                     "max_figures": args.max_figures, "device": str(device), "task": TASK,
                     "fast": "fp32 channels-last (the CLI default)", "warmup": "one 2-slice scan",
                     "parts_share": "median seconds of each part / sum of those medians"},
        "scan": scan_summary,
        "parts": parts,
        "functions": med("functions"),
        "scoring_detail": med("scoring_detail"),
        "report_detail": med("report_detail"),
        "not_separated": NOT_SEPARATED,
        "bare_forward": bare_summary,
        "ratios": {"scan_over_bare": ratio, "scoring_stage_over_bare":
                   scoring_rate / bare_summary["patches_per_s"],
                   "target": TARGET, "meets_target": ratio >= TARGET},
        "repeats": scans,
        "cpu": cpu_model(),
        "packages": environment()["packages"],
        "peak_rss_mb": peak_rss_mb(),
        "machine": {**machine_info(device), "load_avg_1min": [load_before, os.getloadavg()[0]]},
    }  # fmt: skip
    write_json(args.out, report)
    for p in parts:
        print(f"{p['label']:>48}: {p['median_s']:8.3f} s  {p['share']:6.1%}")
    print(f"whole scan {scan_summary['patches_per_s']:.1f} patches/s, bare forward "
          f"{bare_summary['patches_per_s']:.1f} patches/s: ratio {ratio:.2f} (target {TARGET}) "
          f"->  {args.out}")  # fmt: skip
    return report


if __name__ == "__main__":
    main()
